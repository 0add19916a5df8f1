"""The performance model: every candidate configuration predicted from the measured hardware.

From the calibration (:mod:`autotune.measure.calibration`) and the engine's memory plans, with
the bytes the engine would stream at each budget where it says (weights it reads on the host, as
the native engine's embedding, are not streamed), a step of decode takes ``max(streamed bytes /
bandwidth, alpha + beta * batch)`` (copies overlap compute on the side stream) and prefill
``max(streamed / bandwidth, pi0 + pi1 * batch)``; throughput, TTFT, TPOT and end-to-end latency
follow (:meth:`Model.predict`). After each trial the constants
are refitted from the measured trials (:meth:`Model.refit`), and a local correction (measured over
predicted, weighted by distance) makes the model agree with what it has seen
(:meth:`Model.corrected`).

Beside the fitted model, **bounds**: the link's measured bandwidth (x 1.15) and the measured
matmul time (x 0.8) give the fastest any configuration could possibly be
(:meth:`Model._lower_bounds`); they never rest on a figure a measured trial contradicts
(:meth:`Model.contradiction`). What the search skips on them is :mod:`autotune.tune.acquisition`'s.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from autotune.errors import UserInputError
from autotune.measure.calibration import Calibration
from autotune.units import format_bytes

# Used only when the bandwidth was not measured (CPU studies): PCIe 4.0 x16 in practice.
ASSUMED_H2D_GB_S = 25.0
# Slack of the pruning bounds: the measured copy bandwidth can be beaten by ~10% in a noisy
# measurement; the measured matmuls can be ~20% slower alone than inside a captured graph.
BW_SLACK = 1.15
COMPUTE_SLACK = 0.8
FRACTION_STEP = 0.01
MAX_CANDIDATE_BATCHES = 400
# Length scale of the local correction in the normalized (log2 batch, fraction) square.
CORRECTION_SCALE = 0.08
# The fitted model's relative error is taken to lie in this range (measurement noise is ~1%).
MIN_ERROR, MAX_ERROR = 0.01, 0.15


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
    precision: str = "none"  # the weights' precision (--quantization)

    @classmethod
    def from_trial(cls, t: Any) -> Observation | None:
        a, params = t.user_attrs, t.params
        if "batch" not in params or "budget_fraction" not in params:
            return None
        batch, fraction = int(params["batch"]), float(params["budget_fraction"])
        precision = str(params.get("precision", a.get("precision", "none")))
        status = a.get("status", t.state.name.lower())  # "running": asked, not finished
        applied = a.get("budget_applied_bytes")
        costs = {"seconds": a.get("elapsed_s"),
                 "change_s": a.get("budget_change_s") if a.get("budget_changed") else None,
                 "precision": precision}
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

    @classmethod
    def from_description(cls, d: dict[str, Any]) -> Constants:
        """The constants of a stored :meth:`Model.describe` (the study's ``prior``)."""
        (alpha, beta), (pi0, pi1) = d["decode_ms"], d["prefill_ms"]
        return cls(bw=d["stream_gb_s"] * 1e9, alpha=alpha / 1e3, beta=beta / 1e3,
                   pi0=pi0 / 1e3, pi1=pi1 / 1e3, error=d.get("error", 0.05),
                   fitted_on=d.get("fitted_on", 0))


def predict(c: Constants, b: np.ndarray, streamed: np.ndarray, osl: int) -> dict[str, np.ndarray]:
    """The model's figures (seconds, tok/s) at batches ``b`` streaming ``streamed`` bytes a
    step: copies overlap compute, so each phase takes the longer of the two."""
    stream = streamed / c.bw
    tpot = np.maximum(stream, c.alpha + c.beta * b)
    ttft = np.maximum(stream, c.pi0 + c.pi1 * b)
    e2e = ttft + (osl - 1) * tpot
    return {"tpot_s": tpot, "ttft_s": ttft, "e2e_s": e2e, "throughput": b * osl / e2e}


class Model:
    """Predictions over the candidate grid: the fitted model, its local correction and the
    bounds (:class:`autotune.tune.acquisition.Prior` chooses from them)."""

    def __init__(self, *, calibration: Calibration, plans: np.ndarray, available: int | None,
                 total: int, isl: int, osl: int, max_batch: int, limits: Limits | None = None,
                 batches: np.ndarray | None = None, fractions: np.ndarray | None = None,
                 applied: np.ndarray | None = None, streamed: np.ndarray | None = None,
                 least_plan: dict[str, int] | None = None) -> None:
        self.least_plan = least_plan  # the smallest plan's parts (MemoryPlan.as_dict)
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
        return predict(c or self.constants, b,
                       self.streamed_bytes(f) if streamed is None else streamed, self.osl)

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

    def _index(self, batch: float, fraction: float) -> tuple[int, int]:
        i = int(np.argmin(np.abs(np.log2(self.batches) - math.log2(batch))))
        j = int(np.argmin(np.abs(self.fractions - fraction)))
        return i, j

    def _plan_at(self, batch: float, fraction: float) -> float | None:
        i, j = self._index(batch, fraction)
        return float(self.plans[i, j])

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

    def memory_edge(self) -> dict[str, Any]:
        """The memory plan's feasibility edge, compact enough for a study attribute: at each
        candidate fraction, the largest candidate batch whose plan fits the headroom (0: none),
        its plan, and what one more sequence costs there (bytes, the plan's slope), with the
        bytes streamed per step and the budget applied. What a report draws and a
        recommendation explains, without a worker (:mod:`autotune.results.surface`)."""
        nb = len(self.batches)
        edge, peak, per_sequence = [], [], []
        for j in range(len(self.fractions)):
            rows = np.flatnonzero(self.fits[:, j])
            i = int(rows[-1]) if len(rows) else -1
            edge.append(int(self.batches[i]) if i >= 0 else 0)
            peak.append(int(self.plans[i, j]) if i >= 0 else None)
            # The slope between two batches that fit (the edge and about half of it): the
            # plan beyond the edge may jump (a replayed landscape's next grid point).
            hi = max(i, 1) if nb >= 2 else 0
            lo = int(np.searchsorted(self.batches, self.batches[hi] / 2)) if i >= 1 else 0
            lo = min(lo, hi - 1) if hi >= 1 else 0
            slope = 0.0
            if hi > lo:
                slope = ((self.plans[hi, j] - self.plans[lo, j])
                         / float(self.batches[hi] - self.batches[lo]))
            per_sequence.append(int(round(slope)))
        return {"available_bytes": self.available, "max_batch": self.max_batch,
                "fractions": [round(float(f), 6) for f in self.fractions],
                "edge_batch": edge, "edge_peak_bytes": peak, "bytes_per_sequence": per_sequence,
                "streamed_bytes": [int(round(x)) for x in self.streamed_bytes(self.fractions)],
                "applied_bytes": [int(x) for x in self.applied]}

    def nothing_fits(self) -> str | None:
        """Why no trial can run, when not even the smallest configuration fits; else None."""
        if self.available is None or self.fits.any():
            return None
        i, j = np.unravel_index(int(np.argmin(self.plans)), self.plans.shape)
        parts = ""
        if self.least_plan:  # where it goes: the engine's own memory is often most of it
            parts = " (" + ", ".join(
                f"{name.replace('_', ' ').replace('kv', 'KV')} {format_bytes(v)}"
                for name, v in self.least_plan.items() if name != "total" and v) + ")"
        return (f"nothing fits: the smallest configuration (batch {int(self.batches[i])}, "
                f"{100 * self.fractions[j]:.0f}% resident) needs {format_bytes(self.plans[i, j])} "
                f"of device memory{parts} and {format_bytes(max(self.available, 0))} is "
                "available (free memory and --gpu-memory-limit, minus a margin); raise "
                "--gpu-memory-limit, free the GPU, or use a smaller --dtype or model")


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
