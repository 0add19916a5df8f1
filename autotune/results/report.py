"""Pictures of a stored study: the throughput landscape, the Pareto front, the search's progress.

``write_report(study, out_dir)`` writes three PNGs and one self-contained HTML page (the images
embedded as base64, no external file or script) that a person reads at a glance:

- ``landscape.png``: throughput over batch (log2 axis) x device budget; feasible trials coloured
  by throughput, trials over a latency limit hollow, infeasible / out-of-memory / failed trials
  marked, the best trial (which is
  the recommendation) starred and the "if you can give N GiB" picks ringed;
- ``pareto.png``: throughput against peak device memory, the Pareto front drawn through it;
- ``progress.png``: each trial's throughput and the best so far against the trial number.

The figure functions take :class:`TrialPoint` lists and return matplotlib ``Figure`` objects
rendered with the Agg canvas (no pyplot, no global backend switch), so a notebook can reuse
them. Budgets are the bytes actually applied where a trial ran (the engine rounds to its
streaming unit), the requested bytes where it never ran. Peak memory is the measured peak where
the engine measured one (CUDA), else the memory model's prediction.

This module does not run trials or change the study; it reads it.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.errors import AutotuneError, NoCompletedTrialError, UserInputError
from autotune.results import drawing, recommend
from autotune.results.explain import memory_flag
from autotune.results.surface import Surface
from autotune.units import GiB, format_bytes

FIGURES = ("landscape", "bound", "pareto", "progress")
_FAILED = ("error", "crash", "timeout")
_DPI = 110


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial, flattened for plotting."""

    number: int
    status: str  # ok | infeasible | oom | error | crash | timeout
    batch: int
    budget_pct: float  # % of the streamable weights kept resident
    budget_bytes: int
    throughput_tok_s: float | None  # ok trials only
    peak_memory_bytes: int | None  # measured, else predicted
    peak_measured: bool
    within_limits: bool = True  # met every latency limit of the study (if it ran)
    streamed_bytes: int | None = None  # per decode step, ok trials only
    bound_fraction: float | None = None  # time per token: its bound / measured (roofline)
    bound_by: str | None = None  # what sets the bound: "link" or "HBM"
    precision: str = "none"  # the weights' format (--quantization)

    @property
    def measured(self) -> bool:
        return self.status == "ok" and self.throughput_tok_s is not None

    @property
    def feasible(self) -> bool:
        """Measured and within the latency limits: what a recommendation may pick."""
        return self.measured and self.within_limits

    @property
    def over_limit(self) -> bool:
        return self.measured and not self.within_limits


def points(study: Any) -> list[TrialPoint]:
    """The study's finished trials (running ones have no outcome yet and are left out)."""
    attrs = study.user_attrs
    totals = attrs.get("total_device_budgets") or {}
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if "status" not in a or "batch" not in a:
            continue
        precision = str(a.get("precision", "none"))
        # Each precision's budget is a share of its own streamable bytes.
        total = totals.get(precision, attrs.get("total_device_budget"))
        budget = a.get("budget_applied_bytes", a["budget_bytes"])
        pct = 100 * budget / total if total else a.get("budget_pct", 0.0)
        measured = a.get("peak_device_bytes") or a.get("peak_reserved_bytes")
        peak = measured or a.get("predicted_peak_bytes")
        out.append(TrialPoint(
            number=t.number, status=a["status"], batch=int(a["batch"]), budget_pct=pct,
            budget_bytes=int(budget),
            throughput_tok_s=a.get("throughput_tok_s") if a["status"] == "ok" else None,
            peak_memory_bytes=int(peak) if peak else None, peak_measured=bool(measured),
            within_limits=all(v <= 0 for k, v in (t.constraints or {}).items()
                              if k != "memory_gib"),
            streamed_bytes=a.get("streamed_bytes_per_step") if a["status"] == "ok" else None,
            bound_fraction=a.get("bound_fraction"), bound_by=a.get("bound_by"),
            precision=precision,
        ))
    return out


