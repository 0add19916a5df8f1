"""The hardware figures the tuner's model starts from: the link and one forward pass's matmuls.

At study start the worker measures the time of one forward pass's matrix multiplies at a few row
counts (:func:`measure_compute`, under a second; the host-to-device bandwidth is measured with
the worker's environment). Noise only ever adds time, so each row count keeps its fastest pass
of several interleaved sweeps, and the figures are checked for the shape matmuls have (no faster
with more rows, no more than proportionally slower): a calibration that breaks it is measured
again, and what still breaks it is repaired towards the lower figures
(:func:`calibration_problem`, :meth:`Calibration.repaired`). :mod:`autotune.tune.model`
predicts from them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Rows of the matmul calibration: decode runs ``batch`` rows, prefill ``batch * isl``.
CALIBRATION_ROWS = (1, 8, 32, 128, 512, 2048)
# Interleaved sweeps over the rows per attempt (a burst of load spoils one sweep's points, not
# every sample of one row count), and attempts while the figures break the matmul shape.
CALIBRATION_ROUNDS = 5
CALIBRATION_ATTEMPTS = 3
# The shape checked: more rows are never faster by more than noise at tiny sizes (launch
# overheads), nor slower by more than this factor over proportional (cache effects).
MONOTONE_TOLERANCE = 0.75
SUPERLINEAR = 2.0


@dataclass(frozen=True)
class Calibration:
    """Measured hardware: the link and one forward pass's matmuls at a few row counts."""

    h2d_gb_s: float | None
    gemm_rows: tuple[int, ...]
    gemm_s: tuple[float, ...]  # seconds of all layers' + the head's matmuls for that many rows
    history: tuple[str, ...] = ()  # what was rejected or re-measured, and why, in words

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(d.get("h2d_gb_s"), tuple(d.get("gemm_rows", ())),
                   tuple(float(x) for x in d.get("gemm_s", ())), tuple(d.get("history", ())))

    def as_dict(self) -> dict[str, Any]:
        out = {"h2d_gb_s": self.h2d_gb_s, "gemm_rows": list(self.gemm_rows),
               "gemm_s": list(self.gemm_s)}
        if self.history:
            out["history"] = list(self.history)
        return out

    def problem(self) -> str | None:
        """What is physically wrong with these figures, in words (None: nothing)."""
        return calibration_problem(self.gemm_rows, self.gemm_s)

    def repaired(self) -> Calibration:
        """The figures forced into the matmul shape, keeping the lower of two that disagree
        (noise only adds time): a smaller row count never takes longer than a larger one, and
        a larger one never more than ``SUPERLINEAR`` x proportionally longer. Figures with
        nothing wrong (:meth:`problem`) are kept as they are."""
        if self.problem() is None:
            return self
        t = [float(x) if math.isfinite(x) and x > 0 else math.inf for x in self.gemm_s]
        for i in range(len(t) - 2, -1, -1):
            t[i] = min(t[i], t[i + 1])
        r = self.gemm_rows
        for i in range(1, len(t)):
            t[i] = min(t[i], t[i - 1] * SUPERLINEAR * r[i] / r[i - 1])
        if not all(math.isfinite(x) for x in t):  # nothing usable measured
            t = [0.0] * len(t)
        return Calibration(self.h2d_gb_s, self.gemm_rows, tuple(t), self.history)

    def gemm(self, rows: np.ndarray | float) -> np.ndarray:
        """Matmul time for ``rows`` (piecewise linear; linear beyond the last point)."""
        r = np.asarray(rows, dtype=float)
        if not self.gemm_rows:
            return np.zeros_like(r)
        xs, ys = np.array(self.gemm_rows, float), np.array(self.gemm_s, float)
        out = np.interp(r, xs, ys)
        if len(xs) >= 2:
            slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
            out = np.where(r > xs[-1], ys[-1] + slope * (r - xs[-1]), out)
        return out


