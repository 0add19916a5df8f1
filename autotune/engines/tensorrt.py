"""The Torch-TensorRT engine: TensorRT's own weight streaming, driven as its docs describe.

``load`` exports the Hugging Face model (no KV cache, eager attention, the study's dtype) with
``torch.export`` and a dynamic batch and sequence dimension, compiles it once with
``torch_tensorrt.dynamo.compile(..., enable_weight_streaming=True)`` (or reloads it from the
on-disk cache), and sets budgets through ``torch_tensorrt.runtime.weight_streaming``, reading
every applied budget back. Generation follows Torch-TensorRT's example: without a KV cache,
every step is a forward over the whole sequence so far, greedy argmax of the last position.

Written from ``research/torch-tensorrt-weight-streaming.md`` (section numbers below refer to
it) and tested only against the test double in ``tests/doubles``: TensorRT cannot be installed
where autotune is developed (see docs/tensorrt.md). torch_tensorrt is imported inside ``load``
only, so ``import autotune.engines`` never needs it. This module does not time anything
(:mod:`autotune.measure` does) and does not use CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from autotune.engines._trt_build import (
    BuildShapes,
    compile_options,
    device_identity,
    export_model,
    import_torch_tensorrt,
    parse_version,
    versions,
)
from autotune.engines._trt_cache import ModuleCache, cache_key, default_cache_dir
from autotune.engines.base import EngineConfig, Generation, clamp_budget
from autotune.errors import EngineUnavailableError, UserInputError
from autotune.memory import MemoryPlan, prefill_activation_bytes
from autotune.models import ModelSpec, dtype_bytes, get_spec

log = logging.getLogger(__name__)

# TensorRT's tactic workspace and the execution context's own bookkeeping: an estimate, since
# Torch-TRT exposes neither (§5, "API gaps").
_WORKSPACE_BYTES = 256 * 2**20


class TensorRTEngine:
    """A Torch-TensorRT module compiled with weight streaming, behind the Engine contract."""

    name: ClassVar[str] = "tensorrt"
    # Each budget change destroys and re-creates every engine's execution context, re-uploads
    # the resident weights and resets captured graphs (§1.5): group trials by budget.
    budget_change_cost: ClassVar[str] = "high"

    def __init__(self, config: EngineConfig, spec: ModelSpec, trt: Any, module: Any,
                 facts: dict[str, Any]) -> None:
        self.config = config
        self.spec = spec
        self._trt = trt
        self._module = module
        self._facts = facts
        # One weight_streaming object for the engine's life: its device_budget is a cached
        # sum that other objects would not see change (§1.2).
        self._ws = trt.runtime.weight_streaming(module)
        self._total = int(self._ws.total_device_budget)
        if self._total == 0:
            raise EngineUnavailableError(
                "the compiled module has no streamable weights (no _run_on_acc engine built "
                "with enable_weight_streaming=True); delete the TensorRT cache and retry"
            )
        self._engines = [n for n, _ in module.named_children() if "_run_on_acc" in n]
        # Torch-TRT applied TensorRT's automatic budget on deserialization (§1.4).
        self.automatic_budget_at_load = int(self._ws.device_budget)
        self.budget_changes = 0
        self.needs_warmup = True  # the first generation after load or a budget change

    @classmethod
    def host_bytes(cls, config: EngineConfig) -> int:
        """Peak host memory: the engine keeps all its weights in a host buffer (streamed ones
        included), beside PyTorch's copy of the model while it compiles (research §5)."""
        return 2 * get_spec(config.model, config.weights).weight_bytes(config.dtype)

    @classmethod
    def load(cls, config: EngineConfig) -> TensorRTEngine:
        trt = import_torch_tensorrt()
        version = parse_version(trt.__version__)
        spec = get_spec(config.model, config.weights)
        shapes = BuildShapes.from_config(config)
        torch_ops = sorted(map(str, config.option("torch_executed_ops", ()) or ()))
        found = versions(trt)
        key = cache_key({
            "model": dataclasses.asdict(spec), "seed": config.seed, "dtype": config.dtype,
            "shapes": shapes.as_dict(), "torch_executed_ops": torch_ops, "versions": found,
            "device": device_identity(config.device),
        })
        cache = ModuleCache(config.option("trt_cache_dir") or default_cache_dir())
        use_cache = bool(config.option("trt_cache", True))
        engine_class = trt.dynamo.runtime.TorchTensorRTModule
        hit = cache.load(key) if use_cache else None
        start = time.perf_counter()
        if hit is not None:
            module, _ = hit
            log.info("loaded compiled TensorRT module from %s", cache.path(key))
        else:
            module = cls._compile(trt, version, spec, config, shapes, torch_ops)
            if use_cache:
                cache.save(key, module, engine_class, {"versions": found})
        if config.device.startswith("cuda"):
            module = module.to(config.device)  # the PyTorch children; engines stay put
        facts = {
            "versions": found, "built_for": shapes.as_dict(), "cache_hit": hit is not None,
            "cache_path": str(cache.path(key)) if use_cache else None,
            "load_s": time.perf_counter() - start, "compile_options": {
                k: sorted(map(str, v)) if isinstance(v, set) else v
                for k, v in compile_options(version, config.dtype).items()
            }, "torch_executed_ops": torch_ops,
        }
        return cls(config, spec, trt, module, facts)

    @staticmethod
    def _compile(trt: Any, version: tuple[int, int], spec: ModelSpec, config: EngineConfig,
                 shapes: BuildShapes, torch_ops: list[str]) -> Any:
        import torch

        ep = export_model(spec, config, shapes)
        profile = trt.Input(min_shape=(shapes.min_batch, shapes.min_seq),
                            opt_shape=(shapes.opt_batch, shapes.opt_seq),
                            max_shape=(shapes.max_batch, shapes.max_seq), dtype=torch.int64)
        options = compile_options(version, config.dtype)
        if torch_ops:
            options["torch_executed_ops"] = set(torch_ops)
        if config.device.startswith("cuda"):
            options["device"] = torch.device(config.device)
        log.info("compiling %s (%s) with Torch-TensorRT %s", spec.name, config.dtype,
                 trt.__version__)
        with warnings.catch_warnings():
            # 2.10-2.12 warn on every call that use_explicit_typing is deprecated, even when
            # it is required (§2); the note explains it, the user cannot act on it.
            warnings.filterwarnings("ignore", ".*use_explicit_typing.*", DeprecationWarning)
            return trt.dynamo.compile(ep, inputs=[profile, profile], **options)

    # -- budget (§1.2, §7.1) ---------------------------------------------------------------

    @property
    def total_device_budget(self) -> int:
        return self._total

    @property
    def device_budget(self) -> int:
        return int(self._ws.device_budget)

    @device_budget.setter
    def device_budget(self, value: int) -> None:
        requested = clamp_budget(value, self._total, log)
        if requested == self.device_budget:
            return  # setting the same sum would only rebuild contexts for nothing
        self._ws.device_budget = requested
        applied = self.device_budget  # the sum the engines really applied (§5: read it back)
        if applied != requested:
            log.warning(
                "TensorRT applied a device budget of %d bytes, not the %d requested "
                "(proportional split rounds down by up to %d bytes; a larger gap means the "
                "budget was rejected)", applied, requested, len(self._engines) - 1,
            )
        self.budget_changes += 1
        self.needs_warmup = True

    def get_automatic_weight_streaming_budget(self) -> int:
        # Sum of per-engine heuristics: non-deterministic, may over-commit (§5). A reference
        # point, never an Optuna parameter.
        return min(int(self._ws.get_automatic_weight_streaming_budget()), self._total)

    # -- generation (no KV cache: each step runs the whole sequence, as Torch-TRT's example) --

    def _next_token(self, seq: Any) -> Any:
        import torch

        batch, length = seq.shape
        positions = torch.arange(length, device=seq.device).expand(batch, -1).contiguous()
        with torch.inference_mode():
            out = self._module(seq, positions)
        logits = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
        return logits[:, -1, :].argmax(dim=-1)  # [B]

    def prefill(self, prompt: Any, osl: int) -> Generation:
        batch, isl = (int(d) for d in prompt.shape)
        if not 1 <= batch <= self.config.max_batch:
            raise UserInputError(
                f"batch: the TensorRT module was built for 1..{self.config.max_batch}; got {batch}"
            )
        if osl < 1 or isl + osl - 1 > self.config.max_seq_len:
            raise UserInputError(
                f"isl + osl: the TensorRT module was built for sequences up to "
                f"{self.config.max_seq_len} tokens; got isl {isl} + osl {osl}"
            )
        first = self._next_token(prompt)
        self.needs_warmup = False
        return Generation(batch=batch, isl=isl, osl=osl, tokens=first[:, None],
                          state=_Sequence(prompt))

    def decode(self, gen: Generation, steps: int) -> None:
        import torch

        if gen.tokens.shape[1] + steps > gen.osl:
            raise UserInputError(
                f"decode: {steps} steps would pass osl {gen.osl} "
                f"({gen.tokens.shape[1]} tokens generated)"
            )
        for _ in range(steps):
            seq = torch.cat([gen.state.prompt, gen.tokens], dim=1)  # [B, isl + n]
            token = self._next_token(seq)
            gen.tokens = torch.cat([gen.tokens, token[:, None]], dim=1)

    def synchronize(self) -> None:
        if self.config.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.config.device)

    # -- memory and reporting ----------------------------------------------------------------

    def memory_plan(self, batch: int, isl: int, osl: int, budget: int) -> MemoryPlan:
        """Resident = non-streamable weights + budget; scratch = an estimate of TensorRT's
        streaming staging (not exposed, §5); activations = the context's static allocation for
        the max shape it was built for (§2) plus the logits output PyTorch allocates for the
        actual shape; no KV cache."""
        budget = clamp_budget(budget, self._total, log)
        dt = self.config.dtype
        nonstreamable = max(0, self.spec.weight_bytes(dt) - self._total)
        layer = self.spec.layer_params() * dtype_bytes(dt)
        # Staging for the streamed weights: about two layers in flight (an assumption).
        scratch = min(self._total - budget, 2 * layer) if budget < self._total else 0
        max_b, max_s = self.config.max_batch, self.config.max_seq_len
        context = (prefill_activation_bytes(self.spec, dt, max_b, max_s)
                   + max_b * max_s * self.spec.vocab_size * dtype_bytes(dt))
        seq = isl + osl - 1
        outputs = batch * seq * self.spec.vocab_size * dtype_bytes(dt) + batch * seq * 8 * 2
        return MemoryPlan(resident_weights=nonstreamable + budget, streaming_scratch=scratch,
                          kv_cache=0, activations=context + outputs,
                          workspace=_WORKSPACE_BYTES)

    def streamed_bytes_per_step(self) -> int:
        # Every forward moves the non-resident streamable weights once per engine (§7.3).
        return self._total - self.device_budget

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            **self._facts,
            "engines": self._engines,
            "engine_streamable_bytes": [int(s) for s in self._ws.streamable_budget],
            "total_device_budget": self._total,
            "device_budget": self.device_budget,
            "automatic_budget_at_load": self.automatic_budget_at_load,  # TensorRT's own choice
            "budget_changes": self.budget_changes,
            # Each change re-creates every engine's execution context (§1.5).
            "context_rebuilds": self.budget_changes * len(self._engines),
            "budget_change_cost": self.budget_change_cost,
            "needs_warmup": self.needs_warmup,
            "kv_cache": False,
            "memory_plan_note": (
                "activations are sized for the max shape the module was built for "
                f"(batch {self.config.max_batch}, seq {self.config.max_seq_len}): TensorRT "
                "allocates a context's memory statically, so smaller batches free none of it; "
                "streaming scratch and workspace are estimates (TensorRT does not expose them)"
            ),
        }

    def close(self) -> None:
        self._module = None
        if self.config.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


@dataclass
class _Sequence:
    """Generation state: the prompt; the full sequence is prompt + generated tokens."""

    prompt: Any  # [B, isl] int64
