"""The ``landscape`` engine: replays a recorded grid instead of running a model.

``--engine landscape --engine-option landscape=FILE.json`` (or ``autotune run --landscape
FILE.json``). Each trial reports what the landscape says of its (batch, budget fraction):
interpolated figures, or out of memory (see :mod:`autotune.landscape`). It answers instantly on
CPU, so the whole study loop (sampler, prior, constraints, recommendation) can be tested and
benchmarked without a GPU.

The memory plan is the recording's own prediction (interpolated), and the headroom is the
recording's: when the study gives no ``--gpu-memory-limit``, the engine's config takes the
recorded limit, so a replayed worker skips what the recorded worker skipped. A plan knows only
a total, reported as the ``workspace`` part.

This engine generates no tokens: :mod:`autotune.measure.timing` calls ``simulate_measurement``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, ClassVar

from autotune.engines.base import EngineConfig, Measurement, clamp_budget
from autotune.engines.memory import DEFAULT_MARGIN, MemoryPlan
from autotune.errors import UserInputError
from autotune.landscape import Landscape, read
from autotune.models import get_spec

log = logging.getLogger(__name__)


class SimulatedOutOfMemoryError(RuntimeError):
    """What a recorded out-of-memory replays as (the worker classifies it by its message)."""


class LandscapeEngine:
    """Replays a landscape file (see the module docstring)."""

    name: ClassVar[str] = "landscape"
    engine_options: ClassVar[dict[str, str]] = {"landscape": "the landscape file to replay"}

    def __init__(self, config: EngineConfig, landscape: Landscape) -> None:
        self.landscape = landscape
        self.spec = get_spec(config.model, config.weights)
        available = landscape.available_bytes
        if config.gpu_memory_limit is None and available is not None:
            # The recording's headroom: the worker checks plans against limit - margin.
            config = replace(config, gpu_memory_limit=available + DEFAULT_MARGIN)
        self.config = config
        self._budget = landscape.total_device_budget
        self._fraction = 1.0

    @classmethod
    def load(cls, config: EngineConfig) -> LandscapeEngine:
        path = config.option("landscape")
        if not path:
            raise UserInputError("engine landscape: give the file with --landscape FILE.json "
                                 "(or --engine-option landscape=FILE.json)")
        landscape = read(path)
        wl = landscape.workload
        if wl.get("model") and wl["model"] != config.model:
            raise UserInputError(f"landscape {path} was recorded with --model {wl['model']}; "
                                 f"got --model {config.model}")
        if landscape.fractions[0] > 0.0 or landscape.fractions[-1] < 1.0:
            raise UserInputError(f"landscape {path} covers budget fractions "
                                 f"{landscape.fractions[0]}..{landscape.fractions[-1]}; a study "
                                 "searches 0..1: record the full range")
        if config.max_prompt_len is not None:  # the study's isl and osl: known before trial 1
            isl, osl = config.max_prompt_len, config.max_seq_len - config.max_prompt_len
            if (isl, osl) != (landscape.isl, landscape.osl):
                raise UserInputError(
                    f"landscape {path} was recorded at isl {landscape.isl}, osl {landscape.osl}; "
                    f"got isl {isl}, osl {osl}: give those (autotune run --landscape replays "
                    "at its own when --isl and --osl are left out)")
        top = landscape.batches[-1]
        if config.max_batch > top:
            raise UserInputError(f"landscape {path} covers batch 1..{top}; got --max-batch "
                                 f"{config.max_batch}")
        return cls(config, landscape)

    # -- the budget -----------------------------------------------------------------------

    @property
    def total_device_budget(self) -> int:
        return self.landscape.total_device_budget

    @property
    def device_budget(self) -> int:
        return self._budget

    @device_budget.setter
    def device_budget(self, value: int) -> None:
        self._budget = clamp_budget(value, self.total_device_budget, log)

    def get_automatic_weight_streaming_budget(self) -> int:
        return self.total_device_budget

    def _fraction_of(self, budget: int) -> float:
        total = self.total_device_budget
        return budget / total if total else 1.0

    # -- replay ---------------------------------------------------------------------------

    def _check_workload(self, isl: int, osl: int) -> None:
        if (isl, osl) != (self.landscape.isl, self.landscape.osl):
            raise UserInputError(
                f"landscape {self.landscape.path} was recorded at isl {self.landscape.isl}, "
                f"osl {self.landscape.osl}; got isl {isl}, osl {osl}")

    def simulate_measurement(self, batch: int, isl: int, osl: int, *, repeats: int = 1,
                             warmup: int = 0) -> Measurement:
        self._check_workload(isl, osl)
        p = self.landscape.at(batch, self._fraction_of(self._budget))
        if p.status in ("oom", "infeasible"):
            raise SimulatedOutOfMemoryError(
                f"CUDA out of memory (replayed from landscape {self.landscape.name}: a grid "
                f"point beyond batch {batch}, budget {p.budget_fraction:.3f} ran out of memory)")
        if p.status == "error":
            raise RuntimeError(f"the recorded trial near batch {batch}, budget "
                               f"{p.budget_fraction:.3f} failed")
        ttft, tpot = p.ttft_ms / 1e3, p.tpot_ms / 1e3
        e2e = batch * osl / p.throughput_tok_s
        streamed = p.streamed_bytes_per_step or 0
        return Measurement(
            batch=batch, isl=isl, osl=osl, device_budget=self._budget,
            total_device_budget=self.total_device_budget,
            throughput_tok_s=p.throughput_tok_s, e2e_s=e2e, ttft_s=ttft, tpot_s=tpot,
            streamed_bytes_per_step=streamed,
            stream_gb_s=streamed / tpot / 1e9 if tpot > 0 else 0.0,
            peak_allocated_bytes=p.peak_memory_bytes, peak_reserved_bytes=p.peak_memory_bytes,
            nvml_used_bytes=None, tokens_sha256="landscape-replay",
            e2e_samples_s=[e2e] * repeats, ttft_samples_s=[ttft] * repeats, warmup=warmup,
            decode_steps_timed=osl - 1,
        )

    def memory_plan(self, batch: int, isl: int, osl: int, budget: int) -> MemoryPlan:
        self._check_workload(isl, osl)
        budget = clamp_budget(budget, self.total_device_budget, log)
        p = self.landscape.at(batch, self._fraction_of(budget))
        return MemoryPlan(0, 0, 0, 0, workspace=int(p.predicted_peak_bytes or 0))

    def compute_calibration(self) -> dict[str, Any]:
        """The recording's hardware measurements (for the prior), instead of measuring."""
        return dict(self.landscape.calibration)

    def prefill(self, prompt: Any, osl: int) -> Any:
        raise NotImplementedError("the landscape engine replays measurements; use measure()")

    def decode(self, gen: Any, steps: int) -> None:
        raise NotImplementedError("the landscape engine replays measurements; use measure()")

    def synchronize(self) -> None:
        pass

    def streamed_bytes_per_step(self) -> int:
        return self.total_device_budget - self._budget

    def describe(self) -> dict[str, Any]:
        gpu = (self.landscape.data.get("environment") or {}).get("gpu") or {}
        return {"engine": self.name, "landscape": self.landscape.path,
                "synthetic": self.landscape.synthetic,
                "measured_on": gpu.get("name") or self.landscape.workload.get("gpu"),
                "total_device_budget": self.total_device_budget,
                "device_budget": self.device_budget, "bandwidths": self.bandwidths()}

    def bandwidths(self) -> dict[str, float]:
        """The recording's measured link and HBM bandwidths (GB/s), where it has them: a
        replay's bounds are the recorded hardware's, not this CPU's."""
        env, cal = self.landscape.data.get("environment") or {}, self.landscape.calibration
        out = {"h2d_gb_s": env.get("h2d_gb_s") or cal.get("h2d_gb_s"),
               "hbm_gb_s": env.get("hbm_gb_s")}
        return {k: float(v) for k, v in out.items() if v}

    def close(self) -> None:
        pass
