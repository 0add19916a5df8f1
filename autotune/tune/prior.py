"""The prior: predicts every configuration from the measured hardware, and what to skip.

At study start the worker measures the host-to-device bandwidth (the study's environment) and
the time of one forward pass's matrix multiplies at a few row counts (:func:`measure_compute`,
under a second), and plans the peak memory of every candidate (batch x budget fraction) in one
round trip, with the bytes the engine would stream at each budget where it says (weights it
reads on the host, as the native engine's embedding, are not streamed). From those, a step of decode takes ``max(streamed bytes / bandwidth, alpha + beta *
batch)`` (copies overlap compute on the side stream) and prefill ``max(streamed / bandwidth,
pi0 + pi1 * batch)``; throughput, TTFT, TPOT and end-to-end latency follow. After each trial
the constants are refitted from the measured trials, and a local correction (measured over
predicted, weighted by distance) makes the model agree with what it has seen.

What it skips, and why that never skips the true optimum:

- *cannot fit*: the engine's memory plan exceeds the headroom (the worker would refuse it
  anyway), or it lies beyond a configuration that ran out of memory (memory grows with batch
  and budget);
- *cannot meet the limits* / *cannot win*: judged with **bounds**, not with the fitted model:
  the link's measured bandwidth (x 1.15) and the measured matmul time (x 0.8) give the fastest
  any configuration could possibly be. Physics, with slack for measurement noise, so a
  configuration that really meets the limits or really beats the best measured one is kept.
  The bounds never rest on a figure a measured trial contradicts: a trial that ran faster than
  a bound allows caps the bound there (and at every smaller batch), and the study re-measures
  the calibration (:meth:`Prior.contradiction`).

Noise only ever adds time, so the calibration keeps each row count's fastest pass of several
interleaved sweeps, and is checked for the shape matmuls have (no faster with more rows, no
more than proportionally slower): a calibration that breaks it is measured again, and what
still breaks it is repaired towards the lower figures (:func:`calibration_problem`).

The search converges only with evidence from the far corner: the largest batch that can run,
with the largest budget it can run with, has been measured (a disturbed calibration once made
every large batch look hopeless; a model that takes copies to overlap compute misjudges the
budget where they do not, on CPU).

This module chooses points and predicts; it does not run trials or talk to Optuna's storage
(:mod:`autotune.tune.search` does).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from autotune.errors import UserInputError

log = logging.getLogger(__name__)

# Used only when the bandwidth was not measured (CPU studies): PCIe 4.0 x16 in practice.
ASSUMED_H2D_GB_S = 25.0
# Slack of the pruning bounds: the measured copy bandwidth can be beaten by ~10% in a noisy
# measurement; the measured matmuls can be ~20% slower alone than inside a captured graph.
BW_SLACK = 1.15
COMPUTE_SLACK = 0.8
FRACTION_STEP = 0.01
# Trial statuses that are failures other than memory (the worker's classification).
FAILED = ("error", "crash", "timeout", "fail")
MAX_CANDIDATE_BATCHES = 400
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
# Length scale of the local correction in the normalized (log2 batch, fraction) square.
CORRECTION_SCALE = 0.08
# The fitted model's relative error is taken to lie in this range (measurement noise is ~1%).
MIN_ERROR, MAX_ERROR = 0.01, 0.15
# Measured trials before the search may call itself converged: with fewer, the fit's error is
# measured on the very points it was fitted to (one trial fits exactly).
MIN_FIT_TRIALS = 3
# Finished trials in a row without a feasible best better by more than MIN_ERROR: the search
# has stalled (typically walking along a latency limit its model puts within noise of the
# candidates; trying them all would end on a noisy winner).
PATIENCE = 5
# A budget change costing less than this fraction of a trial is noise: the search ignores it.
# Above it (TensorRT rebuilds every execution context on a change), a candidate at another
# budget than the worker's scores its expected gain per second, the change's included.
MATERIAL_CHANGE = 0.05


@dataclass(frozen=True)
class Limits:
    """Latency limits of a study (None: no limit)."""

    max_tpot_ms: float | None = None
    max_ttft_ms: float | None = None
    max_latency_s: float | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise UserInputError(f"--{name.replace('_', '-')}: expected a positive number; "
                                     f"got {value!r}")

    @property
    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def violations(self, tpot_ms: float, ttft_ms: float, e2e_s: float) -> dict[str, float]:
        """Constraint values (> 0: violated), in the limit's unit, keyed like the limits."""
        out = {}
        if self.max_tpot_ms is not None:
            out["tpot_ms"] = tpot_ms - self.max_tpot_ms
        if self.max_ttft_ms is not None:
            out["ttft_ms"] = ttft_ms - self.max_ttft_ms
        if self.max_latency_s is not None:
            out["latency_s"] = e2e_s - self.max_latency_s
        return out


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


