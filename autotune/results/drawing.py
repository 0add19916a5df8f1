"""Draws what a study reasoned about (:class:`autotune.results.surface.Surface`) under its
measured trials: the model's throughput where the memory plan fits, the plan's edge with the
space beyond it greyed, the region the latency limits exclude hatched, and the trials the
model misjudged ringed. :mod:`autotune.results.report` composes the figure around it.

Matplotlib axes in, nothing out: it reads no study and writes no file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from autotune.results.surface import Surface
from autotune.tune.model import predict

# A short study's trials are all labelled with their throughput; a longer one's (a grid) only
# the best and the misjudged, or the labels would hide the picture.
LABEL_ALL_UP_TO = 24


def throughput_norm(values: list[float], surface: Surface | None, top_batch: int) -> Any:
    """One colour scale for the model's surface and the measured dots, so they compare."""
    from matplotlib.colors import Normalize

    values = list(values)
    if surface is not None:
        b, f, pred, fits = surface_grid(surface, top_batch)
        inside = pred["throughput"][fits]
        if inside.size:
            values += [float(inside.min()), float(inside.max())]
    return Normalize(vmin=min(values + [0.0]), vmax=max(values + [1e-9]))


def surface_grid(surface: Surface, top_batch: int) -> tuple[Any, Any, Any, Any]:
    """[nf, nb] batches, fractions, the model's figures and where the plan fits."""
    batches = np.unique(np.geomspace(1, max(top_batch, 2), 160))
    b, f = np.meshgrid(batches, surface.fractions)
    pred = surface.predict(b, f)
    edge = surface.edge_with() if surface.available is not None else np.full(
        surface.fractions.shape, top_batch)
    fits = b <= edge[:, None]
    return b, f, pred, fits


def draw_surface(ax: Any, fig: Any, surface: Surface, top_batch: int, norm: Any,
                 memory_note: str) -> None:
    """The model's throughput where the plan fits, the memory edge, the limits' exclusion."""
    b, f, pred, fits = surface_grid(surface, top_batch)
    z = np.where(fits, pred["throughput"], np.nan)
    cf = ax.contourf(b, 100 * f, z, levels=14, cmap="viridis", norm=norm, alpha=0.55, zorder=1)
    fig.colorbar(cf, ax=ax, pad=0.02,
                 label=f"throughput (tokens/s): model (fill; ±{100 * surface.c.error:.0f}% its "
                       "error) and measured (dots)")
    if surface.available is not None:
        xs, ys = edge_staircase(surface)
        ax.fill_betweenx(ys, xs, 2 * max(top_batch, 2), color="#bdbdbd", alpha=0.6,
                         zorder=1.5, linewidth=0)
        ax.plot(xs, ys, color="#333", linewidth=1.5, zorder=2,
                label="memory edge: the largest batch that fits" + (f" in {memory_note}"
                                                                     if memory_note else "")
                + " (beyond: grey)")
    over = surface.violation(pred) & fits
    if over.any():
        ax.contourf(b, 100 * f, over.astype(float), levels=[0.5, 1.5], colors="none",
                    hatches=["////"], zorder=2.5)
        names = ", ".join(f"--{k.replace('_', '-')} {v:g}"
                          for k, v in surface.limits.as_dict().items())
        ax.fill([], [], facecolor="none", hatch="////", edgecolor="#555",
                label=f"excluded by {names} (the model's prediction)")


def label_trials(ax: Any, ok: list[Any], best: int | None, surface: Surface | None) -> None:
    """Each measured value beside its dot (all of them in a short study; else only the best
    and the misjudged), and a red ring where the model was off by more than its error."""
    misjudged = []
    if surface is not None:
        for p in ok:
            model = float(predict(surface.c, np.asarray(float(p.batch)),
                                  np.asarray(float(p.streamed_bytes or 0)),
                                  surface.osl)["throughput"])
            off = p.throughput_tok_s / model - 1 if model > 0 else 0.0
            if abs(off) > surface.c.error:
                misjudged.append((p, model, off))
    shown = {p.number for p in ok} if len(ok) <= LABEL_ALL_UP_TO else (
        {best} | {p.number for p, _, _ in misjudged})
    placed: list[tuple[float, float]] = []  # (log2 batch, budget %) of labels so far
    for p in sorted(ok, key=lambda p: p.number != best):  # the best's label first
        x, y = float(np.log2(p.batch)), p.budget_pct
        if p.number not in shown or any(abs(x - u) < 0.35 and abs(y - v) < 4 for u, v in placed):
            continue  # a label on top of another hides both
        placed.append((x, y))
        ax.annotate(f"{p.throughput_tok_s:,.0f}", (p.batch, p.budget_pct),
                    textcoords="offset points", xytext=(6, 5), fontsize=7.5, color="#111",
                    zorder=7)
    if misjudged:
        ax.scatter([p.batch for p, _, _ in misjudged], [p.budget_pct for p, _, _ in misjudged],
                   s=170, facecolors="none", edgecolors="#d62728", linewidths=2.0, zorder=5,
                   label=f"measured off the model by more than its error "
                         f"(±{100 * surface.c.error:.0f}%)")
        for p, model, off in misjudged:
            ax.annotate(f"model {model:,.0f} ({100 * off:+.0f}%)", (p.batch, p.budget_pct),
                        textcoords="offset points", xytext=(6, -11), fontsize=7,
                        color="#b01010", zorder=7)


def edge_staircase(surface: Surface) -> tuple[np.ndarray, np.ndarray]:
    """The memory edge as a staircase in (batch, budget %): each candidate fraction's largest
    batch that fits, over its 1% band; NaN where --max-batch, not memory, ends the row (the
    line would claim an edge the plan never met)."""
    edge = surface.edge_with().astype(float)
    edge = np.where(edge >= surface.max_batch, np.nan, np.where(edge > 0, edge, 0.8))
    pct = 100 * surface.fractions
    half = np.diff(pct, prepend=pct[0] - (pct[1] - pct[0]) if len(pct) > 1 else 1) / 2
    ys = np.column_stack([pct - half, pct + half]).ravel()
    xs = np.repeat(edge, 2)
    return xs, ys
