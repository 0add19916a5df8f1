"""``autotune bench``: measure one configuration in this process.

Loads the engine, applies the budget (bytes, or a fraction of ``total_device_budget``),
predicts the peak memory, measures through :mod:`autotune.measure.timing`, and returns plain data.
A configuration whose plan does not fit the memory a study would give it (``--gpu-memory-limit``
and free device memory, minus the margin) is refused before it runs, as a study skips it.
"""

from __future__ import annotations

import logging
from typing import Any

from autotune.engines import EngineConfig, check_options, engine_class, load_engine
from autotune.engines.memory import DEFAULT_MARGIN, MAX_BATCH
from autotune.errors import UserInputError
from autotune.measure import device_lock, host
from autotune.measure.timing import measure
from autotune.measure.trial import _first_line, available_bytes, does_not_fit, is_oom

log = logging.getLogger(__name__)


def run_bench(
    *, model: str, engine: str, batch: int, isl: int, osl: int, dtype: str, device: str,
    seed: int = 0, weights: str | None = None, repeats: int = 3, warmup: int = 1,
    gpu_memory_limit: int | None = None, budget: int | None = None,
    budget_fraction: float | None = None, quantization: str = "none",
    options: tuple[tuple[str, Any], ...] = (),
) -> dict[str, Any]:
    if device.startswith("cuda"):
        from autotune import gpu

        gpu.device_info(device)  # a clear error without a GPU
    for name, value, most in (("batch", batch, MAX_BATCH), ("isl", isl, 1 << 24),
                              ("osl", osl, 1 << 24), ("repeats", repeats, 1000)):
        if not 1 <= value <= most:
            raise UserInputError(f"--{name}: expected an integer from 1 to {most:,}; got "
                                 f"{value:,}")
    if warmup < 0:
        raise UserInputError(f"--warmup: expected 0 or more; got {warmup}")
    check_options(engine_class(engine), options)
    config = EngineConfig(
        model=model, engine=engine, dtype=dtype, device=device, max_batch=batch,
        max_seq_len=isl + osl, max_prompt_len=isl, weights=weights, seed=seed, gpu_memory_limit=gpu_memory_limit,
        quantization=(quantization,), options=tuple(options),
    )
    warning = host.check_engine(config, workers=1)
    if warning:
        log.warning("%s", warning)
    try:
        eng = load_engine(config)
    except Exception as e:  # the host's memory (under `ulimit -v`, say): one line, not a trace
        if not is_oom(e):
            raise
        raise UserInputError(f"out of memory loading {model} ({_first_line(e)}); free host "
                             "memory or use a smaller model") from e
    try:
        total = eng.total_device_budget
        if budget is None:
            budget = int(round((budget_fraction or 0.0) * total))
        if not 0 <= budget <= total:
            raise UserInputError(f"--budget: expected 0..{total} bytes (total_device_budget); "
                                 f"got {budget}")
        plan = eng.memory_plan(batch, isl, osl, budget)
        # What a study would skip is refused here too, before it runs (on CPU as well: the
        # limit caps what the plan may need wherever it is given).
        available = available_bytes(eng, DEFAULT_MARGIN)
        if available is not None and plan.total > available:
            raise UserInputError(
                f"batch {batch} at budget {budget} bytes does not fit: "
                f"{does_not_fit(plan.total, available, DEFAULT_MARGIN)}; lower --batch or "
                "--budget" + (", or raise --gpu-memory-limit" if gpu_memory_limit else ""))
        eng.device_budget = budget

        def busy(seconds: float, holder: str) -> None:
            log.warning("waiting for %s: %s is measuring on it (%.0f s)", device, holder,
                        seconds)

        try:
            with device_lock.exclusive(device, busy):  # a study on this device takes turns
                m = measure(eng, batch, isl, osl, repeats=repeats, warmup=warmup, seed=seed)
        except Exception as e:  # out of memory beyond the plan: the user's to change
            if not is_oom(e):
                raise
            raise UserInputError(f"batch {batch} ran out of memory ({_first_line(e)}); lower "
                                 "--batch or --budget") from e
        return {"measurement": m.as_dict(), "memory_plan": plan.as_dict(),
                "engine": eng.describe()}
    finally:
        eng.close()
