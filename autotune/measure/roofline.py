"""The bound of a decode step, and how close a trial came to it.

A decode step must at least copy the bytes it streams over the host-to-device link and read
the bytes it keeps resident from device memory (HBM): its time is bounded below by
``max(streamed / link, resident / HBM)``, both bandwidths measured at the study's start (or,
for an engine that stands in for hardware, a replayed landscape, its recorded figures). A
trial's *fraction of the bound* is that bound over its measured time per output token: 0.99
streaming everything means the link is nearly saturated and only a larger batch (more memory)
or more resident weights can help; 0.3 means something else (compute, launches) takes the time.

Resident bytes per step are the weights the memory plan keeps on the device (at least the
applied budget) plus the KV cache it holds: engines with a static cache (native, tensorrt)
read all of it every step, masked beyond the position. Where the HBM bandwidth was not
measured, the bound is the link's alone, and a trial that streams nothing has none.

This module computes; it measures nothing (:mod:`autotune.measure.timing` does).
"""

from __future__ import annotations

from typing import Any


def resident_bytes(plan: dict[str, int] | None, applied_budget: int | None) -> int:
    """Bytes a decode step reads from device memory: resident weights and the KV cache."""
    plan = plan or {}
    weights = max(int(plan.get("resident_weights") or 0), int(applied_budget or 0))
    return weights + int(plan.get("kv_cache") or 0)


def step_bound(streamed: float, resident: float, h2d_gb_s: float | None,
               hbm_gb_s: float | None) -> tuple[float, str] | None:
    """The shortest a decode step can take (s) and what sets it ("link" or "HBM"); None when
    no measured bandwidth bounds it."""
    terms = []
    if h2d_gb_s and streamed > 0:
        terms.append((streamed / (h2d_gb_s * 1e9), "link"))
    if hbm_gb_s and resident > 0:
        terms.append((resident / (hbm_gb_s * 1e9), "HBM"))
    if not terms or (streamed > 0 and not h2d_gb_s):
        return None  # the step streams over a link nobody measured: no honest bound
    return max(terms)


def bound_attrs(measurement: dict[str, Any], plan: dict[str, int] | None,
                applied_budget: int | None, bandwidths: dict[str, Any] | None
                ) -> dict[str, Any]:
    """A trial's bound attributes: ``bound_tpot_ms``, ``bound_by`` and ``bound_fraction``
    (bound / measured TPOT); empty where no measured bandwidth bounds it."""
    bw = bandwidths or {}
    streamed = float(measurement.get("streamed_bytes_per_step") or 0)
    resident = resident_bytes(plan, applied_budget)
    bound = step_bound(streamed, resident, bw.get("h2d_gb_s"), bw.get("hbm_gb_s"))
    tpot = float(measurement.get("tpot_s") or 0)
    if bound is None or tpot <= 0:
        return {}
    seconds, by = bound
    return {"bound_tpot_ms": round(seconds * 1e3, 4), "bound_by": by,
            "bound_fraction": round(seconds / tpot, 4),
            "resident_bytes_per_step": resident}
