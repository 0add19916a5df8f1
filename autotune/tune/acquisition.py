"""The acquisition: what to skip, which configuration to try next, and when to stop.

What it skips, and why that never skips the true optimum:

- *cannot fit*: the engine's memory plan exceeds the headroom (the worker would refuse it
  anyway), or it lies beyond a configuration that ran out of memory (memory grows with batch
  and budget);
- *cannot meet the limits* / *cannot win*: judged with the model's **bounds**
  (:meth:`autotune.tune.model.Model._lower_bounds`), not with the fitted model: physics, with
  slack for measurement noise, so a configuration that really meets the limits or really beats
  the best measured one is kept.

Of what is left, the next is the one with the largest constrained expected improvement
(:meth:`Prior._choose`). The search converges only with evidence from the far corner: the
largest batch that can run, with the largest budget it can run with, has been measured (a
disturbed calibration once made every large batch look hopeless; a model that takes copies to
overlap compute misjudges the budget where they do not, on CPU).
"""

from __future__ import annotations

import math

import numpy as np

from autotune.tune.model import (
    ASSUMED_H2D_GB_S,
    FRACTION_STEP,
    MIN_ERROR,
    Constants,
    Model,
    Observation,
)

# Trial statuses that are failures other than memory (the worker's classification).
FAILED = ("error", "crash", "timeout", "fail")
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
# How a stop for limits out of reach begins (a run says "stopped", not "converged", for it).
OUT_OF_REACH = "no configuration that fits can meet the limits"


class Prior(Model):
    """The model over the candidate grid, and the choice of the next configuration.

    ``incumbent``: the best feasible throughput measured elsewhere (another precision's
    trials, in a study that searches several: :mod:`autotune.tune.precisions`): what this
    grid's candidates must beat besides its own trials. 0 in a study of one precision."""

    incumbent: float = 0.0

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
        if self.incumbent > 0:
            best = max(best or 0.0, self.incumbent)
        cannot_win = (lb["throughput"] < best) if best is not None else np.zeros_like(cannot_meet)
        return {"cannot_fit": cannot_fit, "cannot_meet": np.broadcast_to(
            cannot_meet, self.plans.shape), "cannot_win": cannot_win}

    def allowed(self, obs: list[Observation]) -> np.ndarray:
        masks = self.pruned(obs)
        return ~(masks["cannot_fit"] | masks["cannot_meet"] | masks["cannot_win"])

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
        best = max([self.incumbent, *(o.throughput for o in obs if o.feasible)])
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
        return (f"{OUT_OF_REACH} {self.limits.as_dict()}: the "
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

    def notes(self) -> list[str]:
        """Warnings about the settings, for the user."""
        out = []
        top = int(np.argmax(self.batches))
        if self.available is None:  # CPU without --gpu-memory-limit: nothing bounds memory
            out.append("no memory limit here (no GPU and no --gpu-memory-limit): every "
                       "configuration fits, so streaming is pointless; expect the best at "
                       "budget 100% (give --gpu-memory-limit to study streaming)")
        elif self.fits[top, -1]:
            out.append(
                f"the whole model fits with batch {int(self.batches[top])} (predicted peak "
                f"{self.plans[top, -1] / 2**30:.2f} GiB of {self.available / 2**30:.2f} GiB "
                "available): streaming is pointless here; expect the best at budget 100% "
                "(raise --max-batch or lower --gpu-memory-limit to study streaming)")
        if self.limits.any:
            meetable = ~self.pruned([])["cannot_meet"] & self.fits
            if not meetable.any():
                out.append(f"{OUT_OF_REACH} "
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