@dataclass(frozen=True)
class Observation:
    """A finished trial as the prior sees it."""

    batch: int
    fraction: float
    status: str  # ok | infeasible | oom | error | ...
    throughput: float | None = None  # tok/s
    tpot_s: float | None = None
    ttft_s: float | None = None
    streamed: float | None = None  # bytes per step
    feasible: bool = False  # ran and met every constraint
    applied: int | None = None  # the budget the engine applied (bytes), where it ran
    seconds: float | None = None  # the trial's wall time, budget change included
    change_s: float | None = None  # what changing the engine's budget cost, where it changed

    @classmethod
    def from_trial(cls, t: Any) -> Observation | None:
        a, params = t.user_attrs, t.params
        if "batch" not in params or "budget_fraction" not in params:
            return None
        batch, fraction = int(params["batch"]), float(params["budget_fraction"])
        status = a.get("status", t.state.name.lower())  # "running": asked, not finished
        applied = a.get("budget_applied_bytes")
        costs = {"seconds": a.get("elapsed_s"),
                 "change_s": a.get("budget_change_s") if a.get("budget_changed") else None}
        if status != "ok" or "tpot_ms" not in a:
            return cls(batch, fraction, status, applied=applied, **costs)
        return cls(
            batch, fraction, "ok",
            throughput=float(a["throughput_tok_s"]), tpot_s=a["tpot_ms"] / 1e3,
            ttft_s=a["ttft_ms"] / 1e3, streamed=float(a.get("streamed_bytes_per_step") or 0),
            feasible=all(v <= 0 for v in t.constraints.values()), applied=applied, **costs,
        )


@dataclass
class Constants:
    """The model's constants (seconds, bytes/s); refitted after each trial."""

    bw: float  # streaming bandwidth, bytes/s
    alpha: float  # decode step compute at batch 0, s
    beta: float  # ... per sequence, s
    pi0: float  # prefill compute at batch 0, s
    pi1: float  # ... per sequence, s
    error: float = 0.05  # relative error of the latest fit on the measured trials (worst)
    tpot_error: float = 0.05  # ... of TPOT alone
    ttft_error: float = 0.05  # ... of TTFT alone
    fitted_on: int = 0


