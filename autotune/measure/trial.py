"""The trial a worker runs, in its process: check the headroom, apply the budget, measure.

What a trial does to the worker becomes its outcome, never the worker's end: predicted not to
fit the headroom -> ``infeasible`` (not run); CUDA out of memory (classified from the exception,
never caught wholesale) -> ``oom``, the cache freed; any other exception -> ``error`` with the
message. A measurement that a stop of the job spans (Ctrl-Z, then ``fg``) timed the pause too:
it is taken again. The short requests answered between trials (:func:`plan_configs`, :func:`calibrate`)
are here too; :mod:`autotune.measure.worker` carries them to the process and back. An
in-process runner (:class:`autotune.tune.search.InProcessRunner`) calls them directly.
"""

from __future__ import annotations

import logging
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from autotune.engines import EngineConfig
from autotune.engines.memory import DEFAULT_MARGIN
from autotune.errors import EngineUnavailableError
from autotune.units import format_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialRequest:
    """One configuration to measure."""

    batch: int
    budget: int  # requested device budget, bytes
    isl: int
    osl: int
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    margin_bytes: int = DEFAULT_MARGIN
    decode_steps: int | None = None  # time this many decode steps, extrapolate (measure.py)
    warmup_steps: int | None = None  # decode steps of each warm-up generation
    precision: str = "none"  # the weights' precision (--quantization); budget counts its bytes


