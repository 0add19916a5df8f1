"""What a trial leaves in the study: Optuna's ``tell``, its constraints and its attributes.

The one place that writes a finished trial: the study's loop and the in-process search both
record through :func:`record`, so a trial reads the same whoever ran it.
"""

from __future__ import annotations

from typing import Any

from autotune.measure.roofline import bound_attrs
from autotune.measure.trial import TrialOutcome, TrialRequest
from autotune.tune.prior import Limits
from autotune.units import GiB

OBJECTIVE = "throughput_tok_s"


def record(study: Any, trial: Any, request: TrialRequest, outcome: TrialOutcome,
           total: int, device: str, limits: Limits | None = None,
           bandwidths: dict[str, Any] | None = None) -> None:
    """Tells Optuna what a trial did, with every figure in the user attributes (its fraction
    of the bound from ``bandwidths``: the study's, see :func:`study_bandwidths`)."""
    import optuna

    attrs = trial_attrs(request, outcome, total, bandwidths)
    attrs["worker_device"] = device
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    # Every completed trial carries every constraint of the study (the samplers need the same
    # keys on each); latency limits are in their own unit, > 0 when violated.
    latency = limits.violations(0.0, 0.0, 0.0) if limits is not None else {}
    if outcome.status == "ok":
        trial.set_constraint("memory_gib", 0.0)
        m = outcome.measurement
        if limits is not None:
            latency = limits.violations(m["tpot_s"] * 1e3, m["ttft_s"] * 1e3, m["e2e_s"])
        for key, value in latency.items():
            trial.set_constraint(key, value)
        study.tell(trial, m[OBJECTIVE])
    elif outcome.status in ("infeasible", "oom"):
        shortfall = 0.0
        if outcome.plan and outcome.available_bytes is not None:
            shortfall = (outcome.plan["total"] - outcome.available_bytes) / GiB
        trial.set_constraint("memory_gib", max(shortfall, 0.01))
        for key in latency:  # unknown, never run: the memory constraint says why
            trial.set_constraint(key, 0.0)
        study.tell(trial, 0.0)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def trial_attrs(request: TrialRequest, outcome: TrialOutcome, total: int,
                bandwidths: dict[str, Any] | None = None) -> dict[str, Any]:
    """Flat, dashboard-friendly attributes (units in the names)."""
    attrs: dict[str, Any] = {
        "status": outcome.status,
        "batch": request.batch,
        "budget_bytes": request.budget,
        "budget_gib": round(request.budget / GiB, 3),
        "budget_pct": round(100 * request.budget / total, 2) if total else 100.0,
        "elapsed_s": round(outcome.elapsed_s, 3),
        "precision": request.precision,
    }
    if outcome.reason:
        attrs["reason"] = outcome.reason
    if outcome.plan:
        attrs["predicted_peak_bytes"] = outcome.plan["total"]
        attrs["predicted_peak_gib"] = round(outcome.plan["total"] / GiB, 3)
        attrs["memory_plan"] = outcome.plan
    if outcome.available_bytes is not None:
        attrs["available_bytes"] = outcome.available_bytes
    if outcome.measurement:
        attrs["measurement"] = measurement_kind(outcome.measurement)
    if outcome.applied_budget is not None:
        attrs["budget_applied_bytes"] = outcome.applied_budget
        attrs["budget_applied_pct"] = (round(100 * outcome.applied_budget / total, 2) if total
                                       else 100.0)
        attrs["budget_change_s"] = round(outcome.budget_change_s or 0.0, 4)
        if outcome.budget_changed is not None:
            attrs["budget_changed"] = outcome.budget_changed
    m = outcome.measurement
    if m:
        attrs.update({
            OBJECTIVE: round(m[OBJECTIVE], 3),
            "ttft_ms": round(m["ttft_s"] * 1e3, 3),
            "tpot_ms": round(m["tpot_s"] * 1e3, 3),
            "e2e_s": round(m["e2e_s"], 4),
            "e2e_samples_s": [round(x, 5) for x in m["e2e_samples_s"]],
            "streamed_bytes_per_step": m["streamed_bytes_per_step"],
            "stream_gb_s": round(m["stream_gb_s"], 2),
            "tokens_sha256": m["tokens_sha256"],
        })
        attrs.update(bound_attrs(m, outcome.plan, outcome.applied_budget, bandwidths))
        peak = m.get("peak_device_bytes") or m["peak_reserved_bytes"]
        for key in ("peak_allocated_bytes", "peak_reserved_bytes", "nvml_used_bytes",
                    "peak_device_bytes"):
            if m[key] is not None:
                attrs[key] = m[key]
        if peak:
            attrs["peak_memory_gib"] = round(peak / GiB, 3)
            if outcome.plan:
                attrs["prediction_error_pct"] = round(
                    100 * (outcome.plan["total"] - peak) / peak, 2)
    return attrs


def measurement_kind(m: dict[str, Any]) -> str:
    """How a trial was measured, in words (the trial says when it is an estimate)."""
    if m.get("estimated"):
        return (f"estimated: prefill + {m['decode_steps_timed']} of {m['osl'] - 1} decode steps "
                f"timed, the rest extrapolated (uniform steps)")
    return "full"


def study_bandwidths(engine: dict[str, Any], environment: dict[str, Any]) -> dict[str, Any]:
    """The bandwidths a study's bounds use (GB/s): an engine that stands in for hardware (a
    replayed landscape) gives its recording's; else those the worker measured at its start."""
    own = engine.get("bandwidths")
    if isinstance(own, dict) and own:
        return {k: v for k, v in own.items() if k in ("h2d_gb_s", "hbm_gb_s") and v}
    return {k: environment[k] for k in ("h2d_gb_s", "hbm_gb_s") if environment.get(k)}
