"""A grid study as a landscape file (``autotune export --landscape``).

The format, its checks and the reader are :mod:`autotune.landscape`'s; the ``landscape`` engine
replays what this writes.
"""

from __future__ import annotations

from typing import Any

from autotune.errors import UserInputError
from autotune.landscape import KIND, SCHEMA_VERSION, validate


def _status(attrs: dict[str, Any], state: str) -> str | None:
    status = attrs.get("status")
    if status in ("ok", "oom", "infeasible"):
        return status
    if status in ("error", "crash", "timeout") or state == "FAIL":
        return "error"
    return None


def from_study(study: Any, command: str | None = None) -> dict[str, Any]:
    """A landscape from a stored grid study (``autotune run --sampler grid``).

    Every (batch, budget fraction) pair of the grid must have a finished trial; when one was
    tried twice, a measured result wins over a failure, and the later over the earlier.
    """
    precisions = list((study.user_attrs.get("workload") or {}).get("quantization") or ["none"])
    if len(precisions) > 1:  # a landscape is one grid of batch x budget
        raise UserInputError(
            f"study {study.study_name} searched precision ({','.join(precisions)}); a landscape "
            "is one precision's grid: record one per precision (--quantization int8 "
            "--sampler grid)")
    grid: dict[tuple[int, float], dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        status = _status(a, t.state.name)
        if status is None or "batch" not in a or "budget_fraction" not in t.params:
            continue
        key = (int(a["batch"]), round(float(t.params["budget_fraction"]), 6))
        point = {"batch": key[0], "budget_fraction": key[1], "status": status,
                 "predicted_peak_bytes": a.get("predicted_peak_bytes"), "trial": t.number}
        if status == "ok":
            point.update({
                "throughput_tok_s": a.get("throughput_tok_s"), "ttft_ms": a.get("ttft_ms"),
                "tpot_ms": a.get("tpot_ms"),
                "peak_memory_bytes": (a.get("peak_device_bytes") or a.get("peak_reserved_bytes")
                                      or a.get("predicted_peak_bytes")),
                "streamed_bytes_per_step": a.get("streamed_bytes_per_step"),
                "measurement": a.get("measurement", "full"),  # estimated, or every step
            })
        old = grid.get(key)
        if old is None or status == "ok" or old["status"] != "ok":
            grid[key] = point
    if not grid:
        raise UserInputError(f"study {study.study_name} has no finished trial to export")
    batches = sorted({b for b, _ in grid})
    fractions = sorted({f for _, f in grid})
    missing = [(b, f) for b in batches for f in fractions if (b, f) not in grid]
    if missing:
        raise UserInputError(
            f"study {study.study_name} is not a full grid: {len(missing)} of "
            f"{len(batches) * len(fractions)} (batch, budget fraction) points have no finished "
            f"trial (first: {missing[:3]}); record one with `autotune run --sampler grid` and "
            "enough --trials")
    attrs = study.user_attrs
    available = [t.user_attrs["available_bytes"] for t in study.get_trials(deepcopy=False)
                 if t.user_attrs.get("available_bytes") is not None]
    environment = attrs.get("environment", {})
    calibration = dict(attrs.get("calibration") or {})
    if "h2d_gb_s" not in calibration and environment.get("h2d_gb_s"):
        calibration["h2d_gb_s"] = environment["h2d_gb_s"]
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "synthetic": False,
        "description": f"grid of study {study.study_name}",
        "source": {"study": study.study_name, "storage": attrs.get("storage"),
                   "command": command},
        "workload": attrs.get("workload", {}),
        "environment": environment,
        "calibration": calibration,
        "total_device_budget": attrs.get("total_device_budget"),
        "available_bytes": min(available) if available else None,
        "batches": batches,
        "budget_fractions": fractions,
        "points": [grid[(b, f)] for b in batches for f in fractions],
    }
    return validate(data, f"study {study.study_name}")