def recommendation(study: Any) -> dict[str, Any] | None:
    """The study's recommendation (:func:`autotune.results.recommend.build`), None before any
    feasible trial."""
    try:
        return recommend.build(study)
    except NoCompletedTrialError:
        return None


def _mpl() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise AutotuneError(
            "autotune report needs matplotlib: pip install 'matplotlib>=3.7'") from e
    return matplotlib


def _figure(width: float = 8.0, height: float = 5.2) -> Any:
    _mpl()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _subtitle(study: Any) -> str:
    w = study.user_attrs.get("workload", {})
    if not w:
        return study.study_name
    limit = w.get("gpu_memory_limit")
    if w.get("engine") == "landscape":  # say so on every figure: these figures were replayed
        measured = study.user_attrs.get("engine", {}).get("measured_on") or "a GPU"
        return (f"[replay] {w.get('model')} measured on {measured}, replayed here; isl "
                f"{w.get('isl')}, osl {w.get('osl')}, memory limit "
                f"{format_bytes(limit) if limit else 'none'}")
    return (f"{w.get('model')} on {w.get('gpu')} ({w.get('engine')} engine, {w.get('dtype')}), "
            f"isl {w.get('isl')}, osl {w.get('osl')}, "
            f"memory limit {format_bytes(limit) if limit else 'none'}")


def _best(pts: list[TrialPoint], rec: dict[str, Any] | None) -> TrialPoint | None:
    if rec is None:
        return None
    return next((p for p in pts if p.number == rec["best"]["trial"]), None)


def _picks(pts: list[TrialPoint], rec: dict[str, Any] | None) -> list[tuple[int, TrialPoint]]:
    """(memory_gib, point) of each "if you can give N GiB" row."""
    if rec is None:
        return []
    by_number = {p.number: p for p in pts}
    return [(row["memory_gib"], by_number[row["trial"]]) for row in rec["if_you_can_give"]
            if row["trial"] in by_number]


def _unit(largest: float) -> tuple[str, int]:
    """GiB for GPU-sized figures, MiB for the tiny CPU model."""
    return ("GiB", GiB) if largest >= GiB else ("MiB", 2**20)


