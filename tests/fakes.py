"""Test engines for the study loop: an analytic engine on CPU, with faults on request.

``AnalyticEngine`` follows the engine contract with a modelled cost instead of a model: a
step takes max(streamed bytes / link bandwidth, compute(batch)) and the engine really waits
that long, so measure.py times it like any engine. Tokens are a deterministic function of the
prompt. Faults are switched on through ``EngineConfig.options`` (the same path a user's own
engine options take): ``fault`` = abort | kill | oom | hang | error, from batch
``fault_batch`` upward, except in the first ``fault_after`` configurations (batch, budget)
this engine measures (1: the first trial finishes, measured again or not; the next one faults),
so the parent sees what a real worker would do; a hang holds a trial RUNNING for as long as a
test needs, on any machine. ``budget_sleep_s`` makes every budget change take that long
(outside the timed region), so that trials last long enough for fault tests to kill a process
mid-trial; ``first_plan_sleep_s`` stalls the first memory plan (a worker that stalls past a
query's wait, then goes on). ``spoil_batch`` emulates a neighbour busy during single trials:
the first trial of each configuration from that batch upward runs ``spoil_factor`` (9) times
slower; measured again, it runs at its own speed. ``clock=modelled`` times the steps on a
:class:`ModelledClock` instead of sleeping them: exact figures where a test compares two
studies' optima, free of a loaded machine's timer noise.

Precisions (``EngineConfig.quantization``): 8-bit units are half a 16-bit unit, so at one budget
fraction an 8-bit configuration streams half the bytes (and keeps half resident); the compute is
the same.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, ClassVar

from autotune.engines import EngineConfig, Generation, clamp_budget
from autotune.engines.base import say_loading
from autotune.engines.memory import MemoryPlan
from autotune.measure import timing
from autotune.models import get_spec

log = logging.getLogger(__name__)

MiB = 2**20
UNIT = 64 * MiB  # streamable unit, bytes
UNITS = 8
NON_STREAMABLE = 32 * MiB
KV_PER_SEQ = 16 * MiB
LINK_BYTES_PER_S = 512 * 2**30  # modelled bandwidth: 512 MiB streamed -> ~1 ms a step
STEP_S = 2e-4  # compute of one step at batch 1
PER_SEQ_S = 2e-5


def unit_bytes(precision: str) -> int:
    """One unit's bytes at ``precision``: 8-bit units are half a 16-bit one."""
    return UNIT if precision == "none" else UNIT // 2


