"""What a study knew of the whole batch x budget space, rebuilt from its attributes alone.

At its start a study stores the memory plan's feasibility edge (``memory_edge``: the largest
batch that fits at each budget, what one more sequence costs there, the bytes streamed per
step) and after every trial the refitted performance model (``prior``: link GB/s, decode and
prefill coefficients, its error), beside its latency limits (``workload``). :class:`Surface`
reads them back and answers what the report draws and the recommendation explains: the model's
throughput at any configuration, where memory ends, where the limits exclude, and the model's
best with more memory or looser limits. It needs no worker and works on any storage.

It predicts with the fitted model alone (:func:`autotune.tune.model.predict`), without the
local correction the search adds near measured trials: what it says between trials is the
model's, and the report shows where a trial disagrees with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from autotune.tune.model import Constants, Limits, predict
from autotune.units import GiB


@dataclass(frozen=True)
class Best:
    """The model's best configuration under some memory and limits."""

    batch: int
    fraction: float
    throughput: float  # tok/s, predicted


class Surface:
    """The model and the memory edge of a study (see the module docstring)."""

    def __init__(self, constants: Constants, edge: dict[str, Any], limits: Limits, osl: int,
                 total: int) -> None:
        self.c, self.limits, self.osl, self.total = constants, limits, osl, total
        self.fractions = np.asarray(edge["fractions"], float)
        self.edge = np.asarray(edge["edge_batch"], np.int64)
        self.per_sequence = np.asarray(edge["bytes_per_sequence"], float)
        self.edge_peak = np.asarray([np.nan if p is None else p for p in edge["edge_peak_bytes"]],
                                    float)
        self.streamed = np.asarray(edge["streamed_bytes"], float)
        self.applied = np.asarray(edge.get("applied_bytes") or
                                  np.round(self.fractions * total), np.int64)
        self.available = edge.get("available_bytes")
        self.max_batch = int(edge["max_batch"])

    @classmethod
    def of(cls, study: Any) -> Surface | None:
        """The study's surface; None where it stored no fitted model or memory edge (a study
        whose prior failed, or one made before these were stored)."""
        a = study.user_attrs
        prior, edge, total = a.get("prior"), a.get("memory_edge"), a.get("total_device_budget")
        if not (isinstance(prior, dict) and "decode_ms" in prior and isinstance(edge, dict)
                and total):
            return None
        w = a.get("workload", {})
        limits = {k: v for k, v in (w.get("limits") or {}).items() if k in Limits.__annotations__}
        return cls(Constants.from_description(prior), edge, Limits(**limits),
                   int(w.get("osl", 1)), int(total))

    # -- lookups --------------------------------------------------------------------------

    def index(self, fraction: float) -> int:
        """The candidate fraction nearest ``fraction``."""
        return int(np.argmin(np.abs(self.fractions - fraction)))

    def streamed_at(self, fraction: float | np.ndarray) -> np.ndarray:
        return np.interp(fraction, self.fractions, self.streamed)

    def predict(self, batch: float | np.ndarray, fraction: float | np.ndarray
                ) -> dict[str, np.ndarray]:
        b = np.asarray(batch, float)
        return predict(self.c, b, self.streamed_at(np.asarray(fraction, float)), self.osl)

    def violation(self, pred: dict[str, np.ndarray], scale: float = 1.0) -> np.ndarray:
        """Where the predicted figures break a limit (each limit times ``scale``)."""
        lim, out = self.limits, np.zeros(np.shape(pred["tpot_s"]), bool)
        if lim.max_tpot_ms is not None:
            out |= pred["tpot_s"] * 1e3 > lim.max_tpot_ms * scale
        if lim.max_ttft_ms is not None:
            out |= pred["ttft_s"] * 1e3 > lim.max_ttft_ms * scale
        if lim.max_latency_s is not None:
            out |= pred["e2e_s"] > lim.max_latency_s * scale
        return out

    def edge_with(self, extra_bytes: float = 0.0, max_batch: int | None = None) -> np.ndarray:
        """The largest batch that fits at each candidate fraction with ``extra_bytes`` more
        memory, up to ``max_batch`` (default: the one searched): beyond the edge's plan, each
        sequence costs the plan's slope there. Where the memory is not known (no limit and no
        GPU), every batch up to ``max_batch`` fits."""
        top = max_batch or self.max_batch
        if self.available is None:
            return np.full(self.edge.shape, top, np.int64)
        if extra_bytes <= 0 and top <= self.max_batch:
            return np.minimum(self.edge, top)
        # Where memory ended the edge, the next sequence did not fit: only the extra bytes
        # hold more. Where the searched max_batch ended it, the room left counts too.
        room = np.where(self.edge >= self.max_batch,
                        self.available - self.edge_peak, 0.0) + extra_bytes  # NaN: none fits
        more = np.floor(np.where(self.per_sequence > 0, room, 0.0)
                        / np.maximum(self.per_sequence, 1.0))
        grown = np.where(np.isfinite(more) & (self.edge > 0), self.edge + np.maximum(more, 0), 0)
        return np.minimum(grown, top).astype(np.int64)

    def best(self, extra_bytes: float = 0.0, limit_scale: float = 1.0,
             max_batch: int | None = None, walls: tuple[tuple[int, float], ...] = ()
             ) -> Best | None:
        """The model's best configuration within the memory (plus ``extra_bytes``), the limits
        (times ``limit_scale``; ``math.inf``: none) and ``max_batch`` (default: the one
        searched), below every wall: a (batch, fraction) that ran out of memory (memory grows
        with batch and budget: whatever lies beyond it fails too; not with more memory). None
        where nothing fits and meets them."""
        edge = self.edge_with(extra_bytes, max_batch)
        if extra_bytes <= 0:
            for batch, fraction in walls:
                edge = np.where(self.fractions >= fraction - 1e-9,
                                np.minimum(edge, batch - 1), edge)
        best = None
        for j, top in enumerate(edge):
            if top < 1:
                continue
            b = np.arange(1, int(top) + 1, dtype=float)
            pred = self.predict(b, np.full(b.shape, self.fractions[j]))
            tput = np.where(self.violation(pred, limit_scale), -np.inf, pred["throughput"])
            k = int(np.argmax(tput))
            if np.isfinite(tput[k]) and (best is None or tput[k] > best.throughput * (1 + 1e-9)):
                best = Best(int(b[k]), float(self.fractions[j]), float(tput[k]))
        return best

    def sequences_per_gib(self, fraction: float) -> float | None:
        """Sequences one more GiB holds at ``fraction`` (the plan's slope at the edge)."""
        cost = self.per_sequence[self.index(fraction)]
        return GiB / cost if cost > 0 else None
