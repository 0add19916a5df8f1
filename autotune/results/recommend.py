"""The JSON recommendation of a study: what to deploy, and the whole trade-off behind it.

It holds the best configuration (batch, budget in bytes and as a fraction, throughput, latency
figures, peak memory, how it was measured, and its full measurement when it was estimated), the Pareto front of throughput against peak device memory, "if you can
give N GiB, use ...", the trial counts, the study's name and storage (password redacted), its
workload and environment, and ``schema_version``. It is small enough to read and complete
enough to reproduce with ``autotune bench``. Reading one back checks it.

A study of 8-bit weights (``--quantization``) adds ``precision`` to every configuration,
``by_precision`` (the best of each precision, its speed against 16-bit's best and its
accuracy against 16-bit, measured once per study) and ``accuracy`` beside the best; the Pareto
front is then across precisions.

This module does not run anything.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

from autotune import jsonfile
from autotune.engines.memory import MAX_BATCH
from autotune.errors import NoCompletedTrialError, SchemaError
from autotune.tune.budget import OVER_BUDGET
from autotune.units import GiB

SCHEMA_VERSION = 1
KIND = "autotune.recommendation"
_REQUIRED = ("schema_version", "kind", "study", "workload", "best", "pareto_front", "trials")
_CONFIG_KEYS = ("batch", "device_budget_bytes", "budget_fraction", "throughput_tok_s")


def _config(trial: Any, total: int | None) -> dict[str, Any]:
    a = trial.user_attrs
    peak = (a.get("peak_device_bytes") or a.get("peak_reserved_bytes")
            or a.get("predicted_peak_bytes"))
    applied = a.get("budget_applied_bytes", a["budget_bytes"])
    # The fraction applied, not the one asked for: engines round budgets down to their units.
    fraction = applied / total if total else trial.params.get("budget_fraction", 0.0)
    return {
        "trial": trial.number,
        "batch": a["batch"],
        "device_budget_bytes": applied,
        "budget_fraction": round(fraction, 4),
        "throughput_tok_s": trial.value,
        "ttft_ms": a.get("ttft_ms"),
        "tpot_ms": a.get("tpot_ms"),
        "e2e_s": a.get("e2e_s"),
        "peak_memory_bytes": peak,
        "peak_memory_gib": round(peak / GiB, 3) if peak else None,
        "predicted_peak_bytes": a.get("predicted_peak_bytes"),
        "streamed_bytes_per_step": a.get("streamed_bytes_per_step"),
        "stream_gb_s": a.get("stream_gb_s"),
        "tokens_sha256": a.get("tokens_sha256"),
        "measurement": a.get("measurement", "full"),
        # Its time per token against its bound (autotune.measure.roofline); None where no
        # measured bandwidth bounds it (CPU) or the study predates it.
        "bound_fraction": a.get("bound_fraction"),
        "bound_by": a.get("bound_by"),
        "bound_tpot_ms": a.get("bound_tpot_ms"),
        "precision": a.get("precision", "none"),
    }


def _total_of(trial: Any, attrs: dict[str, Any]) -> int | None:
    """The streamable bytes of the trial's precision (each precision has its own)."""
    totals = attrs.get("total_device_budgets") or {}
    return totals.get(trial.user_attrs.get("precision", "none"),
                      attrs.get("total_device_budget"))


def quantized(attrs: dict[str, Any]) -> bool:
    """Whether a study measured 8-bit weights (--quantization other than none)."""
    wl = attrs.get("workload") or {}
    return list(wl.get("quantization") or ["none"]) != ["none"]


def accuracy_of(attrs: dict[str, Any], precision: str) -> dict[str, Any] | None:
    """The study's accuracy record of one precision (None: not measured or 16-bit)."""
    record = attrs.get("accuracy")
    if not isinstance(record, dict):
        return None
    if "error" in record:
        return {"status": "error", "reason": record["error"]}
    one = (record.get("precisions") or {}).get(precision)
    if one is None:
        return None
    shared = {k: record[k] for k in ("batch", "isl", "steps", "weights", "dtype") if k in record}
    return {**one, **shared}