class Prior:
    """Predictions over the candidate grid, and the choice of the next configuration."""

    def __init__(self, *, calibration: Calibration, plans: np.ndarray, available: int | None,
                 total: int, isl: int, osl: int, max_batch: int, limits: Limits | None = None,
                 batches: np.ndarray | None = None, fractions: np.ndarray | None = None,
                 applied: np.ndarray | None = None, streamed: np.ndarray | None = None) -> None:
        self.batches = candidate_batches(max_batch) if batches is None else batches
        self.fractions = candidate_fractions() if fractions is None else fractions
        # The budget (bytes) each candidate fraction becomes: engines round down to whole
        # units, so neighbouring fractions may be one configuration, measured once.
        self.applied = (np.round(self.fractions * total).astype(np.int64) if applied is None
                        else np.asarray(applied, dtype=np.int64))
        assert self.applied.shape == self.fractions.shape
        self.plans = np.asarray(plans, dtype=float)  # [nb, nf] predicted peak bytes
        assert self.plans.shape == (len(self.batches), len(self.fractions))
        self.available, self.total = available, total
        self.isl, self.osl, self.max_batch = isl, osl, max_batch
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._b = self.batches.astype(float)[:, None]  # [nb, 1]
        self._f = self.fractions.astype(float)[None, :]  # [1, nf]
        # [1, nf] bytes per step: the engine's own figures where it gives them (a budget below
        # the total may leave weights on the host that are read, not streamed: the bounds
        # must not count them), else every byte not resident.
        self._told = None if streamed is None else np.asarray(streamed, dtype=float)
        assert self._told is None or (self._told.shape == self.fractions.shape
                                      and bool(np.all(np.diff(self.fractions) > 0)))
        self._streamed = self.streamed_bytes(self._f)
        self.fits = (self.plans <= available) if available is not None else np.ones(
            self.plans.shape, dtype=bool)
        self._correction: tuple[np.ndarray, np.ndarray] | None = None
        self.recalibrations = 0  # times trials sent the calibration back to be measured
        self.recalibrate(calibration)

    def recalibrate(self, calibration: Calibration) -> None:
        """Starts the model and the bounds over from new measurements (the shape forced, see
        :meth:`Calibration.repaired`); the next refit brings the trials back in."""
        calibration = calibration.repaired()
        self.calibration = calibration
        self.measured_bw = calibration.h2d_gb_s is not None
        bw = (calibration.h2d_gb_s or ASSUMED_H2D_GB_S) * 1e9
        g = calibration.gemm
        top = float(max(self.max_batch, 2))
        beta = float((g(top) - g(1.0)) / (top - 1.0))
        pi1 = float((g(top * self.isl) - g(float(self.isl))) / (top - 1.0))
        # Times are never negative: a curved calibration's chord may cross zero.
        self.initial = Constants(bw=bw, alpha=max(float(g(1.0)) - beta, 0.0), beta=beta,
                                 pi0=max(float(g(float(self.isl))) - pi1, 0.0), pi1=pi1)
        self.constants = Constants(**asdict(self.initial))
        self._bounds = self._lower_bounds([])

    # -- the model ------------------------------------------------------------------------

    def streamed_bytes(self, f: np.ndarray) -> np.ndarray:
        """Bytes streamed per step at fractions ``f``: the engine's figures, interpolated
        between the candidates, where it gave them; else every byte not resident."""
        if self._told is None:
            return self.total * (1.0 - f)
        return np.interp(f, self.fractions, self._told)

    def predict(self, b: np.ndarray, f: np.ndarray, c: Constants | None = None,
                streamed: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Predicted figures (seconds, tok/s) at batches ``b`` and fractions ``f`` (streaming
        ``streamed`` bytes per step where given)."""
        c = c or self.constants
        stream = (self.streamed_bytes(f) if streamed is None else streamed) / c.bw
        tpot = np.maximum(stream, c.alpha + c.beta * b)
        ttft = np.maximum(stream, c.pi0 + c.pi1 * b)
        e2e = ttft + (self.osl - 1) * tpot
        return {"tpot_s": tpot, "ttft_s": ttft, "e2e_s": e2e, "throughput": b * self.osl / e2e}

    def _lower_bounds(self, obs: list[Observation]) -> dict[str, np.ndarray]:
        """The fastest each candidate could possibly run (see the module docstring), never
        above what a measured trial showed: a trial faster than the calibrated matmuls allow
        lowers the whole calibration by that ratio (its other figures were measured alike),
        compute grows with the batch, so a trial's step time caps the compute bound at its
        batch and below, and the bytes it streamed per step time are a bandwidth the link has
        reached."""
        b, g = self._b, self.calibration.gemm
        bw = self.initial.bw
        ran = [o for o in obs if o.status == "ok" and o.tpot_s and o.ttft_s]
        scale = min([1.0, *(min(o.tpot_s / max(COMPUTE_SLACK * float(g(float(o.batch))), 1e-300),
                                o.ttft_s / max(COMPUTE_SLACK * float(g(float(o.batch * self.isl))),
                                               1e-300)) for o in ran)])
        decode = scale * COMPUTE_SLACK * g(b)  # [nb, 1]
        prefill = scale * COMPUTE_SLACK * g(b * self.isl)
        for o in ran:
            decode = np.where(b <= o.batch, np.minimum(decode, o.tpot_s), decode)
            prefill = np.where(b <= o.batch, np.minimum(prefill, o.ttft_s), prefill)
            if o.streamed:
                bw = max(bw, o.streamed / o.tpot_s)
        stream = self._streamed / (bw * BW_SLACK)
        tpot = np.maximum(stream, decode)
        ttft = np.maximum(stream, prefill)
        e2e = ttft + (self.osl - 1) * tpot
        return {"tpot_s": tpot, "ttft_s": ttft, "e2e_s": e2e, "throughput": b * self.osl / e2e}

    def contradiction(self, obs: list[Observation]) -> str | None:
        """A measured trial that ran faster than the calibration allows, in words (None: the
        trials agree with it): the calibration is then wrong and should be measured again
        (the bounds already step aside, see :meth:`_lower_bounds`)."""
        g, bw = self.calibration.gemm, self.initial.bw
        for o in obs:
            if o.status != "ok" or not (o.tpot_s and o.ttft_s):
                continue
            for what, rows, took in (("a decode step", o.batch, o.tpot_s),
                                     ("prefill", o.batch * self.isl, o.ttft_s)):
                floor = COMPUTE_SLACK * float(g(float(rows)))
                if took < floor:
                    return (f"{what} at batch {o.batch} took {1e3 * took:.3g} ms, below the "
                            f"{1e3 * floor:.3g} ms its calibrated matmuls allow")
            if self.measured_bw and o.streamed and o.streamed / o.tpot_s > bw * BW_SLACK:
                return (f"batch {o.batch} streamed {o.streamed / o.tpot_s / 1e9:.3g} GB/s, "
                        f"above the link's measured {bw / 1e9:.3g} GB/s")
        return None

    def refit(self, obs: list[Observation]) -> Constants:
        """Refits the constants on the measured trials (a few classification passes)."""
        ok = [o for o in obs if o.status == "ok" and o.tpot_s]
        c = Constants(**asdict(self.initial))
        if not ok:
            self.constants, self._correction = c, None
            return c
        b = np.array([o.batch for o in ok], float)
        s = np.array([o.streamed for o in ok], float)
        tpot = np.array([o.tpot_s for o in ok], float)
        ttft = np.array([o.ttft_s for o in ok], float)
        for _ in range(3):
            c.bw = _fit_bandwidth(s, tpot, c.alpha + c.beta * b, c.bw)
            c.alpha, c.beta = _fit_line(b, tpot, s / c.bw, c.alpha, c.beta)
            c.pi0, c.pi1 = _fit_line(b, ttft, s / c.bw, c.pi0, c.pi1)
        pred = self.predict(b, 1.0 - s / max(self.total, 1), c, streamed=s)
        rel_tpot, rel_ttft = np.abs(pred["tpot_s"] / tpot - 1), np.abs(pred["ttft_s"] / ttft - 1)
        c.tpot_error = float(np.clip(rel_tpot.max(), MIN_ERROR, MAX_ERROR))
        c.ttft_error = float(np.clip(rel_ttft.max(), MIN_ERROR, MAX_ERROR))
        c.error = max(c.tpot_error, c.ttft_error)
        c.fitted_on = len(ok)
        self.constants = c
        # The local correction: measured over predicted at the measured points.
        f = np.array([o.fraction for o in ok], float)
        p = self.predict(b, f, c)
        ratios = np.stack([np.array([o.throughput for o in ok]) / p["throughput"],
                           tpot / p["tpot_s"], ttft / p["ttft_s"]])
        self._correction = (np.stack([self._norm_b(b), f]), ratios)
        return c

    def _norm_b(self, b: np.ndarray) -> np.ndarray:
        return np.log2(b) / max(math.log2(self.max_batch), 1.0)

    def corrected(self) -> dict[str, np.ndarray]:
        """The refitted model over the candidate grid, corrected near measured points."""
        pred = self.predict(self._b, self._f)
        if self._correction is None:
            return {**pred, "trust": np.zeros(self.plans.shape)}
        pts, ratios = self._correction
        xb = self._norm_b(self._b)[..., None]  # [nb, 1, 1]
        xf = self._f[..., None]  # [1, nf, 1]
        d2 = (xb - pts[0]) ** 2 + (xf - pts[1]) ** 2  # [nb, nf, n]
        w = np.exp(-d2 / CORRECTION_SCALE**2)
        w0 = 0.05  # far from every measurement, trust the model
        out = dict(pred)
        wsum = w.sum(axis=-1)
        for k, key in enumerate(("throughput", "tpot_s", "ttft_s")):
            r = (w @ ratios[k] + w0) / (wsum + w0)
            out[key] = pred[key] * r
        out["e2e_s"] = out["ttft_s"] + (self.osl - 1) * out["tpot_s"]
        # Next to a measurement the corrected figure is as good as a measurement (noise);
        # far from every one, as good as the fit (its error).
        out["trust"] = wsum / (wsum + w0)
        return out

    # -- what to skip ---------------------------------------------------------------------

    def pruned(self, obs: list[Observation]) -> dict[str, np.ndarray]:
        """Masks over the candidate grid: why each candidate is skipped (True: skipped)."""
        lb = self._bounds = self._lower_bounds(obs)
        lim = self.limits
        cannot_fit = ~self.fits
        for o in obs:
            if o.status in ("oom", "infeasible"):
                # Memory grows with batch and budget: beyond a failure fails too.
                beyond = (self._b >= o.batch) & (self._f >= o.fraction - 1e-9)
                cannot_fit |= beyond
                plan = self._plan_at(o.batch, o.fraction)
                if plan is not None:
                    cannot_fit |= self.plans >= plan
        ok_batches = [o.batch for o in obs if o.status == "ok"]
        for o in obs:
            if o.status in FAILED:
                # Not memory, so no plan says where it ends (nor at which budgets): bisect, in
                # log batch, between the failure and the largest batch that ran below it.
                below = max((b for b in ok_batches if b < o.batch), default=1)
                cannot_fit |= self._b >= max(math.sqrt(below * o.batch), below + 1)
                cannot_fit[self._index(o.batch, o.fraction)] = True
        cannot_meet = np.zeros(self.plans.shape, dtype=bool)
        if lim.max_tpot_ms is not None:
            cannot_meet |= lb["tpot_s"] * 1e3 > lim.max_tpot_ms
        if lim.max_ttft_ms is not None:
            cannot_meet |= lb["ttft_s"] * 1e3 > lim.max_ttft_ms
        if lim.max_latency_s is not None:
            cannot_meet |= lb["e2e_s"] > lim.max_latency_s
        best = max((o.throughput for o in obs if o.feasible), default=None)
        cannot_win = (lb["throughput"] < best) if best is not None else np.zeros_like(cannot_meet)
        return {"cannot_fit": cannot_fit, "cannot_meet": np.broadcast_to(
            cannot_meet, self.plans.shape), "cannot_win": cannot_win}

    def allowed(self, obs: list[Observation]) -> np.ndarray:
        masks = self.pruned(obs)
        return ~(masks["cannot_fit"] | masks["cannot_meet"] | masks["cannot_win"])

    def _index(self, batch: float, fraction: float) -> tuple[int, int]:
        i = int(np.argmin(np.abs(np.log2(self.batches) - math.log2(batch))))
        j = int(np.argmin(np.abs(self.fractions - fraction)))
        return i, j

    def _plan_at(self, batch: float, fraction: float) -> float | None:
        i, j = self._index(batch, fraction)
        return float(self.plans[i, j])

    # -- choosing -------------------------------------------------------------------------

    def suggest(self, obs: list[Observation], at: int | None = None
                ) -> tuple[int, float] | None:
        """The next configuration: the best predicted one that is allowed and untried, for a
        worker whose engine holds budget ``at`` (bytes; None: unknown) where changing it costs
        what the trials measured."""
        with self._lock:
            return self._choose(obs, at)[0]

    def converged(self, obs: list[Observation]) -> bool:
        """Whether nothing is left worth a trial: a feasible best exists, the model was fitted
        on at least ``MIN_FIT_TRIALS`` measured trials, and either no untried configuration
        that can run is expected to beat the best by more than a measurement can tell (or can
        win at all, by the physical bounds), or the last ``PATIENCE`` trials did not beat the
        best before them by more than that. A study may stop here (``--early-stop``)."""
        return self.stop_reason(obs) is not None

    def stop_reason(self, obs: list[Observation]) -> str | None:
        """Why the search may stop now (see :meth:`converged`), in words; None: go on."""
        with self._lock:
            if (why := self._limits_out_of_reach(obs)) is not None:
                return why
            if self._choose(obs)[1]:
                return ("no untried configuration is expected to beat the best by more than a "
                        "measurement can tell")
            if self._far_corner(obs, self.pruned(obs)) is not None:
                return None
            if self.constants.fitted_on >= MIN_FIT_TRIALS and _stalled(obs):
                return (f"the last {PATIENCE} trials found nothing "
                        f"{100 * MIN_ERROR:g}% better than the best before them")
            return None

    def _choose(self, obs: list[Observation], at: int | None = None
                ) -> tuple[tuple[int, float] | None, bool]:
        """The next configuration and whether the search has converged (see above)."""
        self.refit(obs)
        pred = self.corrected()
        masks = self.pruned(obs)
        untried = np.ones(self.plans.shape, dtype=bool)
        for o in obs:  # never the same configuration twice: same batch, same applied budget
            i, j = self._index(o.batch, o.fraction)
            on_grid = abs(self.fractions[j] - o.fraction) < 1e-9
            applied = o.applied if o.applied is not None else (
                self.applied[j] if on_grid else None)  # a trial not run: the candidate's own
            if self.batches[i] == o.batch and applied is not None:
                untried[i, self.applied == applied] = False
        can_run = untried & ~(masks["cannot_fit"] | masks["cannot_meet"])
        if self._unmeetable(masks):  # nothing can: the least violating, as notes() says
            can_run = untried & ~masks["cannot_fit"]
        allowed = can_run & ~masks["cannot_win"]
        c = self.constants
        best = max((o.throughput for o in obs if o.feasible), default=0.0)
        if not can_run.any():
            return None, best > 0
        # Constrained expected improvement: the expected gain over the best feasible trial,
        # times the probability of meeting the limits, both with the corrected model's spread
        # (its error far from measurements, noise next to one). A point at the limit's edge is
        # tried when it may win much.
        mu = pred["throughput"]
        sd = np.maximum(self._spread(c.error, pred) * mu, 1e-12)
        z = (mu - best) / sd
        gain = sd * _pdf(z) + (mu - best) * _cdf(z)
        p_meet = self._meet_probability(pred, c)
        score = np.where(allowed, p_meet * gain, -np.inf)
        exhausted = not allowed.any() or (best > 0 and score.max() < MIN_ERROR**2 * best)
        if exhausted:
            # No untried configuration can win, or is expected to win by more than a
            # measurement can tell. Spend what is left of the budget on the runners-up
            # likeliest to meet the limits, never on what cannot fit.
            likely = can_run & (p_meet >= 0.5)
            score = np.where(likely if likely.any() else can_run, p_meet * mu, -np.inf)
        score = np.where(score > 0, score / self._time_cost(obs, at), score)
        if not (score > 0).any():  # nothing predicted to meet: the nearest to meeting
            score = np.where(can_run, -self._limit_ratio(pred), -np.inf)
        far = self._far_corner(obs, masks)
        stalled = c.fitted_on >= MIN_FIT_TRIALS and _stalled(obs)
        if (exhausted or stalled) and far is not None and can_run[far].any():
            # Done by the model (or stalled), but nothing measured in the far corner: the
            # model (and its calibration) has not been put to the test there. Go there.
            score = np.full(score.shape, -np.inf)
            score[far] = 1.0
            exhausted = False
        # Among equals, the one that streams least: more resident weights are never slower,
        # which a model that takes copies to overlap compute cannot see (on CPU they do not).
        top = np.isfinite(score) & (score >= score.max() - 1e-9 * abs(score.max()))
        if not top.any():
            top = np.zeros(score.shape, dtype=bool)
            top[np.unravel_index(int(np.argmax(score)), score.shape)] = True
        j = int(np.flatnonzero(top.any(axis=0))[-1])
        i = int(np.flatnonzero(top[:, j])[0])
        converged = exhausted and best > 0 and c.fitted_on >= MIN_FIT_TRIALS
        return (int(self.batches[i]), float(round(self.fractions[j], 6))), converged

    def _time_cost(self, obs: list[Observation], at: int | None) -> np.ndarray:
        """Each candidate budget's expected trial time, in trials: 1, plus the measured cost of
        a budget change over the median trial's time where the candidate's applied budget
        differs from ``at`` and that cost is material (``MATERIAL_CHANGE``)."""
        changes = [o.change_s for o in obs if o.change_s is not None]
        trials = [o.seconds for o in obs if o.seconds]
        if at is None or not changes or not trials:
            return np.ones(len(self.fractions))
        ratio = float(np.mean(changes)) / max(float(np.median(trials)), 1e-9)
        if ratio < MATERIAL_CHANGE:
            return np.ones(len(self.fractions))
        moves = np.abs(self.applied - at) > FRACTION_STEP * self.total / 2
        return 1.0 + ratio * moves

    def _unmeetable(self, masks: dict[str, np.ndarray]) -> bool:
        """Whether no configuration that fits can meet the limits, by the lower bounds
        (which step aside for what measured trials showed)."""
        fits = ~masks["cannot_fit"]
        return self.limits.any and fits.any() and not (fits & ~masks["cannot_meet"]).any()

    def _limits_out_of_reach(self, obs: list[Observation]) -> str | None:
        """Why the limits cannot be met, once a measured trial agrees with the bounds that
        say so (the bounds alone may rest on a bad calibration); None: they may be."""
        ran = [o for o in obs if o.status == "ok" and o.tpot_s is not None]
        if not ran or any(o.feasible for o in ran) or not self._unmeetable(self.pruned(obs)):
            return None
        o = min(ran, key=lambda o: o.tpot_s)
        return (f"no configuration that fits can meet the limits {self.limits.as_dict()}: the "
                f"fastest step measured took {1e3 * o.tpot_s:.4g} ms (batch {o.batch}, "
                f"{100 * o.fraction:.0f}% resident, TTFT {1e3 * o.ttft_s:.4g} ms) and by the "
                "bounds nothing can do better; relax the limits")

    def _far_corner(self, obs: list[Observation], masks: dict[str, np.ndarray]
                    ) -> tuple[int, int] | None:
        """The far corner of the space: the largest batch that can run (it fits, lies below
        every failure and could meet the limits) with the largest budget it can run with;
        None once a finished trial has been there or beyond (or nothing can run)."""
        runs = ~(masks["cannot_fit"] | masks["cannot_meet"])
        rows = np.flatnonzero(runs.any(axis=1))
        if not len(rows):
            return None
        i = int(rows[-1])
        j = int(np.flatnonzero(runs[i])[-1])
        for o in obs:
            applied = o.applied if o.applied is not None else round(o.fraction * self.total)
            if (o.status != "running" and o.batch >= self.batches[i]
                    and applied >= self.applied[j]):
                return None
        return i, j

    def _meet_probability(self, pred: dict[str, np.ndarray], c: Constants) -> np.ndarray:
        """Probability that each candidate meets every limit (each figure normal around the
        prediction, with the fit's relative error of that figure as its spread)."""
        lim = self.limits
        p = np.ones(self.plans.shape)
        for limit, value, err in (
                (lim.max_tpot_ms and lim.max_tpot_ms / 1e3, pred["tpot_s"], c.tpot_error),
                (lim.max_ttft_ms and lim.max_ttft_ms / 1e3, pred["ttft_s"], c.ttft_error),
                (lim.max_latency_s, pred["e2e_s"], c.error)):
            if limit is not None:
                sd = self._spread(err, pred) * value
                p = p * _cdf((limit - value) / np.maximum(sd, 1e-12))
        return p

    @staticmethod
    def _spread(error: float, pred: dict[str, np.ndarray]) -> np.ndarray:
        """Relative spread of a corrected prediction: the fit's error far from measurements,
        the measurement noise next to one."""
        trust = pred.get("trust", 0.0)
        return error * (1.0 - trust) + MIN_ERROR * trust

    def _limit_ratio(self, pred: dict[str, np.ndarray]) -> np.ndarray:
        """Predicted figure over limit, the worst of the limits (<= 1: meets them)."""
        lim = self.limits
        ratio = np.zeros(self.plans.shape)
        if lim.max_tpot_ms is not None:
            ratio = np.maximum(ratio, pred["tpot_s"] * 1e3 / lim.max_tpot_ms)
        if lim.max_ttft_ms is not None:
            ratio = np.maximum(ratio, pred["ttft_s"] * 1e3 / lim.max_ttft_ms)
        if lim.max_latency_s is not None:
            ratio = np.maximum(ratio, pred["e2e_s"] / lim.max_latency_s)
        return ratio

    def predicted_attrs(self, batch: int, fraction: float) -> dict[str, Any]:
        """What the model (as refitted so far) predicts of one configuration, for the trial's
        attributes beside the measured figures."""
        with self._lock:
            p = {k: float(v) for k, v in self.predict(np.array(float(batch)),
                                                      np.array(fraction)).items()}
            i, j = self._index(batch, fraction)
            return {
                "predicted_throughput_tok_s": round(p["throughput"], 3),
                "predicted_tpot_ms": round(p["tpot_s"] * 1e3, 3),
                "predicted_ttft_ms": round(p["ttft_s"] * 1e3, 3),
                "predicted_e2e_s": round(p["e2e_s"], 4),
                "prior_fitted_on": self.constants.fitted_on,
                "prior_grid_peak_bytes": int(self.plans[i, j]),
            }

    def describe(self) -> dict[str, Any]:
        c = self.constants
        return {
            "stream_gb_s": round(c.bw / 1e9, 3), "decode_ms": [round(c.alpha * 1e3, 4),
                                                           round(c.beta * 1e3, 5)],
            "prefill_ms": [round(c.pi0 * 1e3, 4), round(c.pi1 * 1e3, 5)],
            "error": round(c.error, 4), "fitted_on": c.fitted_on,
            "calibration": self.calibration.as_dict(), "limits": self.limits.as_dict(),
            "measured_bandwidth": self.measured_bw,
        }

    def nothing_fits(self) -> str | None:
        """Why no trial can run, when not even the smallest configuration fits; else None."""
        if self.available is None or self.fits.any():
            return None
        i, j = np.unravel_index(int(np.argmin(self.plans)), self.plans.shape)
        return (f"nothing fits: the smallest configuration (batch {int(self.batches[i])}, "
                f"{100 * self.fractions[j]:.0f}% resident) needs {self.plans[i, j] / 2**30:.2f} "
                f"GiB of device memory and {max(self.available, 0) / 2**30:.2f} GiB is available "
                "(free memory and --gpu-memory-limit, minus a margin); raise --gpu-memory-limit, "
                "free the GPU, or use a smaller --dtype or model")

    def notes(self) -> list[str]:
        """Warnings about the settings, for the user."""
        out = []
        top = int(np.argmax(self.batches))
        if self.available is not None and self.fits[top, -1]:
            out.append(
                f"the whole model fits with batch {int(self.batches[top])} (predicted peak "
                f"{self.plans[top, -1] / 2**30:.2f} GiB of {self.available / 2**30:.2f} GiB "
                "available): streaming is pointless here; expect the best at budget 100% "
                "(raise --max-batch or lower --gpu-memory-limit to study streaming)")
        if self.limits.any:
            meetable = ~self.pruned([])["cannot_meet"] & self.fits
            if not meetable.any():
                out.append(f"no configuration that fits can meet the limits "
                           f"{self.limits.as_dict()} (bounded by the link and the measured "
                           "compute); the study will find the least violating ones")
        if not self.measured_bw:
            out.append(f"host-to-device bandwidth not measured (no GPU); the prior assumes "
                       f"{ASSUMED_H2D_GB_S:g} GB/s and refits from the trials")
        return out


def _stalled(obs: list[Observation]) -> bool:
    """The last ``PATIENCE`` finished trials found no feasible best above the one before them
    by more than ``MIN_ERROR`` (``obs`` in trial order)."""
    done = [o for o in obs if o.status != "running"]
    if len(done) <= PATIENCE:
        return False
    before = max((o.throughput for o in done[:-PATIENCE] if o.feasible), default=0.0)
    after = max((o.throughput for o in done[-PATIENCE:] if o.feasible), default=0.0)
    return before > 0 and after <= before * (1 + MIN_ERROR)


_erf = np.frompyfunc(math.erf, 1, 1)


def _cdf(z: np.ndarray) -> np.ndarray:
    """The standard normal's distribution function."""
    return 0.5 * (1.0 + np.asarray(_erf(np.asarray(z, float) / math.sqrt(2.0)), float))


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.asarray(z, float) ** 2) / math.sqrt(2.0 * math.pi)


def _fit_bandwidth(s: np.ndarray, tpot: np.ndarray, compute: np.ndarray, bw: float) -> float:
    """Streaming bandwidth from the stream-bound trials (the median of bytes / step time)."""
    bound = (s > 0) & (s / bw >= compute)
    return float(np.median(s[bound] / tpot[bound])) if bound.any() else bw


def _fit_line(b: np.ndarray, t: np.ndarray, stream: np.ndarray, a0: float, a1: float
              ) -> tuple[float, float]:
    """Compute time a0 + a1 * batch from the compute-bound trials (least squares with two or
    more batch sizes, a scale otherwise)."""
    bound = a0 + a1 * b >= stream
    if not bound.any():
        return a0, a1
    bb, tt = b[bound], t[bound]
    if len(set(bb.tolist())) >= 2:
        a1n, a0n = np.polyfit(bb, tt, 1)
        if a1n >= 0 and a0n >= 0:
            return float(a0n), float(a1n)
        # Both constants are times: the best line with the negative one at zero (a noisy
        # trial tilts an unconstrained fit past the origin).
        if a0n < 0:
            return 0.0, float(np.dot(bb, tt) / np.dot(bb, bb))
        return float(np.mean(tt)), 0.0
    k = float(np.median(tt / np.maximum(a0 + a1 * bb, 1e-12)))
    return max(a0 * k, 0.0), max(a1 * k, 0.0)


def candidate_batches(max_batch: int) -> np.ndarray:
    """Every batch size up to ``max_batch`` (log-spaced integers beyond a few hundred)."""
    if max_batch <= MAX_CANDIDATE_BATCHES:
        return np.arange(1, max_batch + 1)
    grid = np.unique(np.round(np.geomspace(1, max_batch, MAX_CANDIDATE_BATCHES)).astype(int))
    return grid


def candidate_fractions() -> np.ndarray:
    return np.round(np.arange(0, 1 + FRACTION_STEP / 2, FRACTION_STEP), 6)


def plan_requests(batches: np.ndarray, fractions: np.ndarray, total: int) -> list[tuple[int, int]]:
    """(batch, budget bytes) of every candidate, row-major [batch, fraction]."""
    budgets = [int(round(f * total)) for f in fractions]
    return [(int(b), budget) for b in batches for budget in budgets]


def build(runner: Any, *, total: int, isl: int, osl: int, max_batch: int, limits: Limits,
          h2d_gb_s: float | None, margin: int, compute: dict[str, Any] | None = None) -> Prior:
    """Measures (through ``runner``: a Worker or an in-process runner) and builds the prior.

    ``compute``: the study's stored calibration, reused (its matmul times) when a run resumes
    or a worker joins, so that every prior of a study reasons from the same measurements (and
    a resumed study that had converged stays converged); the link is this worker's own."""
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
    reply = runner.plan(plan_requests(batches, fractions, total), isl, osl, margin)
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
                 fractions=fractions, applied=applied, streamed=streamed)