def calibration_problem(rows: tuple[int, ...], times: tuple[float, ...]) -> str | None:
    """Why matmul times at ``rows`` cannot be right (None: they can): not positive, faster
    with more rows, or more than ``SUPERLINEAR`` x proportionally slower."""
    if len(rows) != len(times) or not rows:
        return f"{len(rows)} row counts but {len(times)} times"
    for r, t in zip(rows, times, strict=True):
        if not (math.isfinite(t) and t > 0):
            return f"{r} rows took {t!r} s"
    for k in range(1, len(rows)):
        (r0, t0), (r1, t1) = (rows[k - 1], times[k - 1]), (rows[k], times[k])
        if t1 < MONOTONE_TOLERANCE * t0:
            return f"{r1} rows took {t1:.3g} s, less than {r0} rows' {t0:.3g} s"
        if t1 > SUPERLINEAR * t0 * r1 / r0:
            return (f"{r1} rows took {t1 / t0:.3g}x as long as {r0} rows ({t1:.3g} s against "
                    f"{t0:.3g} s): more than {SUPERLINEAR:g}x proportional")
    return None


def measure_compute(engine: Any, rows: tuple[int, ...] = CALIBRATION_ROWS,
                    rounds: int = CALIBRATION_ROUNDS,
                    attempts: int = CALIBRATION_ATTEMPTS) -> dict[str, Any]:
    """Times one forward pass's matmuls (all layers + LM head) at ``rows`` rows: in the worker.

    ``rounds`` sweeps over the row counts, interleaved, keep each row count's fastest pass;
    while the figures break the matmul shape (:func:`calibration_problem`: another process
    competing for the device, typically), up to ``attempts`` times, more sweeps are pooled;
    what still breaks it is repaired (:meth:`Calibration.repaired`) and said in ``rejected``.
    An engine that knows better (a replay) answers with ``compute_calibration()``. The engine's
    budget is set to 0 first, so that the matmuls' weights fit beside it; the next trial sets
    its own budget anyway.
    """
    hook = getattr(engine, "compute_calibration", None)
    if hook is not None:
        return hook()
    import torch

    from autotune.models import torch_dtype

    spec, device = engine.spec, engine.config.device
    engine.device_budget = 0
    dtype = torch_dtype(engine.config.dtype)
    h, i = spec.hidden_size, spec.intermediate_size
    kv = spec.num_key_value_heads * spec.head_dim
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> Any:
        return (torch.rand(*shape, generator=gen) * 0.02).to(device=device, dtype=dtype)

    # One layer's weights, reused for every layer: the time is the same, the memory is not.
    layer = (rand(h, h + 2 * kv), rand(h, h), rand(h, 2 * i), rand(i, h))  # qkv, o, gate_up, down
    head = rand(h, spec.vocab_size)

    def forward(xh: Any, xi: Any) -> None:
        qkv, o, gate_up, down = layer
        for _ in range(spec.num_hidden_layers):
            torch.mm(xh, qkv)
            torch.mm(xh, o)
            torch.mm(xh, gate_up)
            torch.mm(xi, down)
        torch.mm(xh[-1:], head)  # the LM head runs on the last position only

    samples: dict[int, list[float]] = {m: [] for m in rows}
    problem = None
    with torch.inference_mode():
        inputs = {m: (rand(m, h), rand(m, i)) for m in rows}  # [m, hidden], [m, intermediate]
        for m in rows:
            forward(*inputs[m])  # warm-up: kernel selection, not counted
        for attempt in range(1, attempts + 1):
            for _ in range(rounds):
                for m in rows:
                    engine.synchronize()  # the clock reads only this pass's work
                    t0 = time.perf_counter()
                    forward(*inputs[m])
                    engine.synchronize()
                    samples[m].append(time.perf_counter() - t0)
            times = tuple(min(samples[m]) for m in rows)
            problem = calibration_problem(tuple(rows), times)
            if problem is None:
                break
            log.info("matmul calibration, attempt %d: %s", attempt, problem)
    history = () if problem is None else (
        f"after {attempt * rounds} sweeps {problem}; repaired from {[f'{t:.3g}' for t in times]}",)
    out = Calibration(None, tuple(rows), times, history).repaired().as_dict()
    del out["h2d_gb_s"]  # the worker's link, measured elsewhere
    return out