def by_precision(study: Any) -> dict[str, dict[str, Any]]:
    """The best configuration of each precision the study searched (None where none was
    feasible), its throughput over 16-bit's best, and its accuracy against 16-bit."""
    attrs = study.user_attrs
    precisions = list((attrs.get("workload") or {}).get("quantization") or ["none"])
    configs = [_config(t, _total_of(t, attrs)) for t in _feasible_completed(study)]
    out: dict[str, dict[str, Any]] = {}
    for p in precisions:
        mine = [c for c in configs if c["precision"] == p]
        out[p] = {"best": max(mine, key=lambda c: c["throughput_tok_s"]) if mine else None}
        acc = accuracy_of(attrs, p)
        if acc is not None:
            out[p]["accuracy"] = acc
    base = out.get("none", {}).get("best")
    for row in out.values():
        if base and row["best"] and base["throughput_tok_s"] > 0:
            row["speedup_vs_none"] = round(row["best"]["throughput_tok_s"]
                                           / base["throughput_tok_s"], 3)
    return out


def _feasible_completed(study: Any) -> list[Any]:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [t for t in done if t.user_attrs.get("status") == "ok"
            and all(v <= 0 for v in t.constraints.values())]


def edge_by_tenths(edge: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stored memory edge (:meth:`autotune.tune.model.Model.memory_edge`, one entry per
    candidate fraction) at every 10% of the budget: the largest batch that fits there (0:
    none), compact enough to read. None without a limit."""
    if not edge or edge.get("available_bytes") is None or not edge.get("fractions"):
        return None
    fractions, batches = edge["fractions"], edge["edge_batch"]
    pcts = list(range(0, 101, 10))
    nearest = [min(range(len(fractions)), key=lambda j: abs(fractions[j] - p / 100))
               for p in pcts]
    return {"budget_pct": pcts, "max_batch": [int(batches[j]) for j in nearest],
            "available_bytes": int(edge["available_bytes"])}


def pareto_front(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Configurations no other beats on both throughput (higher) and peak memory (lower),
    by increasing memory."""
    ranked = sorted(configs, key=lambda c: (c["peak_memory_bytes"] or 0, -c["throughput_tok_s"]))
    front, best = [], -math.inf
    for c in ranked:
        if c["throughput_tok_s"] > best:
            front.append(c)
            best = c["throughput_tok_s"]
    return front


def by_memory(front: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """"If you can give N GiB, use ...": the best front point under each whole GiB."""
    if not front:
        return []
    rows, top = [], math.ceil(max(c["peak_memory_bytes"] or 0 for c in front) / GiB)
    for gib in range(1, top + 1):
        fits = [c for c in front if (c["peak_memory_bytes"] or 0) <= gib * GiB]
        if fits and (not rows or rows[-1]["trial"] != fits[-1]["trial"]):
            c = fits[-1]
            rows.append({"memory_gib": gib, "trial": c["trial"], "batch": c["batch"],
                         "device_budget_bytes": c["device_budget_bytes"],
                         "throughput_tok_s": c["throughput_tok_s"]})
    return rows


def build(study: Any) -> dict[str, Any]:
    """The recommendation of a stored study; NoCompletedTrialError if nothing ran."""
    feasible = _feasible_completed(study)
    if not feasible:
        raise NoCompletedTrialError(
            f"study {study.study_name} has no completed feasible trial to recommend from; "
            + _why_none(study))
    attrs = study.user_attrs
    configs = [_config(t, _total_of(t, attrs)) for t in feasible]
    best = max(configs, key=lambda c: c["throughput_tok_s"])
    front = pareto_front(configs)
    totals = attrs.get("total_device_budgets") or {}
    workload = attrs.get("workload", {})
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        status = t.user_attrs.get("status", t.state.name.lower())
        if status == OVER_BUDGET:  # asked in a race between workers, never run: bookkeeping
            continue
        counts[status] = counts.get(status, 0) + 1
    automatic = attrs.get("automatic_budget")
    from autotune import __version__

    rec = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "autotune_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "study": {"name": study.study_name, "storage": attrs.get("storage")},
        "workload": workload,
        "environment": attrs.get("environment", {}),
        # Of the best's precision: its budget's bytes are of those weights.
        "total_device_budget": totals.get(best["precision"], attrs.get("total_device_budget")),
        "automatic_budget": automatic,
        "best": best,
        "pareto_front": front,
        "if_you_can_give": by_memory(front),
        "trials": counts,
        "reproduce": _bench_command(workload, best, _engine_options(workload, attrs)),
        "engine": _engine_summary(attrs.get("engine", {})),
        "costs": _costs(study, attrs.get("engine", {})),
    }
    if quantized(attrs):
        rec["total_device_budgets"] = totals
        rec["by_precision"] = by_precision(study)
        acc = accuracy_of(attrs, best["precision"])
        if acc is not None:
            best["accuracy"] = acc  # beside the throughput: what the speed costs
    edge = edge_by_tenths(attrs.get("memory_edge"))
    if edge:  # where the memory limit cuts the space (the memory plan)
        rec["memory_edge"] = edge
    if workload.get("engine") == "landscape":  # figures replayed, not measured here
        rec["replayed_from"] = {k: attrs.get("engine", {}).get(k)
                                for k in ("landscape", "synthetic", "measured_on")}
    confirmation = attrs.get("confirmation")
    if confirmation and confirmation.get("trial") == best["trial"]:
        rec["confirmation"] = confirmation  # the best, measured over every decode step
    from autotune.results.explain import explain

    rec["explanation"] = explain(study, rec)  # what limits the best, what would move it
    return rec


def _engine_summary(engine: dict[str, Any]) -> dict[str, Any]:
    """Which engine ran, in which versions (for Torch-TensorRT: which TensorRT backend) and
    how it was built: where the recommendation holds."""
    keys = ("engine", "versions", "kv_cache", "built_for", "budget_change_cost")
    return {k: engine[k] for k in keys if k in engine}


def _costs(study: Any, engine: dict[str, Any]) -> dict[str, Any]:
    """What the study paid besides measuring: compiling (0 when the on-disk cache served)
    and budget changes (on TensorRT each rebuilds every execution context)."""
    trials = [t.user_attrs for t in study.get_trials(deepcopy=False)]
    changed = [a for a in trials if a.get("budget_changed")]
    return {"compile_s": engine.get("compile_s"), "compile_cache_hit": engine.get("cache_hit"),
            "budget_changes": len(changed),
            "budget_change_s": round(sum(a.get("budget_change_s", 0.0) for a in changed), 3)}


def _why_none(study: Any) -> str:
    """What kept every trial from counting, and so what to change: only the limits that
    were given are named."""
    import optuna

    workload = study.user_attrs.get("workload", {})
    statuses: dict[str, int] = {}
    over_latency = 0
    for t in study.get_trials(deepcopy=False):
        status = t.user_attrs.get("status", t.state.name.lower())
        statuses[status] = statuses.get(status, 0) + 1
        if (t.state == optuna.trial.TrialState.COMPLETE and status == "ok"
                and any(v > 0 for k, v in (t.constraints or {}).items() if k != "memory_gib")):
            over_latency += 1
    if not statuses:
        return "no trial has run yet (autotune run ... --trials N)"
    seen = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    advice = []
    if over_latency:
        limits = ", ".join(f"--{k.replace('_', '-')} {v:g}"
                           for k, v in (workload.get("limits") or {}).items())
        advice.append(f"{over_latency} measured configurations broke the latency limits "
                      f"({limits or 'as set'}): relax them")
    if statuses.get("infeasible") or statuses.get("oom"):
        advice.append("raise --gpu-memory-limit" if workload.get("gpu_memory_limit")
                      else "free GPU memory (other processes hold it) or use a larger GPU")
    if any(statuses.get(s) for s in ("error", "crash", "timeout")):
        advice.append("see each trial's reason (autotune show)")
    return f"its trials: {seen}" + (f"; {'; '.join(advice)}" if advice else "") + \
        " (autotune run ... --trials N runs more)"


def default_path(study_name: str) -> Path:
    """Where run and export write a study's recommendation by default: studies/<name>.json,
    the name made a plain file name (a study made elsewhere may hold a '/', and an engine
    given as module:Class puts a ':' in the default name, which some file systems refuse)."""
    safe = "".join("_" if c in "/\\:" or ord(c) < 32 else c for c in study_name)
    return Path("studies") / f"{safe.lstrip('.') or 'study'}.json"


def _engine_options(workload: dict[str, Any], attrs: dict[str, Any]) -> list[Any]:
    """The study's engine options, those the engine resolved at load (``auto``) as what they
    resolved to: bench loads one precision on its own host, where ``auto`` may resolve
    otherwise (native: the study's 16-bit trials ran today's step beside 8-bit ones)."""
    typed = list((attrs.get("run_options") or {}).get("engine_options") or [])
    facts = attrs.get("engine")
    try:
        from autotune.engines import engine_class

        cls = engine_class(str(workload.get("engine")))
    except Exception:  # an engine this process cannot import: the options as typed
        return typed
    resolved = getattr(cls, "resolved_options", {})
    if not resolved or not isinstance(facts, dict):
        return typed
    kept = [p for p in typed if p[0] not in resolved]
    return kept + [[k, v] for k, v in cls.options_giving(facts).items()]


def _bench_command(workload: dict[str, Any], best: dict[str, Any],
                   engine_options: Any = None) -> str:
    """The bench command that measures the best again, as a shell reads it (values quoted),
    with the study's engine options (a compiled step or another attention is another speed)."""
    import shlex

    options = [("--model", workload.get("model")), ("--engine", workload.get("engine")),
               ("--dtype", workload.get("dtype")), ("--isl", workload.get("isl")),
               ("--osl", workload.get("osl")), ("--batch", best["batch"]),
               ("--budget", best["device_budget_bytes"])]
    if workload.get("weights"):  # the checkpoint's own weights and shape, not a preset's
        options.append(("--weights", workload["weights"]))
    if workload.get("gpu_memory_limit"):
        options.append(("--gpu-memory-limit", workload["gpu_memory_limit"]))
    if workload.get("gpu") == "cpu":
        options.append(("--device", "cpu"))
    if best.get("precision", "none") != "none":
        options.append(("--quantization", best["precision"]))
    for key, value in engine_options or ():
        options.append(("--engine-option", f"{key}={value}"))
    return "autotune bench " + " ".join(f"{flag} {shlex.quote(str(value))}"
                                        for flag, value in options)


def write(rec: dict[str, Any], path: str | Path) -> Path:
    """Checks, then writes atomically: a crash never leaves half a JSON behind."""
    return jsonfile.write_atomic(validate(rec), path)


def validate(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise SchemaError(f"a recommendation is a JSON object; got {type(rec).__name__}")
    if rec.get("kind") != KIND:
        raise SchemaError(f"not an autotune recommendation (kind {rec.get('kind')!r})")
    if not _is_int(rec.get("schema_version")) or rec["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(
            f"schema_version {rec.get('schema_version')!r} is not supported; this autotune "
            f"reads version {SCHEMA_VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in rec]
    if missing:
        raise SchemaError(f"recommendation lacks {', '.join(missing)}")
    if not isinstance(rec["best"], dict):
        raise SchemaError(f"recommendation's best is a JSON object; got "
                          f"{type(rec['best']).__name__}")
    best_missing = [k for k in _CONFIG_KEYS if k not in rec["best"]]
    if best_missing:
        raise SchemaError(f"recommendation's best configuration lacks {', '.join(best_missing)}")
    best = rec["best"]
    # Hand-edited files: a batch of 3.9 or "8" is not silently served as 3 or refused late.
    total = rec.get("total_device_budget")
    if total is not None and not (_is_int(total) and 0 <= total < 2**63):
        raise SchemaError(f"recommendation's total_device_budget: expected a whole number of "
                          f"bytes; got {total!r}")
    _check(best, "batch", _is_int, f"a whole number of sequences from 1 to {MAX_BATCH:,}",
           lambda v: 1 <= v <= MAX_BATCH)
    # Beyond the total, a budget would be clamped where it is applied: never what was tuned.
    most = total if total is not None else 2**63 - 1
    _check(best, "device_budget_bytes", _is_int,
           f"a whole number of bytes from 0 to {most} (total_device_budget)"
           if total is not None else "a whole number of bytes, 0 or more",
           lambda v: 0 <= v <= most)
    _check(best, "budget_fraction", _is_number, "a number from 0 to 1", lambda v: 0 <= v <= 1)
    _check(best, "throughput_tok_s", _is_number, "a number of tokens/s, 0 or more",
           lambda v: v >= 0)
    return rec


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check(best: dict[str, Any], key: str, kind: Any, expected: str, ok: Any) -> None:
    value = best[key]
    if not kind(value) or not ok(value):
        raise SchemaError(f"recommendation's best {key}: expected {expected}; got {value!r}")


def read(path: str | Path) -> dict[str, Any]:
    """Reads and checks a recommendation file."""
    return validate(jsonfile.read(path, "recommendation"))
