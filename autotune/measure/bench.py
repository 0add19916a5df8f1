"""``autotune bench``: measure one configuration in this process.

Loads the engine, applies the budget (bytes, or a fraction of ``total_device_budget``),
predicts the peak memory, measures through :mod:`autotune.measure.timing`, and returns plain data.
"""

from __future__ import annotations

import logging
from typing import Any

from autotune.engines import EngineConfig, load_engine
from autotune.errors import UserInputError
from autotune.measure import host
from autotune.measure.timing import measure

log = logging.getLogger(__name__)


def run_bench(
    *, model: str, engine: str, batch: int, isl: int, osl: int, dtype: str, device: str,
    seed: int = 0, weights: str | None = None, repeats: int = 3, warmup: int = 1,
    gpu_memory_limit: int | None = None, budget: int | None = None,
    budget_fraction: float | None = None,
) -> dict[str, Any]:
    if device.startswith("cuda"):
        from autotune import gpu

        gpu.device_info(device)  # a clear error without a GPU
    for name, value in (("batch", batch), ("isl", isl), ("osl", osl)):
        if value < 1:
            raise UserInputError(f"--{name}: expected a positive integer; got {value}")
    config = EngineConfig(
        model=model, engine=engine, dtype=dtype, device=device, max_batch=batch,
        max_seq_len=isl + osl, max_prompt_len=isl, weights=weights, seed=seed, gpu_memory_limit=gpu_memory_limit,
    )
    warning = host.check_engine(config, workers=1)
    if warning:
        log.warning("%s", warning)
    eng = load_engine(config)
    try:
        total = eng.total_device_budget
        if budget is None:
            budget = int(round((budget_fraction or 0.0) * total))
        if not 0 <= budget <= total:
            raise UserInputError(f"--budget: expected 0..{total} bytes (total_device_budget); "
                                 f"got {budget}")
        plan = eng.memory_plan(batch, isl, osl, budget)
        eng.device_budget = budget
        m = measure(eng, batch, isl, osl, repeats=repeats, warmup=warmup, seed=seed)
        return {"measurement": m.as_dict(), "memory_plan": plan.as_dict(),
                "engine": eng.describe()}
    finally:
        eng.close()
