"""The prior: predicts every configuration from the measured hardware, and chooses what to try.

At study start the worker measures the host-to-device bandwidth (the study's environment) and
the time of one forward pass's matrix multiplies at a few row counts, and plans the peak memory
of every candidate (batch x budget fraction) in one round trip (:func:`build`). Three parts,
each a file:

- :mod:`autotune.measure.calibration`: the measured figures, checked for the shape matmuls
  have and repaired (measured in the worker);
- :mod:`autotune.tune.model`: the performance model, refitted after each trial and corrected
  near what was measured, and the bounds on what any configuration could possibly do;
- :mod:`autotune.tune.acquisition`: what to skip (and why that never skips the true optimum),
  which configuration to try next, and when the search may stop (:class:`Prior`).

This module chooses points and predicts; it does not run trials or talk to Optuna's storage
(:mod:`autotune.tune.search` does).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from autotune.measure.calibration import Calibration
from autotune.tune.acquisition import Prior
from autotune.tune.model import Limits, Observation, candidate_batches, candidate_fractions

__all__ = ["Calibration", "Limits", "Observation", "Prior", "build", "plan_requests"]

log = logging.getLogger(__name__)


def plan_requests(batches: np.ndarray, fractions: np.ndarray, total: int) -> list[tuple[int, int]]:
    """(batch, budget bytes) of every candidate, row-major [batch, fraction]."""
    budgets = [int(round(f * total)) for f in fractions]
    return [(int(b), budget) for b in batches for budget in budgets]


def build(runner: Any, *, total: int, isl: int, osl: int, max_batch: int, limits: Limits,
          h2d_gb_s: float | None, margin: int, compute: dict[str, Any] | None = None,
          precision: str | None = None) -> Prior:
    """Measures (through ``runner``: a Worker or an in-process runner) and builds the prior.

    ``compute``: the study's stored calibration, reused (its matmul times) when a run resumes
    or a worker joins, so that every prior of a study reasons from the same measurements (and
    a resumed study that had converged stays converged); the link is this worker's own.
    ``precision``: plan that precision's weights (a study searching several; ``total`` is
    then that precision's streamable bytes)."""
    batches, fractions = candidate_batches(max_batch), candidate_fractions()
    if compute is not None and compute.get("gemm_rows"):
        why = Calibration.from_dict(compute).problem()
        if why is not None:  # stored by an older version, or edited: never trusted as it is
            log.warning("the study's stored matmul calibration is not physical (%s); "
                        "measuring it again", why)
            compute = None
    if compute is not None and compute.get("gemm_rows"):
        calibration = {**compute, "h2d_gb_s": h2d_gb_s or compute.get("h2d_gb_s")}
    else:
        calibration = runner.calibrate()
    configs = plan_requests(batches, fractions, total)
    reply = (runner.plan(configs, isl, osl, margin) if precision is None
             else runner.plan(configs, isl, osl, margin, precision))
    plans = np.array(reply["totals"], float).reshape(len(batches), len(fractions))
    # The same for every batch (plan_requests is batch-major): one row is enough.
    applied = (np.array(reply["applied"], np.int64).reshape(plans.shape)[0]
               if "applied" in reply else None)
    streamed = (np.array(reply["streamed"], float).reshape(plans.shape)[0]
                if "streamed" in reply else None)
    cal = Calibration.from_dict({"h2d_gb_s": calibration.get("h2d_gb_s") or h2d_gb_s,
                                 **{k: v for k, v in calibration.items() if k != "h2d_gb_s"}})
    return Prior(calibration=cal, plans=plans, available=reply["available"], total=total,
                 isl=isl, osl=osl, max_batch=max_batch, limits=limits, batches=batches,
                 fractions=fractions, applied=applied, streamed=streamed,
                 least_plan=reply.get("least"))
