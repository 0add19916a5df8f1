"""Precision as a third axis of the search: one prior per precision, one choice across them.

A study given several precisions (``--quantization none,int8,fp8``) searches batch x budget
fraction x precision. Each precision has its own candidate grid and prior
(:class:`autotune.tune.acquisition.Prior`): its own memory plans and bytes streamed at each
budget (8-bit weights stream about half of 16-bit's), its own fitted constants and bounds,
from its own trials; the matmul calibration is measured once and shared (a widened 8-bit
matmul is never faster than the 16-bit one it becomes, so the 16-bit timings stay a lower
bound). What ties them together:

- *cannot win* is judged against the best feasible trial of **any** precision (each prior's
  ``incumbent``), so a precision whose physical bounds cannot beat another precision's
  measured best costs no trial;
- the next configuration is the one, among the precisions whose search is not done, that its
  own prior chooses and predicts fastest (a precision not tried yet wins a tie: its
  prediction counts 1% more);
- the study may stop once every precision is done: its own prior has converged (or stalled,
  or its limits are out of reach), or nothing in its grid can beat the best measured by the
  bounds.

A study of one precision uses its :class:`Prior` directly, exactly as before.
"""

from __future__ import annotations

from typing import Any

from autotune.tune.acquisition import Prior
from autotune.tune.model import MIN_ERROR, Observation


class PrecisionPriors:
    """The priors of a study's precisions, behind the interface of one :class:`Prior`
    (``suggest`` answers ``(batch, fraction, precision)``)."""

    def __init__(self, priors: dict[str, Prior]) -> None:
        assert priors
        self.priors = priors
        self.precisions = tuple(priors)
        first = priors[self.precisions[0]]
        self.max_batch = first.max_batch
        self.recalibrations = 0

    # -- the shared calibration -----------------------------------------------------------

    @property
    def calibration(self) -> Any:
        return self.priors[self.precisions[0]].calibration

    def recalibrate(self, calibration: Any) -> None:
        for prior in self.priors.values():
            prior.recalibrate(calibration)

    def contradiction(self, obs: list[Observation]) -> str | None:
        for p, prior in self.priors.items():
            why = prior.contradiction(self._of(obs, p))
            if why is not None:
                return f"{p}: {why}"
        return None

    # -- observations by precision --------------------------------------------------------

    @staticmethod
    def _of(obs: list[Observation], precision: str) -> list[Observation]:
        return [o for o in obs if o.precision == precision]

    def _incumbents(self, obs: list[Observation]) -> None:
        """Each prior's incumbent: the best feasible trial of the other precisions."""
        for p, prior in self.priors.items():
            prior.incumbent = max((o.throughput for o in obs
                                   if o.feasible and o.precision != p and o.throughput),
                                  default=0.0)

    def refit(self, obs: list[Observation]) -> None:
        for p, prior in self.priors.items():
            prior.refit(self._of(obs, p))

    # -- choosing -------------------------------------------------------------------------

    def _done(self, prior: Prior, own: list[Observation]) -> str | None:
        """Why one precision's search is over (None: it goes on)."""
        why = prior.stop_reason(own)
        if why is not None:
            return why
        if prior.incumbent > 0:
            with prior._lock:
                if not prior.allowed(own).any():
                    return (f"by the bounds nothing can beat the best measured "
                            f"({prior.incumbent:.4g} tok/s)")
        return None

    def suggest(self, obs: list[Observation], at: int | None = None
                ) -> tuple[int, float, str] | None:
        """The next configuration: each precision's own choice, the one predicted fastest
        among the precisions whose search is not done (all of them when every one is)."""
        self._incumbents(obs)
        picks = []
        for order, (p, prior) in enumerate(self.priors.items()):
            own = self._of(obs, p)
            with prior._lock:
                pick = prior._choose(own)[0]
                if pick is None:
                    continue
                pred = prior.corrected()
                i, j = prior._index(*pick)
                mu = float(pred["throughput"][i, j])
            done = self._done(prior, own) is not None
            if not any(o.status != "running" for o in own):
                mu *= 1 + MIN_ERROR  # among equals, a precision not tried yet goes first
            picks.append((done, -mu, order, p, pick))
        if not picks:
            return None
        _, _, _, p, (batch, fraction) = min(picks)
        return batch, fraction, p

    def stop_reason(self, obs: list[Observation]) -> str | None:
        """Why the whole search may stop: every precision is done; None: go on."""
        self._incumbents(obs)
        reasons = []
        for p, prior in self.priors.items():
            why = self._done(prior, self._of(obs, p))
            if why is None:
                return None
            reasons.append(f"{p}: {why}")
        return "; ".join(reasons)

    def converged(self, obs: list[Observation]) -> bool:
        return self.stop_reason(obs) is not None

    def nothing_fits(self) -> str | None:
        whys = [prior.nothing_fits() for prior in self.priors.values()]
        if any(w is None for w in whys):
            return None
        return whys[0]

    def notes(self) -> list[str]:
        out: list[str] = []
        for p, prior in self.priors.items():
            for note in prior.notes():
                if note not in out and not note.startswith("host-to-device"):
                    out.append(f"{p}: {note}")
        first = self.priors[self.precisions[0]].notes()
        out += [n for n in first if n.startswith("host-to-device")]
        return out

    def predicted_attrs(self, batch: int, fraction: float, precision: str) -> dict[str, Any]:
        return self.priors[precision].predicted_attrs(batch, fraction)

    def describe(self) -> dict[str, Any]:
        """The first precision's description (what a one-precision study stores), and every
        precision's under ``precisions``."""
        first = self.priors[self.precisions[0]].describe()
        return {**first, "precisions": {p: prior.describe()
                                        for p, prior in self.priors.items()}}

    def memory_edge(self) -> dict[str, Any]:
        return self.priors[self.precisions[0]].memory_edge()

    def memory_edges(self) -> dict[str, Any]:
        return {p: prior.memory_edge() for p, prior in self.priors.items()}


def best_by_precision(obs: list[Observation]) -> dict[str, float]:
    """The best feasible throughput measured at each precision."""
    out: dict[str, float] = {}
    for o in obs:
        if o.feasible and o.throughput:
            out[o.precision] = max(out.get(o.precision, 0.0), o.throughput)
    return out