@dataclass
class TrialOutcome:
    """What became of a trial. ``status`` is one of ok, infeasible, oom, error, crash, timeout."""

    status: str
    reason: str = ""
    measurement: dict[str, Any] | None = None
    plan: dict[str, int] | None = None
    available_bytes: int | None = None
    applied_budget: int | None = None
    budget_change_s: float | None = None  # time to apply the budget (not in the measurement)
    budget_changed: bool | None = None  # whether the engine's budget differed before the trial
    elapsed_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_oom(exc: BaseException) -> bool:
    """Classifies out-of-memory from the exception type or CUDA's message."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc)
    # The CPU allocator's words (under `ulimit -v`, or a host out of memory) too.
    return ("out of memory" in text.lower() or "CUDNN_STATUS_ALLOC_FAILED" in text
            or "can't allocate memory" in text)


def available_bytes(engine: Any, margin: int) -> int | None:
    """Device memory this worker may use now: what NVML says is free plus what we already
    hold (the engine's ``device_bytes_held()`` where it has memory outside PyTorch's
    allocator, as TensorRT does; else the allocator's reservation), capped by the user's
    limit, minus a margin."""
    config: EngineConfig = engine.config
    caps = []
    if config.gpu_memory_limit is not None:
        caps.append(config.gpu_memory_limit)
    if config.device.startswith("cuda"):
        import torch

        from autotune import gpu

        held = getattr(engine, "device_bytes_held", None)
        held_bytes = held() if held else torch.cuda.memory_reserved(config.device)
        caps.append(gpu.free_bytes(config.device) + held_bytes)
    return min(caps) - margin if caps else None


# How many times a process has been continued after a stop (SIGCONT): a measurement that
# spans a stop (Ctrl-Z, then fg) timed the pause too, so it is measured again, a few times at
# most. Counted by :func:`watch_continues` in the worker's main thread.
_continues = [0]
_MOST_MEASUREMENTS = 3


def watch_continues() -> None:
    """Counts this process's continues (see ``_continues``); a worker calls it once."""
    def count(signum: int, frame: Any) -> None:
        _continues[0] += 1

    signal.signal(signal.SIGCONT, count)


def does_not_fit(predicted: int, available: int, margin: int) -> str:
    """Why a configuration is not run, in words."""
    return (f"predicted peak {format_bytes(predicted)} exceeds the {format_bytes(available)} "
            f"available (free memory and --gpu-memory-limit, minus a {format_bytes(margin)} "
            "margin)")


def _free_cached(config: EngineConfig) -> None:
    import gc

    gc.collect()
    if config.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def run_trial(engine: Any, request: TrialRequest,
              progress: Callable[[str], None] | None = None) -> TrialOutcome:
    """Checks the headroom, applies the budget and measures: in the worker process.
    ``progress(text)`` hears each step (changing the budget, each warm-up and timed run)."""
    from autotune.measure.timing import measure

    config: EngineConfig = engine.config
    start = time.perf_counter()
    try:
        set_precision(engine, request.precision)
    except Exception as e:  # a precision the engine did not load: this trial's error
        return TrialOutcome(status="error", reason=f"{type(e).__name__}: {_first_line(e)}",
                            elapsed_s=time.perf_counter() - start)
    plan = engine.memory_plan(request.batch, request.isl, request.osl, request.budget)
    try:
        available = available_bytes(engine, request.margin_bytes)
    except EngineUnavailableError as e:  # NVML failed mid-study: this trial's error, not ours
        return TrialOutcome(status="error", reason=f"free memory unknown: {e}",
                            plan=plan.as_dict(), elapsed_s=time.perf_counter() - start)
    outcome = TrialOutcome(status="ok", plan=plan.as_dict(), available_bytes=available)
    if available is not None and plan.total > available:
        outcome.status = "infeasible"
        outcome.reason = does_not_fit(plan.total, available, request.margin_bytes)
        return outcome
    try:
        before = engine.device_budget
        if progress is not None:
            progress("changing the budget")
        t0 = time.perf_counter()
        engine.device_budget = request.budget
        engine.synchronize()
        outcome.budget_change_s = time.perf_counter() - t0
        outcome.applied_budget = engine.device_budget
        # What the trial paid besides measuring: on TensorRT a change rebuilds every context.
        outcome.budget_changed = outcome.applied_budget != before
        for _ in range(_MOST_MEASUREMENTS):
            continues = _continues[0]
            m = measure(
                engine, request.batch, request.isl, request.osl,
                repeats=request.repeats, warmup=request.warmup, seed=request.seed,
                decode_steps=request.decode_steps, warmup_steps=request.warmup_steps,
                progress=progress,
            )
            if _continues[0] == continues:  # not stopped meanwhile: what it measured holds
                break
            log.warning("the job was stopped while a trial was measured; measuring it again")
        outcome.measurement = m.as_dict()
        learn = getattr(engine, "learn_peak", None)  # engines whose plans learn from NVML
        if learn is not None and m.peak_device_bytes is not None:
            learn(plan.total, m.peak_device_bytes)
        over = _over_the_limit(config, m.peak_device_bytes, plan.total)
        if over:  # measured, kept, and never a recommendation
            outcome.status, outcome.reason = "infeasible", over
    except Exception as e:  # classified below; anything else is this trial's error, not ours
        if is_oom(e):
            outcome.status, outcome.reason = "oom", f"out of memory: {_first_line(e)}"
        else:
            outcome.status = "error"
            outcome.reason = f"{type(e).__name__}: {_first_line(e)}"
            log.debug("trial failed:\n%s", traceback.format_exc())
        _free_cached(config)
    outcome.elapsed_s = time.perf_counter() - start
    return outcome


def _over_the_limit(config: EngineConfig, peak: int | None, planned: int) -> str | None:
    """Why a measured peak broke ``--gpu-memory-limit``, or None. An engine whose memory lies
    outside PyTorch's allocator (TensorRT) is not held by the allocator's cap: NVML's figure
    is the judge."""
    limit = config.gpu_memory_limit
    if limit is None or peak is None or peak <= limit:
        return None
    return (f"measured peak {format_bytes(peak)} exceeds --gpu-memory-limit "
            f"{format_bytes(limit)} (the memory plan said {format_bytes(planned)})")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


def set_precision(engine: Any, precision: str) -> None:
    """Switches the engine's weights to ``precision`` (engines loaded with one precision
    have none to switch: ``none`` is theirs)."""
    if getattr(engine, "precision", "none") != precision:
        engine.precision = precision


def plan_configs(engine: Any, configs: list[tuple[int, int]], isl: int, osl: int,
                 margin: int = DEFAULT_MARGIN, precision: str | None = None) -> dict[str, Any]:
    """Memory plans of many (batch, budget) pairs in one round trip, the budgets the engine
    would apply (engines round to whole units), the bytes each would stream per step (engines
    with ``streamed_bytes_at``), the smallest plan's parts and the headroom now; of
    ``precision``'s weights where given (planned without switching to them)."""
    kw = {} if precision is None else {"precision": precision}
    plans = [engine.memory_plan(b, isl, osl, budget, **kw) for b, budget in configs]
    totals = [plan.total for plan in plans]
    rounding = getattr(engine, "applied_budget", None)
    streams = getattr(engine, "streamed_bytes_at", None)
    applied: dict[int, int] = {}
    streamed: dict[int, int] = {}
    for _, budget in configs:
        if budget not in applied:
            applied[budget] = int(rounding(budget, **kw)) if rounding else budget
            if streams:
                streamed[budget] = int(streams(budget, **kw))
    reply = {"totals": totals, "applied": [applied[budget] for _, budget in configs],
             "available": available_bytes(engine, margin),
             # The smallest plan by part: what a refusal ("nothing fits") can explain.
             "least": plans[totals.index(min(totals))].as_dict() if plans else None}
    if streams:
        reply["streamed"] = [streamed[budget] for _, budget in configs]
    return reply


def accuracy(engine: Any, isl: int, osl: int, seed: int) -> dict[str, Any]:
    """Each 8-bit precision's distance from 16-bit (the engine's ``accuracy``; engines
    without one say so)."""
    check = getattr(engine, "accuracy", None)
    if check is None:
        return {"precisions": {p: {"status": "not measured",
                                   "reason": f"the {engine.name} engine has no accuracy check"}
                               for p in engine.config.quantization if p != "none"}}
    return check(isl, osl, seed)


def calibrate(engine: Any) -> dict[str, Any]:
    """The compute side of the prior's hardware measurements (see autotune.measure.calibration)."""
    from autotune.measure.calibration import measure_compute

    return measure_compute(engine)
