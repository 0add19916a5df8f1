"""The one place that times generation.

Rules (DESIGN.md): warm-up runs are separate and never counted; the device is synchronized
before every clock read (``time.perf_counter``); each configuration is repeated and the median
reported beside the spread, with the raw samples kept; prompts are random token ids (never
zeros, never all equal). Throughput is generated tokens (batch x osl) over the wall time of
prefill + decode. Beside tokens/s it reports what the hardware did: bytes streamed per step and
the GB/s they imply, so that anyone can check a figure against the link's bound.

The shortcut (``decode_steps``): an engine whose decode steps all do the same work
(``uniform_decode_steps``: the native engine's static KV cache, attended in full and masked,
and one CUDA graph per step) is timed over prefill + ``decode_steps`` steps, and the rest of the
osl is extrapolated from them; the measurement says so (``estimated``, ``decode_steps_timed``).
Its memory is the workload's (the cache is allocated for isl + osl). An engine whose step cost
grows in proportion to the position (``linear_decode_steps``: attention over the filled
positions only) and that can ``skip`` steps (move the position on without computing them) is
timed the same way over a window centred on the generation's middle position, whose mean step
costs what the generation's mean step does; the steps skipped before it are not timed. Other
engines, and those whose timing is too noisy for it, are timed over every step.
``benchmarks/shortcut.py`` compares both.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable
from typing import Any

from autotune.engines.base import Engine, Measurement, random_prompt
from autotune.errors import UserInputError


def tokens_digest(tokens: Any) -> str:
    import torch

    data = tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserInputError(f"{name}: expected a positive integer; got {value!r}")


def measure(
    engine: Engine,
    batch: int,
    isl: int,
    osl: int,
    *,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    decode_steps: int | None = None,
    warmup_steps: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Measurement:
    """Times greedy generation of ``osl`` tokens for ``batch`` random prompts of ``isl``.

    Uses the engine's budget as it is now; set ``engine.device_budget`` first.
    ``decode_steps``: time only that many decode steps and extrapolate (see the module
    docstring; ignored unless the engine's steps are uniform). ``warmup_steps``: decode steps
    of each warm-up generation (default, and always where steps differ: as many as a timed
    one, so that every shape the timed run meets was met before). ``progress(text)`` hears
    each warm-up and timed run as it starts (outside the timed intervals).
    """
    say = progress or (lambda text: None)
    _check_positive(batch=batch, isl=isl, osl=osl, repeats=repeats)
    if warmup < 0:
        raise UserInputError(f"warmup: expected 0 or more; got {warmup}")
    for name, value in (("decode_steps", decode_steps), ("warmup_steps", warmup_steps)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserInputError(f"{name}: expected a positive integer or None; got {value!r}")
    simulate = getattr(engine, "simulate_measurement", None)
    if simulate is not None:  # replayed engines (landscape) report recorded figures
        return simulate(batch, isl, osl, repeats=repeats, warmup=warmup)

    steps = warm_steps = osl - 1  # decode steps timed per repeat, and per warm-up
    linear = linear_steps(engine)
    if uniform_steps(engine) or linear:
        if decode_steps is not None:
            steps = min(decode_steps, steps)
        warm_steps = steps if warmup_steps is None else min(warmup_steps, osl - 1)
    # A linear engine's window is centred: its mean position is the generation's.
    skipped = (osl - 1 - steps) // 2 if linear else 0
    prompt = random_prompt(batch, isl, engine.spec.vocab_size, seed, _device_of(engine))
    note = getattr(engine, "warmup_note", None)  # what a first warm-up does besides
    for k in range(warmup):
        doing = note(batch) if note is not None else None
        say(f"warm-up {k + 1}/{warmup}" + (f": {doing}" if doing else ""))
        _generate(engine, prompt, osl, warm_steps)
    engine.synchronize()
    _reset_peak(engine)

    e2e: list[float] = []
    ttft: list[float] = []
    tokens = None
    for k in range(repeats):
        say(f"timed run {k + 1}/{repeats}")
        # Synchronized before each clock read so the interval holds exactly this work.
        engine.synchronize()
        start = time.perf_counter()
        gen = engine.prefill(prompt, osl)
        engine.synchronize()
        first = window = time.perf_counter()
        if skipped:  # not timed
            engine.skip(gen, skipped)
            engine.synchronize()
            window = time.perf_counter()
        if steps > 0:
            engine.decode(gen, steps)
        engine.synchronize()
        end = time.perf_counter()
        ttft.append(first - start)
        # Extrapolated when estimating: every step does the same work (uniform_steps), or the
        # window's mean step is the generation's (linear_steps).
        e2e.append(ttft[-1] + (end - window) * (osl - 1) / steps if steps else end - start)
        tokens = gen.tokens
    assert tokens is not None and tuple(tokens.shape) == (batch, skipped + steps + 1), \
        "engine broke the contract"

    e2e_med = statistics.median(e2e)
    ttft_med = statistics.median(ttft)
    tpot = (e2e_med - ttft_med) / (osl - 1) if osl > 1 else 0.0
    streamed = engine.streamed_bytes_per_step()
    allocated, reserved = _torch_peaks(engine)
    return Measurement(
        batch=batch,
        isl=isl,
        osl=osl,
        device_budget=engine.device_budget,
        total_device_budget=engine.total_device_budget,
        throughput_tok_s=batch * osl / e2e_med,
        e2e_s=e2e_med,
        ttft_s=ttft_med,
        tpot_s=tpot,
        streamed_bytes_per_step=streamed,
        stream_gb_s=streamed / tpot / 1e9 if tpot > 0 else 0.0,
        peak_allocated_bytes=allocated,
        peak_reserved_bytes=reserved,
        nvml_used_bytes=_nvml_used(engine),
        peak_device_bytes=_device_peak(engine, reserved),
        tokens_sha256=tokens_digest(tokens),
        e2e_samples_s=e2e,
        ttft_samples_s=ttft,
        warmup=warmup,
        decode_steps_timed=steps,
        estimated=steps < osl - 1,
    )


def uniform_steps(engine: Any) -> bool:
    """Whether every decode step of the engine does the same work (see the module docstring)."""
    return bool(getattr(engine, "uniform_decode_steps", False))


def linear_steps(engine: Any) -> bool:
    """Whether a decode step's cost grows in proportion to its position and the engine can
    skip steps (see the module docstring)."""
    return bool(getattr(engine, "linear_decode_steps", False)) and hasattr(engine, "skip")


def _generate(engine: Engine, prompt: Any, osl: int, steps: int) -> Any:
    gen = engine.prefill(prompt, osl)
    if steps > 0:
        engine.decode(gen, steps)
    return gen.tokens


def _device_of(engine: Engine) -> str:
    return engine.config.device


def _is_cuda(engine: Engine) -> bool:
    return engine.config.device.startswith("cuda")


def _reset_peak(engine: Engine) -> None:
    if _is_cuda(engine):
        import torch

        torch.cuda.reset_peak_memory_stats(engine.config.device)


def _torch_peaks(engine: Engine) -> tuple[int | None, int | None]:
    if not _is_cuda(engine):
        return None, None
    import torch

    device = engine.config.device
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def _nvml_used(engine: Engine) -> int | None:
    if not _is_cuda(engine):
        return None
    outside = getattr(engine, "device_used_bytes", None)
    if outside is not None:  # the engine's own reading (NVML, or the device's use without it)
        return int(outside())
    from autotune import gpu

    return gpu.process_used_bytes(engine.config.device)


def _device_peak(engine: Engine, reserved: int | None) -> int | None:
    """See ``Measurement.peak_device_bytes``."""
    if getattr(engine, "device_used_bytes", None) is not None and _is_cuda(engine):
        return _nvml_used(engine)
    return reserved


def measure_h2d_bandwidth(device: str, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Pinned host-to-device copy bandwidth in GB/s (1e9), median of ``repeats`` copies.

    The bound of every streaming configuration is streamed bytes / this figure.
    """
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up: first touch, not counted
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)  # the copy is async: wait for it before the clock
        times.append(time.perf_counter() - start)
    del src, dst
    return nbytes / statistics.median(times) / 1e9


def measure_hbm_bandwidth(device: str, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Device memory bandwidth in GB/s (1e9) of a device-to-device copy (read + write: 2 x
    ``nbytes`` moved), median of ``repeats`` copies timed with CUDA events (a 0.3 ms copy is
    too short for the host clock).

    The bound of a configuration that keeps weights resident is resident bytes / this figure
    (:mod:`autotune.measure.roofline`).
    """
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch, not counted
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()  # the events are read only once the copy between them is done
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()  # the engine loads next: hand the 512 MiB back
    return 2 * nbytes / statistics.median(times) / 1e9