def _log2_batch_axis(ax: Any, batches: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ax.set_xscale("log", base=2)
    top = max(batches + [1])
    ticks = [2**k for k in range(0, top.bit_length() + 1)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(0.8, 2 ** (top.bit_length()) * 1.1)


def _mark_over_limit(ax: Any, pts: list[TrialPoint], x: Any, y: Any) -> None:
    """Trials that ran but broke a latency limit: hollow, at their measured throughput."""
    sel = [p for p in pts if p.over_limit]
    if sel:
        ax.scatter([x(p) for p in sel], [y(p) for p in sel], s=60, facecolors="none",
                   edgecolors="#d62728", linewidths=1.4, zorder=2,
                   label="ran, but over a latency limit")


def _mark_failures(ax: Any, pts: list[TrialPoint], x: Any, y: Any) -> None:
    """Infeasible, OOM and failed trials, each with its own marker and legend entry."""
    styles = {
        "infeasible": dict(marker="x", color="#d62728", s=46, linewidths=1.6,
                           label="infeasible (predicted not to fit; not run)"),
        "oom": dict(marker="v", color="#8c1010", s=46, label="out of memory"),
        "failed": dict(marker="s", facecolors="none", edgecolors="#7f7f7f", s=40,
                       label="failed (error, crash or timeout)"),
    }
    for kind, style in styles.items():
        sel = [p for p in pts if (p.status in _FAILED if kind == "failed" else p.status == kind)]
        if sel:
            ax.scatter([x(p) for p in sel], [y(p) for p in sel], zorder=3, **style)


# One marker per weight format in a study that searched precision (--quantization a list).
_PRECISION_MARKERS = {"none": "o", "int8": "s", "fp8": "^"}
_PRECISION_NAMES = {"none": "16-bit", "int8": "int8", "fp8": "fp8"}


def figure_landscape(pts: list[TrialPoint], rec: dict[str, Any] | None = None,
                     subtitle: str = "", total_budget: int | None = None,
                     surface: Surface | None = None, memory_note: str = "") -> Any:
    """Throughput over batch (log2) x device budget (% of streamable weights): the measured
    trials on top of what the search reasoned about (``surface``: the model's throughput, the
    memory plan's edge, where the limits exclude), trials the model misjudged ringed."""
    fig = _figure(8.6, 6.0)
    ax = fig.add_subplot()
    ok = [p for p in pts if p.feasible]
    order = list(_PRECISION_MARKERS)
    precisions = sorted({p.precision for p in pts},
                        key=lambda x: order.index(x) if x in order else len(order))
    if len(precisions) > 1:
        # The model's surface and the bytes axis are one precision's: with several, the dots
        # alone, each precision its own marker, budgets as shares of its own bytes.
        surface, total_budget = None, None
    top_batch = max([p.batch for p in pts] + [surface.max_batch if surface else 1])
    norm = drawing.throughput_norm([p.throughput_tok_s for p in ok], surface, top_batch)
    if surface is not None:
        drawing.draw_surface(ax, fig, surface, top_batch, norm, memory_note)
    if ok:
        for precision in precisions:
            mine = [p for p in ok if p.precision == precision]
            marker = _PRECISION_MARKERS.get(precision, "D") if len(precisions) > 1 else "o"
            sc = ax.scatter([p.batch for p in mine], [p.budget_pct for p in mine],
                            c=[p.throughput_tok_s for p in mine], cmap="viridis", norm=norm,
                            s=70, marker=marker, edgecolors="black", linewidths=0.6, zorder=4)
            label = ("measured trial (colour: throughput)" if len(precisions) == 1 else
                     f"{_PRECISION_NAMES.get(precision, precision)} weights "
                     "(colour: throughput)")
            ax.scatter([], [], color="#9e9e9e", edgecolors="black", linewidths=0.6, s=70,
                       marker=marker, label=label)
        if surface is None:
            fig.colorbar(sc, ax=ax, label="throughput (tokens/s)", pad=0.02)
        best = _best(ok, rec)
        drawing.label_trials(ax, ok, best.number if best else None, surface)
    _mark_over_limit(ax, pts, lambda p: p.batch, lambda p: p.budget_pct)
    _mark_failures(ax, pts, lambda p: p.batch, lambda p: p.budget_pct)
    for gib, p in _picks(pts, rec):
        ax.scatter([p.batch], [p.budget_pct], s=230, facecolors="none", edgecolors="#ff7f0e",
                   linewidths=1.8, zorder=5)
        ax.annotate(f"≤ {gib} GiB", (p.batch, p.budget_pct), textcoords="offset points",
                    xytext=(9, -13), fontsize=8, color="#c05a00")
    best = _best(pts, rec)
    if best is not None:
        ax.scatter([best.batch], [best.budget_pct], marker="*", s=420, color="#ffd700",
                   edgecolors="black", linewidths=1.0, zorder=6,
                   label=f"best = recommendation (#{best.number}): batch {best.batch}, "
                         f"budget {best.budget_pct:.0f}%, {best.throughput_tok_s:,.0f} tok/s")
    if _picks(pts, rec):
        ax.scatter([], [], s=120, facecolors="none", edgecolors="#ff7f0e", linewidths=1.8,
                   label='"if you can give N GiB" picks')
    _log2_batch_axis(ax, [p.batch for p in pts] + [top_batch])
    ax.set_ylim(-4, 104)
    ax.set_xlabel("batch size (sequences, log2 scale)")
    ax.set_ylabel("device budget (% of streamable weights resident)" if len(precisions) < 2
                  else "device budget (% of that precision's streamable weights resident)")
    if total_budget:
        name, scale = _unit(total_budget)
        ax.secondary_yaxis("right", functions=(
            lambda pct: pct * total_budget / 100 / scale,
            lambda v: v * scale * 100 / total_budget,
        )).set_ylabel(f"{name} resident (of {format_bytes(total_budget)})", fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    title = ("What the search saw: the model's throughput (fill), the trials (dots)"
             if surface is not None else "Throughput over batch size x weight-streaming budget")
    ax.set_title(title, fontsize=11, loc="left")
    fig.suptitle(subtitle, fontsize=8.5, color="#444", x=0.01, ha="left")
    _legend_below(fig, ax, ncol=2, fontsize=7.5)
    _empty_note(ax, pts)
    return fig


def figure_bound(pts: list[TrialPoint], rec: dict[str, Any] | None = None,
                 subtitle: str = "", bandwidths: dict[str, Any] | None = None) -> Any:
    """Each measured trial's fraction of its own bound (time per token: max(streamed / link,
    resident / HBM) over the measured), against batch: near 100%, only more memory or more
    resident weights help; far below, something else takes the time."""
    fig = _figure(8.6, 4.9)
    ax = fig.add_subplot()
    bounded = [p for p in pts if p.measured and p.bound_fraction is not None]
    styles = {"link": dict(marker="^", label="bound by the link (streamed bytes)"),
              "HBM": dict(marker="o", label="bound by HBM (resident bytes)")}
    sc = None
    for by, style in styles.items():
        sel = [p for p in bounded if p.bound_by == by]
        if sel:
            sc = ax.scatter([p.batch for p in sel], [100 * p.bound_fraction for p in sel],
                            c=[p.budget_pct for p in sel], cmap="cividis", vmin=0, vmax=100,
                            s=60, edgecolors="black", linewidths=0.5, zorder=3, **style)
    if sc is not None:
        fig.colorbar(sc, ax=ax, pad=0.02, label="budget (% resident)")
    best = _best(pts, rec)
    if best is not None and best.bound_fraction is not None:
        ax.scatter([best.batch], [100 * best.bound_fraction], marker="*", s=380,
                   color="#ffd700", edgecolors="black", linewidths=1.0, zorder=4,
                   label=f"best (#{best.number}): {100 * best.bound_fraction:.0f}% of its "
                         f"{best.bound_by} bound")
    ax.axhline(100, color="#d62728", linestyle="--", linewidth=1.2, zorder=2,
               label="the bound (bandwidths measured at the study's start)")
    _log2_batch_axis(ax, [p.batch for p in pts])
    top = max([100 * p.bound_fraction for p in bounded] + [100])
    ax.set_ylim(0, 1.1 * top)
    ax.set_xlabel("batch size (sequences, log2 scale)")
    ax.set_ylabel("fraction of the bound (%)")
    bw = bandwidths or {}
    figures = ", ".join(f"{name} {bw[k]:,.3g} GB/s" for k, name in
                        (("h2d_gb_s", "link"), ("hbm_gb_s", "HBM")) if bw.get(k))
    if not bounded:
        ax.text(0.5, 0.5, "no bound: this study measured no link or HBM bandwidth (CPU)"
                if not figures else "no measured trial yet", transform=ax.transAxes,
                ha="center", va="center", fontsize=11, color="#777")
    return _finish(fig, ax, "How close each trial came to its bound"
                   + (f" ({figures})" if figures else ""), subtitle, pts,
                   ncol=2)


def figure_pareto(pts: list[TrialPoint], rec: dict[str, Any] | None = None,
                  subtitle: str = "", memory_limit: int | None = None) -> Any:
    """Throughput against peak device memory, with the Pareto front."""
    fig = _figure(8.6, 5.6)
    ax = fig.add_subplot()
    ok = [p for p in pts if p.feasible and p.peak_memory_bytes is not None]
    measured = bool(ok) and all(p.peak_measured for p in ok)
    top = max([p.peak_memory_bytes for p in ok] + [1])
    unit, scale = _unit(top)

    def mem(p: TrialPoint) -> float:
        return p.peak_memory_bytes / scale

    if ok:
        ax.scatter([mem(p) for p in ok], [p.throughput_tok_s for p in ok],
                   color="#9e9e9e", s=36, zorder=2, label="measured trial")
    _mark_over_limit(ax, [p for p in pts if p.peak_memory_bytes is not None], mem,
                     lambda p: p.throughput_tok_s)
    by_number = {p.number: p for p in ok}
    front = [by_number[c["trial"]] for c in (rec["pareto_front"] if rec else [])
             if c["trial"] in by_number]
    best = _best(pts, rec)
    if front:
        xs, ys = [mem(p) for p in front], [p.throughput_tok_s for p in front]
        ax.step(xs, ys, where="post", color="#ff7f0e", linewidth=1.6, zorder=3)
        ax.scatter(xs, ys, color="#ff7f0e", edgecolors="black", linewidths=0.5, s=60, zorder=4,
                   label="Pareto front (no trial is faster for less memory)")
        # Label the front with batch and budget, skipping points too close to the last label.
        span_x, span_y = max(xs) - min(xs) or 1.0, max(ys) - min(ys) or 1.0
        last = None
        for p in reversed(front):
            x, y = mem(p), p.throughput_tok_s
            if last and abs(x - last[0]) < 0.06 * span_x and abs(y - last[1]) < 0.06 * span_y:
                continue
            last = (x, y)
            above = best is not None and p.number == best.number
            ax.annotate(f"b{p.batch}, {p.budget_pct:.0f}%", (x, y), textcoords="offset points",
                        xytext=(-8, 10) if above else (6, -11), ha="right" if above else "left",
                        fontsize=7.5, color="#333")
    if best is not None and best.peak_memory_bytes is not None:
        ax.scatter([mem(best)], [best.throughput_tok_s], marker="*", s=420,
                   color="#ffd700", edgecolors="black", linewidths=1.0, zorder=5,
                   label=f"best = recommendation (#{best.number}): "
                         f"{best.throughput_tok_s:,.0f} tok/s at {mem(best):.2f} {unit}")
    if memory_limit and memory_limit <= 1.5 * top:
        ax.axvline(memory_limit / scale, color="#d62728", linestyle="--", linewidth=1.2,
                   label=f"memory limit ({format_bytes(memory_limit)})")
    elif memory_limit:  # far right of every trial: say so rather than squash the points
        ax.plot([], [], color="#d62728", linestyle="--",
                label=f"memory limit ({format_bytes(memory_limit)}, off the right edge)")
    ax.set_xlabel(f"peak device memory ({unit}, " + ("measured)" if measured else
                  "predicted by the memory model where not measured)"))
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_ylim(bottom=0, top=1.08 * max([p.throughput_tok_s for p in pts if p.measured] + [1]))
    return _finish(fig, ax, "Throughput against peak device memory", subtitle, ok,
                   ncol=2)


def figure_progress(pts: list[TrialPoint], subtitle: str = "") -> Any:
    """Each trial's throughput (0 for infeasible/OOM, failed at 0 too) and the best so far."""
    fig = _figure(8.6, 4.9)
    ax = fig.add_subplot()
    pts = sorted(pts, key=lambda p: p.number)
    ok = [p for p in pts if p.feasible]
    if ok:
        ax.scatter([p.number for p in ok], [p.throughput_tok_s for p in ok], color="#1f77b4",
                   s=26, alpha=0.7, zorder=2, label="trial throughput")
    _mark_over_limit(ax, pts, lambda p: p.number, lambda p: p.throughput_tok_s)
    _mark_failures(ax, pts, lambda p: p.number, lambda p: 0.0)
    xs, ys, best = [], [], None
    for p in pts:
        if p.feasible and (best is None or p.throughput_tok_s > best):
            best = p.throughput_tok_s
        if best is not None:
            xs.append(p.number)
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="#2ca02c", linewidth=2.0, zorder=3,
                label=f"best so far (final {ys[-1]:,.0f} tok/s)")
    ax.set_xlabel("trial number")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole: no 0.25
    ax.set_ylabel("throughput (tokens/s)")
    top = max([p.throughput_tok_s for p in pts if p.measured] + [1])
    ax.set_ylim(bottom=-0.03 * top, top=1.06 * top)
    return _finish(fig, ax, "Search progress: best throughput so far", subtitle, pts,
                   ncol=3)


def _finish(fig: Any, ax: Any, title: str, subtitle: str, pts: list[Any], *,
            ncol: int) -> Any:
    """Grid, title, subtitle and a legend below the axes (clear of the points)."""
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=12, loc="left")
    fig.suptitle(subtitle, fontsize=8.5, color="#444", x=0.01, ha="left")
    _legend_below(fig, ax, ncol=ncol, fontsize=8)
    _empty_note(ax, pts)
    return fig


def _legend_below(fig: Any, ax: Any, *, ncol: int, fontsize: float) -> None:
    """The legend under the axes, as the figure's: the constrained layout then gives it
    height. (An axes legend anchored outside made the layout narrow the axes to the legend's
    width instead: long labels squeezed the plot and were still cut at both sides.)"""
    import textwrap

    handles, labels = ax.get_legend_handles_labels()
    if handles:
        width = 110 // ncol  # characters a column holds at these font sizes
        fig.legend(handles, [textwrap.fill(t, width) for t in labels], loc="outside lower center",
                   ncol=ncol, fontsize=fontsize, frameon=False)


def _empty_note(ax: Any, pts: list[Any]) -> None:
    if not pts:
        ax.text(0.5, 0.5, "no trial to show yet", transform=ax.transAxes, ha="center",
                va="center", fontsize=12, color="#777")


def figures(study: Any, rec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The figures of a study, by name (:data:`FIGURES`)."""
    pts = points(study)
    if rec is None:
        rec = recommendation(study)
    sub = _subtitle(study)
    attrs = study.user_attrs
    limit = attrs.get("workload", {}).get("gpu_memory_limit")
    surface = Surface.of(study)
    room = ""
    if surface is not None and surface.available is not None:
        room = f"{format_bytes(surface.available)}" + (
            f" ({memory_flag(limit)} less a margin)" if limit else "")
    return {
        "landscape": figure_landscape(pts, rec, sub, attrs.get("total_device_budget"),
                                      surface, room),
        "bound": figure_bound(pts, rec, sub, attrs.get("bandwidths")),
        "pareto": figure_pareto(pts, rec, sub, limit),
        "progress": figure_progress(pts, sub),
    }


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    pngs: dict[str, Path]


def report_paths(out_dir: str | Path) -> list[Path]:
    """Every file :func:`write_report` writes in ``out_dir``."""
    return [Path(out_dir) / f"{name}.png" for name in FIGURES] + [Path(out_dir) / "report.html"]


def write_report(study: Any, out_dir: str | Path) -> ReportFiles:
    """Writes ``<name>.png`` for each figure and ``report.html`` (self-contained) in out_dir."""
    pts = points(study)
    if not pts:
        raise NoCompletedTrialError(
            f"study {study.study_name} has no finished trial to draw yet; run some first "
            "(autotune run ... --trials N)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out {out}: a file is there; the report is a folder (its "
                             "figures and report.html): give a folder's name")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"--out {out}: cannot make that folder ({e.strerror or e})") from e
    rec = recommendation(study)
    images, pngs = {}, {}
    for name, fig in figures(study, rec).items():
        images[name] = png_bytes(fig)
        pngs[name] = out / f"{name}.png"
        pngs[name].write_bytes(images[name])
    page = out / "report.html"
    page.write_text(_html(study, pts, rec, images), encoding="utf-8")
    return ReportFiles(page, pngs)


_CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%}
code{background:#f3f3f3;padding:2px 4px}.sub{color:#555}"""


def _precision_table(rows: dict[str, Any]) -> list[str]:
    """The best of each precision (8-bit weights), its speed over 16-bit's best and its
    accuracy against 16-bit (the recommendation's ``by_precision``); the Pareto front figure
    spans the precisions."""
    e = html.escape
    out = ["<h2>Best per precision</h2>",
           "<table><tr><th>weights</th><th>trial</th><th>batch</th><th>budget</th>"
           "<th>tokens/s</th><th>x 16-bit</th><th>bound</th><th>top-1 agreement</th>"
           "<th>logits error</th></tr>"]
    for p, row in rows.items():
        b, acc = row.get("best"), row.get("accuracy") or {}
        cells = [e(p), f"#{b['trial']}" if b else "", str(b["batch"]) if b else "",
                 f"{100 * b['budget_fraction']:.0f}%" if b else "",
                 f"{b['throughput_tok_s']:,.1f}" if b else "none feasible",
                 f"{row['speedup_vs_none']:.2f}" if row.get("speedup_vs_none") else "",
                 f"{100 * b['bound_fraction']:.0f}%" if b and b.get("bound_fraction") else "",
                 f"{100 * acc['top1_agreement']:.1f}%" if "top1_agreement" in acc
                 else e(acc.get("reason", "")),
                 f"{acc['logits_rel_error']:.3g}" if "logits_rel_error" in acc else ""]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    weights = {(r.get("accuracy") or {}).get("weights") for r in rows.values()} - {None}
    out.append("</table><p>Accuracy: against 16-bit weights on the same prompts, measured "
               f"once per study on {e(', '.join(sorted(weights)) or 'the study')} weights; "
               "random weights understate a real checkpoint's sensitivity "
               "(docs/quantization.md).</p>")
    return out


def _html(study: Any, pts: list[TrialPoint], rec: dict[str, Any] | None,
          images: dict[str, bytes]) -> str:
    e = html.escape
    counts: dict[str, int] = {}
    for p in pts:
        counts[p.status] = counts.get(p.status, 0) + 1
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>autotune report: {e(study.study_name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>autotune report: {e(study.study_name)}</h1>",
        f'<p class="sub">{e(_subtitle(study))}. Trials: '
        + ", ".join(f"{n} {e(s)}" for s, n in sorted(counts.items())) + ".</p>",
    ]
    if rec is None:
        parts.append("<p><b>No feasible trial yet</b>: nothing to recommend.</p>")
    else:
        b = rec["best"]
        total = rec.get("total_device_budget")
        parts += [
            "<h2>Recommendation</h2>",
            f"<p>Batch <b>{b['batch']}</b>, device budget <b>{e(format_bytes(b['device_budget_bytes']))}</b>"
            + (f" ({100 * b['device_budget_bytes'] / total:.0f}% of {e(format_bytes(total))})"
               if total else "")
            + f": <b>{b['throughput_tok_s']:,.1f} tokens/s</b> (trial #{b['trial']}"
            + (f", peak memory {e(format_bytes(b['peak_memory_bytes']))}"
               if b.get("peak_memory_bytes") else "")
            + (f", {100 * b['bound_fraction']:.0f}% of its {e(b['bound_by'])} bound"
               if b.get("bound_fraction") is not None else "")
            + ").</p>",
            f"<p><b>Why:</b> {e(rec['explanation']['text'])}</p>" if rec.get("explanation")
            else "",
            f"<p>Reproduce: <code>{e(rec['reproduce'])}</code></p>",
        ]
        if rec["if_you_can_give"]:
            parts.append('<table><tr><th>if you can give</th><th>trial</th><th>batch</th>'
                         '<th>budget</th><th>tokens/s</th></tr>')
            for row in rec["if_you_can_give"]:
                parts.append(
                    f"<tr><td>{row['memory_gib']} GiB</td><td>#{row['trial']}</td>"
                    f"<td>{row['batch']}</td><td>{e(format_bytes(row['device_budget_bytes']))}"
                    f"</td><td>{row['throughput_tok_s']:,.1f}</td></tr>")
            parts.append("</table>")
        if rec.get("by_precision"):
            parts += _precision_table(rec["by_precision"])
    captions = {
        "landscape": "Throughput over batch size x device budget: what the search saw",
        "bound": "Fraction of the bound each trial reached",
        "pareto": "Throughput against peak device memory (Pareto front)",
        "progress": "Search progress",
    }
    for name in FIGURES:
        data = base64.b64encode(images[name]).decode("ascii")
        parts.append(f"<h2>{captions[name]}</h2>"
                     f'<img alt="{e(captions[name])}" src="data:image/png;base64,{data}">')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
