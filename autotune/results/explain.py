"""Why the best configuration is the best: what limits it, and what would move it.

One or two sentences a user can hand on when justifying a GPU budget, from the study's own
data only: the memory plan's edge (``memory_edge``), the fitted model (``prior``), the latency
limits, the trials that ran out of memory and the best trial's fraction of its bound. Every
figure said comes from one of them, and those from the model say so. The kinds, in the order
they are decided:

- ``latency``: a limit costs throughput (the model, without the limits, puts the best more than
  its error higher): which limit, and what it allows: at most X GB streamed per step, so Y% of
  the weights must stay resident; or at most batch K, where compute sets the step's time;
- ``max_batch``: the best is at ``--max-batch`` while the memory holds more sequences;
- ``memory``: neither a larger batch nor more resident weights fit beside it: what it streams
  and at what fraction of the link, and what each extra GiB buys (sequences, from the memory
  plan; tok/s, from the model);
- ``model``: none of these binds; the model puts nothing within them above the best by more
  than its error.

This module reads a study; it changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from autotune.results.surface import Surface
from autotune.units import GiB, format_bytes, size_as_typed

_LIMIT_FLAGS = {"max_tpot_ms": ("--max-tpot-ms", "TPOT", "ms"),
                "max_ttft_ms": ("--max-ttft-ms", "TTFT", "ms"),
                "max_latency_s": ("--max-latency-s", "latency", "s")}
# A limit looser by this much is what "what would move it" is priced at.
LOOSER = 1.1


@dataclass(frozen=True)
class _Best:
    """The recommendation's best, with its trial's attributes."""

    trial: int
    batch: int
    fraction: float
    budget_bytes: int
    throughput: float
    attrs: dict[str, Any]


def _about(x: float) -> str:
    """Two significant figures, as a person says "about"."""
    if x == 0 or not math.isfinite(x):
        return f"{x:.0f}"
    digits = max(0, 1 - int(math.floor(math.log10(abs(x)))))
    return f"{round(x, digits):,.{digits}f}"


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def explain(study: Any, rec: dict[str, Any]) -> dict[str, Any]:
    """The ``explanation`` of a recommendation: ``kind``, ``text`` and the figures said."""
    b = rec["best"]
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == b["trial"])
    best = _Best(b["trial"], int(b["batch"]), float(b["budget_fraction"]),
                 int(b["device_budget_bytes"]), float(b["throughput_tok_s"]), trial.user_attrs)
    surface = Surface.of(study)
    attrs = study.user_attrs
    workload = attrs.get("workload", {})
    for why in (_unexplored, _latency, _max_batch, _memory, _model):
        out = why(best, surface, study, workload)
        if out is not None:
            out["text"] = out["text"].rstrip(".") + "."
            return {k: v.item() if hasattr(v, "item") else v for k, v in out.items()}  # JSON
    raise AssertionError("_model always explains")  # pragma: no cover


# -- the kinds, in order -------------------------------------------------------------------


def _unexplored(best: _Best, s: Surface | None, study: Any, workload: dict[str, Any]
                ) -> dict[str, Any] | None:
    """The model expects an untried configuration (that fits, meets the limits and lies below
    every failure) to beat the best by more than its error: the search stopped short."""
    if s is None:
        return None
    here = max(float(s.predict(best.batch, best.fraction)["throughput"]), best.throughput)
    better = s.best(walls=_walls(study))
    if better is None or better.throughput <= here * (1 + s.c.error):
        return None
    return {"kind": "unexplored", "text": (
        f"not yet the optimum: the model expects batch {better.batch} at "
        f"{_pct(better.fraction)} resident (untried) to reach about {_about(better.throughput)} "
        f"tok/s, {_signed(better.throughput - best.throughput)} over the best measured (batch "
        f"{best.batch}, {_pct(best.fraction)} resident), more than its {_pct(s.c.error)} error: "
        "run more trials (--trials) to measure it"),
        "model_batch": better.batch, "model_fraction": better.fraction,
        "model_tok_s": round(better.throughput, 1)}


def _latency(best: _Best, s: Surface | None, study: Any, workload: dict[str, Any]
             ) -> dict[str, Any] | None:
    limits = workload.get("limits") or {}
    if not limits:
        return None
    ratios = {k: _measured(best, k) / v for k, v in limits.items()
              if _measured(best, k) is not None}
    if not ratios:
        return None
    key = max(ratios, key=ratios.get)  # the limit the best comes closest to
    flag, what, unit = _LIMIT_FLAGS[key]
    limit = limits[key]
    if s is not None:
        free = s.best(limit_scale=math.inf, walls=_walls(study))
        here = float(s.predict(best.batch, best.fraction)["throughput"])
        if free is None or free.throughput <= here * (1 + s.c.error):
            return None  # the model says the limits cost nothing measurable
    elif ratios[key] < 0.9:
        return None
    text = (f"latency-bound: {flag} {limit:g} holds the best (batch {best.batch}, "
            f"{_pct(best.fraction)} resident) at {what} {_measured(best, key):.4g} {unit}, "
            f"{_pct(ratios[key])} of the limit")
    figures: dict[str, Any] = {"limit": f"{flag} {limit:g}", "limit_ratio": round(ratios[key], 4)}
    if s is not None and key in ("max_tpot_ms", "max_ttft_ms"):
        seconds = limit / 1e3
        fixed, per_seq = ((s.c.alpha, s.c.beta) if key == "max_tpot_ms" else (s.c.pi0, s.c.pi1))
        stream = float(s.streamed_at(best.fraction)) / s.c.bw
        if stream >= fixed + per_seq * best.batch:  # the copy sets the step's time
            most = seconds * s.c.bw
            need = s.fractions[s.streamed <= most]
            resident = float(need[0]) if len(need) else None
            text = (f"latency-bound: {flag} {limit:g} allows at most {_gb(most)} streamed per "
                    f"step (at the link's {s.c.bw / 1e9:.3g} GB/s, fitted on the trials)")
            text += (f", so at least {_pct(resident)} of the weights must stay resident; the best "
                     f"keeps {_pct(best.fraction)} at batch {best.batch}" if resident is not None
                     else ", less than any budget streams")
            figures.update(max_streamed_bytes=int(most), min_resident_fraction=resident)
        elif per_seq > 0:  # compute sets it: the batch is what the limit caps
            top = max(0, math.floor((seconds - fixed) / per_seq))
            text = (f"latency-bound: {flag} {limit:g} allows at most batch {top} (a "
                    f"{'decode step' if key == 'max_tpot_ms' else 'prefill'} computes for "
                    f"{1e3 * fixed:.3g} ms + {1e3 * per_seq:.3g} ms per sequence, from the model)"
                    f"; the best runs batch {best.batch} at {_pct(best.fraction)} resident")
            figures["max_batch_within_limit"] = top
    if s is not None:
        looser = s.best(limit_scale=LOOSER, walls=_walls(study))
        here = float(s.predict(best.batch, best.fraction)["throughput"])
        if looser is not None and looser.throughput > here * (1 + s.c.error):
            # A gain, not the model's own figure: where the model's level strays from the
            # measured best, "about N tok/s" would read as less than the best.
            text += (f"; {flag} {limit * LOOSER:g} would allow about "
                     f"{_signed(looser.throughput - here)} tok/s (from the model)")
            figures["looser_limit_tok_s"] = round(looser.throughput, 1)
        elif looser is not None:
            text += (f"; {flag} {limit * LOOSER:g} would gain less than the model's error "
                     f"({_pct(s.c.error)})")
    return {"kind": "latency", "text": text, **figures}


def _max_batch(best: _Best, s: Surface | None, study: Any, workload: dict[str, Any]
               ) -> dict[str, Any] | None:
    top = workload.get("max_batch")
    if not top or best.batch < top:
        return None
    text = f"bound by --max-batch {top}: it is the largest batch searched"
    figures: dict[str, Any] = {"limit": f"--max-batch {top}"}
    if s is not None:
        wider = s.best(max_batch=8 * top, walls=_walls(study))  # the memory's reach
        here = float(s.predict(best.batch, best.fraction)["throughput"])
        if wider is not None and wider.batch > top:
            gain = wider.throughput - here
            said = (f"about {_signed(gain)} tok/s there, from the model"
                    if gain > here * s.c.error else
                    f"the model expects no gain beyond its error, {_pct(s.c.error)}")
            text += (f", and the memory plan holds about {wider.batch} sequences at "
                     f"{_pct(wider.fraction)} resident: raise --max-batch ({said})")
            figures["memory_holds_batch"] = wider.batch
            figures["model_tok_s"] = round(wider.throughput, 1)
        else:
            text += ", and the memory holds no more sequences beside it"
    return {"kind": "max_batch", "text": text, **figures}


def _memory(best: _Best, s: Surface | None, study: Any, workload: dict[str, Any]
            ) -> dict[str, Any] | None:
    wall = _failed_beyond(best, study)
    at_batch_edge = at_budget_edge = False
    if s is not None and s.available is not None:
        j = s.index(best.fraction)
        at_batch_edge = best.batch >= s.edge[j]
        higher = [k for k in range(j + 1, len(s.fractions)) if s.applied[k] > best.budget_bytes]
        at_budget_edge = bool(higher) and s.edge[higher[0]] < best.batch
    if wall is not None and wall[0] <= best.batch + max(1, best.batch // 20):
        at_batch_edge = True
    if not (at_batch_edge or at_budget_edge):
        return None
    room = _room(s, study, workload)
    where = (f"batch {best.batch} with {_pct(best.fraction)} of the weights resident"
             if best.fraction > 0 else f"batch {best.batch}")
    if best.fraction >= 1.0:
        where = f"batch {best.batch} with every weight resident"
    if at_batch_edge and at_budget_edge:
        what = f"neither a larger batch nor more resident weights fit in {room}"
    elif at_batch_edge:
        what = f"the largest batch that fits in {room} at this budget"
    else:
        what = f"more resident weights do not fit beside it in {room}"
    text = f"memory-bound at {where}: {what}"
    figures: dict[str, Any] = {"limit": room}
    if wall is not None:
        text += (f" (batch {wall[0]} " + ("ran out of memory" if wall[2] == "oom" else
                                          "was predicted not to fit") + f": trial #{wall[1]})")
    link = _bound_phrase(best, study.user_attrs.get("bandwidths") or {})
    if link:
        text += f"; {link}"
        figures["bound_fraction"] = best.attrs.get("bound_fraction")
    if s is not None and s.available is not None:
        per_gib = s.sequences_per_gib(best.fraction)
        more = s.best(extra_bytes=GiB)
        here = float(s.predict(best.batch, best.fraction)["throughput"])
        if per_gib is not None and more is not None:
            text += (f". Each extra GiB buys about {_about(per_gib)} sequences, about "
                     f"{_signed(more.throughput - here)} tok/s (from the model")
            if more.fraction != s.fractions[s.index(best.fraction)]:
                text += f"; then at batch {more.batch}, {_pct(more.fraction)} resident"
            text += ")"
            figures.update(sequences_per_gib=round(per_gib, 2),
                           tok_s_per_gib=round(more.throughput - here, 1))
    return {"kind": "memory", "text": text, **figures}


def _model(best: _Best, s: Surface | None, study: Any, workload: dict[str, Any]
           ) -> dict[str, Any]:
    if s is None:
        return {"kind": "model", "text": (
            f"the best is batch {best.batch} at {_pct(best.fraction)} resident; this study "
            "stored no model or memory plan to say what limits it")}
    error = s.c.error
    text = (f"neither memory, --max-batch nor a latency limit binds at batch {best.batch}, "
            f"{_pct(best.fraction)} resident: the model puts nothing that fits within "
            f"{_pct(error)} (its error) above it")
    link = _bound_phrase(best, study.user_attrs.get("bandwidths") or {})
    if link:
        text += f"; {link}"
    return {"kind": "model", "text": text, "model_error": round(error, 4)}


# -- pieces ---------------------------------------------------------------------------------


def _measured(best: _Best, key: str) -> float | None:
    a = best.attrs
    return {"max_tpot_ms": a.get("tpot_ms"), "max_ttft_ms": a.get("ttft_ms"),
            "max_latency_s": a.get("e2e_s")}[key]


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "-") + _about(abs(x))


def memory_flag(limit: int) -> str:
    """``--gpu-memory-limit`` as a user would have typed it (8GiB)."""
    return f"--gpu-memory-limit {size_as_typed(limit)}"


def _room(s: Surface | None, study: Any, workload: dict[str, Any]) -> str:
    """The memory the plans were checked against, and the limit that set it."""
    limit = workload.get("gpu_memory_limit")
    available = s.available if s is not None else None
    if available is None:
        return memory_flag(limit) if limit else "the GPU's memory"
    held = f"the {format_bytes(available)} available"
    if limit:
        return f"{held} ({memory_flag(limit)} less a margin)"
    if workload.get("engine") == "landscape" or str(workload.get("gpu")) == "cpu":
        return held
    return f"{held} (the GPU's free memory less a margin)"


def _bound_phrase(best: _Best, bandwidths: dict[str, Any]) -> str | None:
    """How close the best comes to its own bound: what it streams, at what fraction."""
    a = best.attrs
    fraction, by = a.get("bound_fraction"), a.get("bound_by")
    if fraction is None:
        return None
    if by == "HBM":
        hbm = bandwidths.get("hbm_gb_s")
        return (f"reading its {_gb(a.get('resident_bytes_per_step') or 0)} of resident weights "
                f"and KV cache a step at {_pct(fraction)} of the HBM bound"
                + (f" ({hbm:,.0f} GB/s, measured at the study's start)" if hbm else ""))
    streamed = a.get("streamed_bytes_per_step") or 0
    what = ("streaming everything" if best.fraction <= 0 else
            f"streaming {_pct(1 - best.fraction)} of the weights")
    link = bandwidths.get("h2d_gb_s")
    return (f"{what} ({_gb(streamed)} a step) at {_pct(fraction)} of the link"
            + (f" ({link:.3g} GB/s, measured at the study's start)" if link else ""))


def _walls(study: Any) -> tuple[tuple[int, float], ...]:
    """(batch, fraction) of every trial that ran out of memory or was predicted not to."""
    out = []
    total = study.user_attrs.get("total_device_budget") or 0
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("status") in ("oom", "infeasible") and "batch" in a and total:
            out.append((int(a["batch"]), a.get("budget_applied_bytes", a["budget_bytes"]) / total))
    return tuple(out)


def _failed_beyond(best: _Best, study: Any) -> tuple[int, int, str] | None:
    """(batch, trial, status) of the smallest larger batch that ran out of memory or was predicted
    not to fit at this budget or below (memory grows with batch and budget)."""
    found = None
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("status") not in ("oom", "infeasible") or "batch" not in a:
            continue
        budget = a.get("budget_applied_bytes", a.get("budget_bytes", 0))
        if a["batch"] > best.batch and budget <= best.budget_bytes and (
                found is None or a["batch"] < found[0]):
            found = (int(a["batch"]), t.number, a["status"])
    return found