class ModelledClock:
    """The test engines' time: sleeping moves it on and nothing waits, so what measure() reads
    is exactly the modelled cost (a 1 ms step slept on a CI machine running 8 test workers on
    2 cores came out 25% long)."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def perf_counter(self) -> float:
        return self.now


def _abort_slowly() -> None:
    """As a CUDA process that aborts (malloc's check, H100 2026-12-05): it lets go of its
    files (the pipe: the tuner reads its end closed) a while before it is gone, its memory
    and the driver's teardown taking time."""
    os.closerange(3, 4096)
    time.sleep(3)  # longer than a crashed trial's 2 s grace once was
    os.abort()


class AnalyticEngine:
    name: ClassVar[str] = "analytic"
    precisions: ClassVar[tuple[str, ...]] = ("none", "int8", "fp8")
    uniform_decode_steps: ClassVar[bool] = True  # every step sleeps the same modelled time
    engine_options: ClassVar[dict[str, str]] = {
        k: "a test fault or delay" for k in ("fault", "fault_batch", "fault_after",
                                             "budget_sleep_s", "fault_at_load", "load_sleep_s",
                                             "first_plan_sleep_s", "spoil_batch",
                                             "spoil_factor", "clock")}

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.spec = get_spec(config.model, config.weights)
        self.precision = config.quantization[0]
        self._budget = self.total_device_budget
        self.fault = config.option("fault")
        self.fault_batch = int(config.option("fault_batch", 1))
        self.fault_after = int(config.option("fault_after", 0))  # configurations spared
        self._measured: list[tuple[int, int]] = []  # (batch, budget), in the order first seen
        self.budget_sleep_s = float(config.option("budget_sleep_s", 0))
        self.first_plan_sleep_s = float(config.option("first_plan_sleep_s", 0))
        self.spoil_batch = int(config.option("spoil_batch", 0))
        self.spoil_factor = float(config.option("spoil_factor", 9))
        self._spoiled: set[tuple[int, int]] = set()  # configurations measured once, slowly
        self._spoiling = False  # until the next budget change (the next trial)
        if config.option("fault_at_load") == "abort":
            _abort_slowly()
        if config.option("fault_at_load"):
            raise RuntimeError("simulated load failure")
        self._modelled: ModelledClock | None = None
        if config.option("clock", "real") == "modelled":
            # measure() reads it in this process, a worker's own; close() gives the real one back.
            self._modelled = timing.time = ModelledClock()
        if float(config.option("load_sleep_s", 0)):  # a large model pinning its weights
            say_loading("pinning the weights")
            time.sleep(float(config.option("load_sleep_s", 0)))

    @classmethod
    def load(cls, config: EngineConfig) -> AnalyticEngine:
        return cls(config)

    @property
    def total_device_budget(self) -> int:
        return UNITS * unit_bytes(self.precision)

    @property
    def total_device_budgets(self) -> dict[str, int]:
        return {p: UNITS * unit_bytes(p) for p in self.config.quantization}

    @property
    def device_budget(self) -> int:
        return self._budget

    @device_budget.setter
    def device_budget(self, value: int) -> None:
        value = clamp_budget(value, self.total_device_budget, log)
        time.sleep(self.budget_sleep_s)
        unit = unit_bytes(self.precision)
        self._budget = value // unit * unit  # unit granularity, like a real engine
        self._spoiling = False

    def applied_budget(self, value: int, precision: str | None = None) -> int:
        unit = unit_bytes(precision or self.precision)
        return clamp_budget(value, UNITS * unit, log) // unit * unit

    def get_automatic_weight_streaming_budget(self) -> int:
        return self.total_device_budget

    def compute_calibration(self) -> dict[str, Any]:
        """This engine's hardware, as the prior's calibration: a step's modelled compute at
        each row count (what measure_compute would time on a GPU whose matmuls this engine
        models), instead of timing this CPU's matmuls, which have nothing to do with it."""
        from autotune.measure.calibration import CALIBRATION_ROWS

        return {"gemm_rows": list(CALIBRATION_ROWS),
                "gemm_s": [STEP_S + PER_SEQ_S * rows for rows in CALIBRATION_ROWS]}

    def _step(self, batch: int) -> None:
        streamed = self.streamed_bytes_per_step()
        slow = self.spoil_factor if self._spoiling else 1.0
        cost = slow * max(streamed / LINK_BYTES_PER_S, STEP_S + PER_SEQ_S * batch)
        (self._modelled or time).sleep(cost)

    def _maybe_fault(self, batch: int) -> None:
        if self.fault is None or batch < self.fault_batch:
            return
        if (batch, self._budget) not in self._measured:
            self._measured.append((batch, self._budget))
        if self._measured.index((batch, self._budget)) < self.fault_after:
            return
        if self.fault == "abort":
            os.abort()
        if self.fault == "abort_slowly":
            _abort_slowly()
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault == "oom":
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.fault == "hang":
            time.sleep(3600)
        if self.fault == "error":
            raise ValueError("simulated engine bug")

    def prefill(self, prompt: Any, osl: int) -> Generation:
        batch, isl = prompt.shape
        self._maybe_fault(batch)
        if self.spoil_batch and batch >= self.spoil_batch and (
                (batch, self._budget) not in self._spoiled):
            self._spoiled.add((batch, self._budget))
            self._spoiling = True
        self._step(batch)
        first = (prompt.sum(dim=1, keepdim=True) % self.spec.vocab_size).long()
        return Generation(batch, isl, osl, first)

    def decode(self, gen: Generation, steps: int) -> None:
        import torch  # here, not at the top: a tuner that only checks options needs none

        tokens = [gen.tokens]
        for _ in range(steps):
            self._step(gen.batch)
            tokens.append((tokens[-1] * 31 + 7) % self.spec.vocab_size)
        gen.tokens = torch.cat(tokens, dim=1)

    def synchronize(self) -> None:
        pass

    def memory_plan(self, batch: int, isl: int, osl: int, budget: int,
                    precision: str | None = None) -> MemoryPlan:
        time.sleep(self.first_plan_sleep_s)  # a worker that stalls once, then goes on
        self.first_plan_sleep_s = 0.0
        unit = unit_bytes(precision or self.precision)
        return MemoryPlan(
            resident_weights=NON_STREAMABLE + budget // unit * unit,
            streaming_scratch=2 * unit if budget < UNITS * unit else 0,
            kv_cache=batch * KV_PER_SEQ, activations=batch * MiB, workspace=0,
        )

    def streamed_bytes_per_step(self) -> int:
        return self.total_device_budget - self._budget

    def describe(self) -> dict[str, Any]:
        # The modelled link is this engine's hardware: its bounds are the model's own.
        return {"engine": self.name, "unit_bytes": UNIT, "units": UNITS,
                "bandwidths": {"h2d_gb_s": LINK_BYTES_PER_S / 1e9}}

    def close(self) -> None:
        if self._modelled is not None:
            timing.time = time


class ResolvingEngine(AnalyticEngine):
    """An engine with an option it resolves at load, as native's ``compile`` and ``attention``
    are: ``step=auto`` (the default) takes the environment's FAKE_STEP (a host's ability),
    else ``slow``."""

    engine_options: ClassVar[dict[str, str]] = {
        **AnalyticEngine.engine_options, "step": "auto (the default), slow or fast"}
    resolved_options: ClassVar[dict[str, tuple[str, Any]]] = {"step": ("step", "slow")}

    @classmethod
    def options_giving(cls, facts: dict[str, Any]) -> dict[str, str]:
        return {"step": facts.get("step", "slow")}

    def describe(self) -> dict[str, Any]:
        step = self.config.option("step", "auto")
        return {**super().describe(),
                "step": os.environ.get("FAKE_STEP", "slow") if step == "auto" else step}
