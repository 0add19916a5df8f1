"""The Torch-TensorRT engine: TensorRT's own weight streaming, with a KV cache.

``load`` exports :class:`~autotune.engines._trt_model.ExportLlama` (the model as one function
of plain tensors; the KV cache an explicit input and output) with ``torch.export``, batch and
call length dynamic, compiles it once with ``torch_tensorrt.dynamo.compile(...,
enable_weight_streaming=True)`` (or reloads it from the on-disk cache), and sets budgets
through ``torch_tensorrt.runtime.weight_streaming``, reading every applied budget back. A
generation is one prefill call and one call per decode step against a static cache, so every
decode step does the same work (``uniform_decode_steps``). Option ``kv_cache=False`` runs
Torch-TensorRT's example instead: no cache, every step a forward over the whole sequence.

TensorRT allocates its memory outside PyTorch's allocator, so on a GPU the engine measures,
once at load, what NVML sees at a few budgets, and plans from that
(:meth:`TensorRTEngine.memory_plan`). The prompt goes through in chunks (``prefill_chunk``),
so that no call is batch x isl tokens: TensorRT reserves activation memory for the largest
call. torch_tensorrt is imported inside ``load`` only, so
``import autotune.engines`` never needs it. Section numbers refer to
``research/torch-tensorrt-weight-streaming.md``. This module does not time generation
(:mod:`autotune.measure.timing` does) and does not use CUDA graphs (TensorRT-RTX does not support
them with weight streaming, §1.6).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
import logging
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

from autotune.engines._trt_build import (
    BuildShapes,
    attention_option,
    cache_inputs,
    cache_tensors,
    compile_options,
    device_identity,
    export_model,
    import_torch_tensorrt,
    installed_version,
    kernel_specialization,
    parse_attention,
    parse_version,
    python_runtime_shares,
    resolve_attention,
    versions,
    warnings_to_debug,
)
from autotune.engines._trt_cache import ModuleCache, cache_key, default_cache_dir, release_host_copy
from autotune.engines.base import (
    EngineConfig,
    Generation,
    clamp_budget,
    flag,
    random_prompt,
    say_loading,
)
from autotune.engines.memory import MemoryPlan, kv_cache_bytes, prefill_activation_bytes
from autotune.errors import EngineUnavailableError, UserInputError
from autotune.models import ModelSpec, dtype_bytes, get_spec

log = logging.getLogger(__name__)

# Where nothing was measured (CPU, the test double): TensorRT's tactic workspace and the
# context's bookkeeping, an estimate (Torch-TensorRT exposes neither, §5).
_WORKSPACE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class MemoryCalibration:
    """What NVML saw this process hold at a few budgets, each after a generation with the
    PyTorch cache then freed: ``points`` = ((budget, bytes), ...), budgets ascending.

    The memory beyond the budget itself (the CUDA context, TensorRT's context memory, the
    weights it never streams, and its staging of streamed weights) is not a constant: the
    staging depends on the budget (§6, ``getWeightStreamingScratchMemorySize``), and
    Torch-TensorRT exposes no way to ask. So it is measured at several budgets, and between
    two measured budgets the larger of their two figures is taken (a plan may err high, never
    low)."""

    points: tuple[tuple[int, int], ...]
    total: int  # the streamable bytes at the time
    # The first point taken apart: the generation's batch and tokens, then bytes: what NVML saw
    # once PyTorch's cache was freed, and PyTorch's peak in the generation with what of it the
    # plan counts elsewhere; so that a large fixed part can be traced to TensorRT or PyTorch.
    parts: dict[str, int] = dataclasses.field(default_factory=dict, hash=False)

    def beyond_budget(self, budget: int) -> int:
        """Bytes held besides the resident budget at ``budget`` (see the class docstring)."""
        over = [(b, used - b) for b, used in self.points]
        for (b0, o0), (b1, o1) in itertools.pairwise(over):
            if budget == b0:
                return o0
            if b0 < budget <= b1:
                return o1 if budget == b1 else max(o0, o1)
        return over[-1][1] if budget >= over[-1][0] else over[0][1]

    @property
    def least(self) -> int:
        """The smallest of those figures: the part that is not staging."""
        return min(used - b for b, used in self.points)


class TensorRTEngine:
    """A Torch-TensorRT module compiled with weight streaming, behind the Engine contract."""

    name: ClassVar[str] = "tensorrt"
    # Each budget change re-creates every engine's execution context and re-uploads the
    # resident weights (§1.5): the search avoids changes it need not make.
    budget_change_cost: ClassVar[str] = "high"
    engine_options: ClassVar[dict[str, str]] = {
        "kv_cache": "true (default): a static KV cache, one call per decode step; false: "
                    "Torch-TensorRT's example, every step recomputes the whole sequence",
        "opt_batch": "batch the TensorRT profile is optimized for (default: the largest)",
        "opt_seq_len": "tokens per call the profile is optimized for (default 1 with the cache)",
        "prefill_chunk": "prompt tokens per sequence in one prefill call (default: "
                         "1024 tokens a call over the largest batch; TensorRT sizes its "
                         "activation memory for the largest call)",
        "attention": "where attention over the KV cache runs: auto (default: torch up to "
                     "Torch-TensorRT 2.12, else tensorrt), tensorrt (inside the engine, which "
                     "then holds about one more cache of the largest batch) or torch (PyTorch "
                     "between engines, one engine per layer, their contexts on one buffer; "
                     "docs/tensorrt.md)",
        "kernel_specialization": "TensorRT-RTX's kernels for a new shape, where autotune makes "
                                 "the contexts (attention=torch up to Torch-TensorRT 2.12): "
                                 "lazy (TensorRT-RTX's default: a fallback kernel until the "
                                 "specialized one is compiled in the background), eager "
                                 "(compiled at the shape's first call) or none (the fallback "
                                 "kernel always)",
        "torch_executed_ops": "operators left to PyTorch, comma-separated (for example "
                              "torch.ops.aten.matmul.default)",
        "trt_cache": "reuse compiled modules from the on-disk cache (default true)",
        "trt_cache_dir": "the compiled-module cache directory (this host's)",
    }
    host_options: ClassVar[tuple[str, ...]] = ("trt_cache_dir",)

    # auto resolves by the Torch-TensorRT installed (resolve_attention); before it existed
    # attention ran in TensorRT.
    resolved_options: ClassVar[dict[str, tuple[str, Any]]] = {
        "attention": ("attention", "tensorrt")}

    @classmethod
    def options_giving(cls, facts: dict[str, Any]) -> dict[str, str]:
        """The ``attention`` option that gives the module ``facts`` (``describe()``'s)
        describes."""
        return {"attention": facts.get("attention", "tensorrt")}

    @classmethod
    def resolved_before_load(cls, options: tuple[tuple[str, Any], ...]) -> dict[str, Any] | None:
        """What ``auto`` resolves to on this host, known without loading (the installed
        Torch-TensorRT's version): a resumed study compares it before a compile. None where
        the version cannot be read without importing it: then the load's facts decide."""
        value = parse_attention(dict(options).get("attention", "auto"))
        if value == "auto" and installed_version() is None:
            return None
        return {"attention": resolve_attention(value)}

    def __init__(self, config: EngineConfig, spec: ModelSpec, trt: Any, module: Any,
                 shapes: BuildShapes, facts: dict[str, Any]) -> None:
        self.config, self.spec = config, spec
        self._trt, self._module, self._shapes = trt, module, shapes
        self._facts = facts
        self.kv_cache = shapes.kv_cache
        # A static cache makes every decode step the same work: time a few, extrapolate.
        self.uniform_decode_steps = self.kv_cache
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
        # attention=torch up to 2.12: every context on one buffer, which the modules hold and
        # each budget change makes again (set_module_budget).
        self._specialization = kernel_specialization(config)
        if _python_modules(self._ws):
            for _, mod in self._ws.rt_mods:
                _remake_user_managed(mod, self._specialization)
            _share_memory(self._ws, config.device)
        self.budget_changes = 0
        self.budget_change_s = 0.0  # the setter's own time, summed (eager rebuilds show here)
        self.calibration: MemoryCalibration | None = None
        # Bytes by which measured peaks passed the plan, summed over trials (learn_peak): the
        # calibration runs one shape per budget, and a trial may meet memory it did not.
        self.plan_correction = 0
        # Keys [L, B, KV, d, S] and values [L, B, KV, S, d], reused while the batch is the
        # same, and their per-layer views, the engine's cache arguments.
        self._cache: Any = None
        self._cache_args: list[Any] = []
        self._positions: Any = None  # [S] int64 on the device: sliced, never re-created

    @classmethod
    def host_bytes(cls, config: EngineConfig) -> int:
        """Peak host memory: the engine keeps all its weights in a host buffer (streamed ones
        included), beside PyTorch's copy of the model while it compiles (research §5)."""
        return 2 * get_spec(config.model, config.weights).weight_bytes(config.dtype)

    @classmethod
    def check_config(cls, config: EngineConfig) -> None:
        """Every option's value, before anything loads or compiles."""
        BuildShapes.from_config(config, kv_cache=flag(config, "kv_cache", True))
        parse_attention(config.option("attention", "auto"))
        kernel_specialization(config)
        flag(config, "trt_cache", True)

    @classmethod
    def load(cls, config: EngineConfig) -> TensorRTEngine:
        trt = import_torch_tensorrt()
        version = parse_version(trt.__version__)
        spec = get_spec(config.model, config.weights)
        shapes = BuildShapes.from_config(config, kv_cache=flag(config, "kv_cache", True))
        torch_ops = _op_names(config.option("torch_executed_ops", ()))
        attention = attention_option(config)
        found = versions(trt)
        python_runtime = shares_context_memory(trt, attention)
        specialization = kernel_specialization(config)
        rtx_enum = hasattr(sys.modules.get("tensorrt"), "DynamicShapesKernelSpecializationStrategy")
        if specialization is not None and not (
                python_runtime and found["tensorrt_backend"] == "tensorrt_rtx" and rtx_enum):
            raise UserInputError(
                "--engine-option kernel_specialization: applies where autotune makes the "
                "engines' contexts, with attention=torch on TensorRT-RTX (bindings with "
                "DynamicShapesKernelSpecializationStrategy) up to Torch-TensorRT 2.12; here "
                f"attention={attention}, Torch-TensorRT {trt.__version__} on "
                f"{found['tensorrt_backend']} {found['tensorrt']}")
        key = cache_key({
            "model": dataclasses.asdict(spec), "seed": config.seed, "dtype": config.dtype,
            "shapes": shapes.as_dict(), "torch_executed_ops": torch_ops, "versions": found,
            "device": device_identity(config.device), "export": _EXPORT_FORMAT,
            # Only where it differs from the default, so that modules cached before the
            # option existed keep their keys.
            **({"attention": attention} if attention != "tensorrt" else {}),
            **({"attention_format": _TORCH_ATTENTION_FORMAT} if attention == "torch" else {}),
            **({"runtime": "python"} if python_runtime else {}),
        })
        cache = ModuleCache(config.option("trt_cache_dir") or default_cache_dir())
        use_cache = flag(config, "trt_cache", True)
        engine_class = (trt.dynamo.runtime.PythonTorchTensorRTModule if python_runtime
                        else trt.dynamo.runtime.TorchTensorRTModule)
        # Export and compile raise warnings a user cannot act on: the debug log has them.
        # A cached attention=torch graph calls autotune's own ops: registered before it is
        # unpickled, or a worker that has not compiled reads every entry as unreadable.
        importlib.import_module("autotune.engines._trt_model")
        with warnings_to_debug(log):
            if use_cache and cache.has(key):
                say_loading("reading the compiled module from the cache")
            hit = cache.load(key, engine_class) if use_cache else None
            start = time.perf_counter()
            compile_s = 0.0
            if hit is not None:
                module, _ = hit
                log.info("loaded compiled TensorRT module from %s", cache.path(key))
            else:
                say_loading("compiling with Torch-TensorRT (minutes for a 7B model; cached "
                            "for the next load)")
                module = cls._compile(trt, version, spec, config, shapes, torch_ops)
                compile_s = time.perf_counter() - start
                if use_cache:
                    say_loading("writing the compiled module to the cache")
                    try:
                        cache.save(key, module, {"versions": found})
                    except Exception as e:  # a cache is a saving, never a reason to fail the load
                        log.warning("could not write the TensorRT cache %s (%s: %s); the next "
                                    "load compiles again", cache.path(key), type(e).__name__, e)
                release_host_copy(module)
            if config.device.startswith("cuda"):
                module = module.to(config.device)  # the PyTorch children; engines stay put
            load_s = time.perf_counter() - start
            facts = {
                "versions": found, "built_for": shapes.as_dict(), "cache_hit": hit is not None,
                "cache_path": str(cache.path(key)) if use_cache else None,
                "compile_s": round(compile_s, 2), "load_s": load_s, "attention": attention,
                "compile_options": {
                    k: sorted(map(str, v)) if isinstance(v, set) else v
                    for k, v in compile_options(version, config.dtype).items()
                }, "torch_executed_ops": torch_ops,
                "summary": _summary(found, hit is not None, compile_s, load_s, use_cache, shapes,
                                    attention, module),
            }
            engine = cls(config, spec, trt, module, shapes, facts)
            if config.device.startswith("cuda"):
                say_loading("measuring TensorRT's memory at a few budgets (NVML)")
                engine.calibrate_memory()
        return engine

    @staticmethod
    def _compile(trt: Any, version: tuple[int, int], spec: ModelSpec, config: EngineConfig,
                 shapes: BuildShapes, torch_ops: list[str]) -> Any:
        import torch

        ep = export_model(spec, config, shapes)
        options = compile_options(version, config.dtype)
        if torch_ops:
            options["torch_executed_ops"] = set(torch_ops)
        parameters = inspect.signature(trt.dynamo.compile).parameters
        attention = attention_option(config)
        if shares_context_memory(trt, attention):
            # One engine per layer: each context would hold its own memory, the streaming
            # scratch with it. The Python runtime's contexts can be made again user-managed,
            # all given one buffer (set_module_budget).
            options["use_python_runtime"] = True
        elif attention == "torch" and "dynamically_allocate_resources" in parameters:
            # 2.13+: context memory per call, one engine's held at a time (TensorRT still
            # allocates each one's streaming scratch: benchmarks/results/issue18).
            options["dynamically_allocate_resources"] = True
        if config.device.startswith("cuda"):
            device = torch.device(config.device)
            if device.index is None:  # Torch-TensorRT's Device needs the index ("cuda" fails)
                device = torch.device("cuda", torch.cuda.current_device())
            options["device"] = device
            # The exported weights leave the GPU once lowered, so the build has it to itself.
            if "offload_module_to_cpu" in parameters:
                options["offload_module_to_cpu"] = True
        log.info("compiling %s (%s) with Torch-TensorRT %s", spec.name, config.dtype,
                 trt.__version__)
        with warnings.catch_warnings():
            # 2.10-2.12 warn on every call that use_explicit_typing is deprecated, even when
            # it is required (§2); the note explains it, the user cannot act on it.
            warnings.filterwarnings("ignore", ".*use_explicit_typing.*", DeprecationWarning)
            module = trt.dynamo.compile(ep, inputs=shapes.inputs(trt, spec, config.dtype),
                                        **options)
        del ep
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the exported model's weights: TensorRT has its own
        return module

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
        start = time.perf_counter()
        set_module_budget(self._trt, self._ws, requested, self.config.device,
                          self._specialization)
        applied = self.device_budget  # the sum the engines really applied (§5: read it back)
        self.synchronize()
        self.budget_change_s += time.perf_counter() - start
        if applied != requested:
            log.warning(
                "TensorRT applied a device budget of %d bytes, not the %d requested "
                "(proportional split rounds down by up to %d bytes; a larger gap means the "
                "budget was rejected)", applied, requested, len(self._engines) - 1,
            )
        self.budget_changes += 1

    def applied_budget(self, budget: int) -> int:
        """What assigning ``budget`` applies: the proportional split rounds each engine's
        share down (§1.2), without applying it."""
        return sum(_shares(self._ws, clamp_budget(budget, self._total, log)))

    def get_automatic_weight_streaming_budget(self) -> int:
        # Sum of per-engine heuristics: non-deterministic, may over-commit (§5). A reference
        # point, never an Optuna parameter.
        return min(int(self._ws.get_automatic_weight_streaming_budget()), self._total)

    # -- generation --------------------------------------------------------------------------

    def _check(self, prompt: Any, osl: int) -> tuple[int, int]:
        if prompt.dim() != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
            raise UserInputError(
                f"prompt: expected token ids [batch, isl]; got {tuple(prompt.shape)}")
        batch, isl = (int(d) for d in prompt.shape)
        if not 1 <= batch <= self._shapes.max_batch:
            raise UserInputError(
                f"batch: the TensorRT module was built for 1..{self._shapes.max_batch}; "
                f"got {batch}")
        if not isinstance(osl, int) or osl < 1 or isl + osl > self._shapes.cache_len:
            raise UserInputError(
                f"isl + osl: the TensorRT module was built for sequences up to "
                f"{self._shapes.cache_len} tokens; got isl {isl} + osl {osl}")
        return batch, isl

    def _call(self, *args: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self._module(*args)

    def _positions_for(self, device: Any) -> Any:
        import torch

        if self._positions is None:
            self._positions = torch.arange(self._shapes.cache_len, device=device)
        return self._positions

    def prefill(self, prompt: Any, osl: int) -> Generation:
        import torch

        batch, isl = self._check(prompt, osl)
        positions = self._positions_for(prompt.device)
        out = torch.empty(batch, osl, dtype=torch.long, device=prompt.device)
        if self.kv_cache:
            if self._cache is None or self._cache[0].shape[1] != batch:
                self._new_cache(batch, prompt.device)
            # The prompt in chunks (BuildShapes: no call larger than the profile's corner).
            # A reused cache keeps the last generation's keys beyond the prompt: finite values
            # the mask hides, so nothing needs clearing on the timed path.
            chunk = self._shapes.max_seq
            for a in range(0, isl, chunk):
                b = min(isl, a + chunk)
                logits = self._step(prompt[:, a:b].contiguous(), positions[a:b], a, b)
            state: Any = None
        else:
            logits = self._call(prompt, positions[:isl])
            state = prompt
        out[:, 0] = logits.argmax(dim=-1)
        return Generation(batch=batch, isl=isl, osl=osl, tokens=out[:, :1],
                          state=_State(out, 1, state))

    def decode(self, gen: Generation, steps: int) -> None:
        import torch

        st: _State = gen.state
        if steps < 0 or st.n + steps > gen.osl:
            raise UserInputError(
                f"decode: {steps} steps would pass osl {gen.osl} ({st.n} tokens generated)")
        positions = self._positions_for(st.out.device)
        for _ in range(steps):
            p = gen.isl + st.n - 1  # the position of the token fed in
            tok = st.out[:, st.n - 1:st.n]  # [B, 1]
            if self.kv_cache:
                logits = self._step(tok, positions[p:p + 1], p, p + 1)
            else:
                seq = torch.cat([st.prompt, st.out[:, :st.n]], dim=1)  # [B, isl + n]
                logits = self._call(seq, positions[:p + 1])
            st.out[:, st.n] = logits.argmax(dim=-1)
            st.n += 1
        gen.tokens = st.out[:, :st.n]

    def _step(self, tokens: Any, positions: Any, a: int, b: int) -> Any:
        """One call against the cache for positions [a, b); writes their keys and values."""
        logits, *new = self._call(tokens, positions, *self._cache_args)
        keys, values = self._cache
        if self._facts["attention"] != "torch":  # stacked: [L, ...] each
            keys[..., a:b].copy_(new[0])
            values[:, :, :, a:b].copy_(new[1])
            return logits
        layers = len(new) // 2  # each layer's apart (ExportLlama.forward)
        for i in range(layers):
            keys[i, ..., a:b].copy_(new[i])
            values[i, :, :, a:b].copy_(new[layers + i])
        return logits

    def _new_cache(self, batch: int, device: Any) -> None:
        self._cache, self._cache_args = None, []
        if self.config.device.startswith("cuda"):
            import torch

            # The previous batch's cache goes back, so the process holds what this batch
            # needs (the memory plan's figure), not the largest batch seen so far.
            torch.cuda.empty_cache()
        self._cache = cache_tensors(self.spec, self.config.dtype, batch, self._shapes.cache_len,
                                    device)
        self._cache_args = cache_inputs(*self._cache)

    def synchronize(self) -> None:
        if self.config.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.config.device)

    # -- memory and reporting ----------------------------------------------------------------

    # Budgets calibrated, as fractions of the largest budget that fits beside batch 1: the
    # staging changes most near 0 (where it starts), so the points crowd there.
    CALIBRATION_FRACTIONS: ClassVar[tuple[float, ...]] = (0.0, 0.125, 0.5, 1.0)

    def calibrate_memory(self) -> MemoryCalibration:
        """Measures what NVML sees at a few budgets (:class:`MemoryCalibration`), each after a
        generation of the largest call the module serves (TensorRT may allocate per shape),
        the PyTorch cache then freed: TensorRT's own allocations are not predictable from
        outside (§5). The budgets run from 0 up to the largest that fits beside batch 1
        (every budget, the total included, where the model fits)."""
        before = self.device_budget
        zero, parts = self._held_after_generation(0)
        room = max(0, self._usable_bytes() - zero - self._cache_bytes(1))
        top = min(self._total, room)
        points = [(0, zero)]
        for fraction in self.CALIBRATION_FRACTIONS[1:]:
            budget = self.applied_budget(int(fraction * top))
            if budget > points[-1][0]:
                points.append((budget, self._held_after_generation(budget)[0]))
        self.calibration = MemoryCalibration(points=tuple(points), total=self._total,
                                             parts=parts)
        self.device_budget = before
        log.debug("memory calibration (budget, NVML bytes): %s", points)
        return self.calibration

    def _held_after_generation(self, budget: int) -> tuple[int, dict[str, int]]:
        """NVML's figure for this process at ``budget`` after one generation of the largest
        call (batch 1 where the largest batch does not fit), the PyTorch cache freed, plus
        what PyTorch's allocator held during it beyond the tensors the plan counts: the
        context memory of engines that allocate it per call (``attention=torch``), which
        NVML no longer sees once the call is over. With it, its parts
        (``MemoryCalibration.parts``)."""
        import torch

        self.device_budget = budget
        longest = max(1, min(self._shapes.max_seq, self._shapes.cache_len - 2))
        transient = 0
        parts = {"batch": 0}  # 0: no batch fitted (both ran out)
        for batch in dict.fromkeys((self._shapes.max_batch, 1)):
            try:
                prompt = random_prompt(batch, longest, self.spec.vocab_size, 0,
                                       self.config.device)
                torch.cuda.reset_peak_memory_stats(self.config.device)
                before = torch.cuda.memory_allocated(self.config.device)
                gen = self.prefill(prompt, 2)
                self.decode(gen, 1)
                self.synchronize()
                peak = torch.cuda.max_memory_allocated(self.config.device) - before
                planned = self._planned_tensors(batch, longest)
                transient = max(0, peak - planned)
                parts = {"batch": batch, "tokens": longest, "torch_peak": peak,
                         "torch_planned": planned}
                del gen
                break
            except torch.OutOfMemoryError:  # the largest batch does not fit here
                self._cache, self._cache_args = None, []
                torch.cuda.empty_cache()
        self._cache, self._cache_args = None, []
        torch.cuda.empty_cache()
        used = self.device_used_bytes()
        # PyTorch's part of NVML's figure: live tensors, and segments they keep from being
        # freed; the rest is the CUDA context's and TensorRT's.
        parts.update(nvml_after_freed=used, torch_transient=transient,
                     torch_live_after_freed=torch.cuda.memory_allocated(self.config.device),
                     torch_reserved_after_freed=torch.cuda.memory_reserved(self.config.device))
        return used + transient, parts

    def _output_bytes(self, batch: int) -> int:
        return batch * self.spec.vocab_size * dtype_bytes(self.config.dtype) * 2

    def _planned_tensors(self, batch: int, isl: int) -> int:
        """The PyTorch tensors a generation holds, as the memory plan counts them: the
        cache, one prefill call's new keys and values, and the logits."""
        kv = 0
        if self.kv_cache:
            kv = self._cache_bytes(batch) + kv_cache_bytes(
                self.spec, self.config.dtype, batch, min(isl, self._shapes.max_seq))
        return kv + self._output_bytes(batch)

    def _cache_bytes(self, batch: int) -> int:
        return kv_cache_bytes(self.spec, self.config.dtype, batch, self._shapes.cache_len)

    def _usable_bytes(self) -> int:
        """What this process could hold: what it holds plus NVML's free memory, within
        ``gpu_memory_limit`` (the GPU being emulated)."""
        from autotune import gpu

        usable = self.device_used_bytes() + int(gpu.free_bytes(self.config.device))
        limit = self.config.gpu_memory_limit
        return min(usable, limit) if limit is not None else usable

    def device_used_bytes(self) -> int:
        """This process's device memory by NVML (the whole device's use where NVML cannot
        attribute memory to processes, as in some containers)."""
        import torch

        from autotune import gpu

        used = gpu.process_used_bytes(self.config.device)
        if used is None:
            free, total = torch.cuda.mem_get_info(self.config.device)
            used = total - free
        return int(used)

    def device_bytes_held(self) -> int:
        """What this process holds on the device now, which a configuration would reuse: the
        worker adds it to NVML's free memory (TensorRT's memory is not PyTorch's)."""
        return self.device_used_bytes()

    def memory_plan(self, batch: int, isl: int, osl: int, budget: int) -> MemoryPlan:
        """Peak device memory as NVML sees it. Resident = weights TensorRT never streams +
        budget; scratch = its staging when anything streams; the KV cache and the prefill's
        new keys and values are PyTorch tensors; activations = the context's static memory,
        sized for the largest shape the module was built for, whatever the batch (§2), plus
        the logits. On a GPU the fixed parts come from :meth:`calibrate_memory`; elsewhere
        they are estimates."""
        budget = clamp_budget(budget, self._total, log)
        dt = self.config.dtype
        outputs = self._output_bytes(batch)
        kv = self._planned_tensors(batch, isl) - outputs
        nonstreamable = max(0, self.spec.weight_bytes(dt) - self._total)
        cal = self.calibration
        if cal is not None:
            beyond = cal.beyond_budget(budget)
            return MemoryPlan(resident_weights=nonstreamable + budget,
                              streaming_scratch=max(0, beyond - cal.least),
                              kv_cache=kv, activations=outputs,
                              workspace=max(0, cal.least - nonstreamable) + self.plan_correction)
        layer = self.spec.layer_params() * dtype_bytes(dt)
        # Staging for the streamed weights: about two layers in flight (an assumption).
        scratch = min(self._total - budget, 2 * layer) if budget < self._total else 0
        tokens = self._shapes.max_seq
        context = prefill_activation_bytes(self.spec, dt, self._shapes.max_batch, tokens)
        return MemoryPlan(resident_weights=nonstreamable + budget, streaming_scratch=scratch,
                          kv_cache=kv, activations=context + outputs,
                          workspace=_WORKSPACE_BYTES + self.plan_correction)

    def learn_peak(self, planned: int, measured: int) -> None:
        """Takes a trial's measured peak (NVML) against what its plan said: a plan that fell
        short grows by the shortfall for every later plan, so the next configuration that
        would not fit is refused before it runs (TensorRT's memory is outside PyTorch's
        allocator, and no cap holds it)."""
        if measured > planned:
            self.plan_correction += measured - planned
            log.info("memory plan %d bytes under NVML's peak; later plans include it",
                     measured - planned)

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
            "budget_change_s": round(self.budget_change_s, 3),
            # Each change re-creates every engine's execution context (§1.5).
            "context_rebuilds": self.budget_changes * len(self._engines),
            # attention=torch up to 2.12: one buffer for every engine's context (bytes).
            "shared_context_memory": _shared_memory_bytes(self._ws),
            # TensorRT-RTX's kernels for new shapes, where set (else its default, lazy).
            "kernel_specialization": self._specialization,
            "budget_change_cost": self.budget_change_cost,
            "kv_cache": self.kv_cache,
            "memory_calibration": (dataclasses.asdict(self.calibration)
                                   if self.calibration else None),
            "plan_correction_bytes": self.plan_correction,
            "memory_plan_note": (
                f"measured at load with NVML at {len(self.calibration.points)} budgets "
                "(TensorRT's context memory is sized for the largest call it was built for: "
                f"batch {self._shapes.max_batch}, {self._shapes.max_seq} tokens a call)"
                if self.calibration else
                "estimated: streaming scratch, context memory and workspace are not exposed "
                "by TensorRT and were not measured here"
            ),
        }

    def close(self) -> None:
        self._module = None
        _drop_shared_memory(self._ws)  # the modules outlive the engine in self._ws
        for _, mod in self._ws.rt_mods:  # contexts made from a config of ours, then the config
            if _OWN_CONFIGS.pop(mod, None) is not None:
                mod.context = None
        self._cache, self._cache_args = None, []
        if self.config.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def shares_context_memory(trt: Any, attention: str) -> bool:
    """Whether attention=torch's engines take the Python runtime, whose contexts are made in
    Python and so can share one user-managed buffer (:func:`python_runtime_shares`). 2.11's
    per-call memory hands each call's buffer over with setDeviceMemory (V1), with which
    TensorRT allocates each context's streaming scratch itself and holds it: 33 x 281 MB for
    llama2-7b on TensorRT-RTX (benchmarks/results/issue18)."""
    return attention == "torch" and python_runtime_shares(trt)


def _python_modules(ws: Any) -> bool:
    """Whether every engine is the Python runtime's, with a context of its own to replace."""
    mods = [m for _, m in ws.rt_mods]
    return bool(mods) and all(hasattr(m, "context") and hasattr(m.engine, "device_memory_size_v2")
                              for m in mods)


def _remake_user_managed(mod: Any, specialization: str | None = None) -> None:
    """The module's context made again user-managed: it holds no memory of its own, and runs
    on what ``set_device_memory`` gives it. The static one goes first. ``specialization``
    (TensorRT-RTX): how its kernels for a new shape are compiled (:func:`kernel_specialization`;
    None: as the runtime config has it)."""
    strategies = _allocation_strategies(mod.engine)
    mod.context = None
    config = getattr(mod, "runtime_config", None)  # 2.12 on TensorRT-RTX: its runtime cache
    if config is None and specialization is None:
        mod.context = mod.engine.create_execution_context(strategies.USER_MANAGED)
        return _context_changed(mod)
    wanted = (None if specialization is None else
              getattr(_specialization_strategies(mod.engine), specialization.upper()))
    own = config is None  # 2.11 on TensorRT-RTX: a config of our own, for this context only
    if own:
        config = mod.engine.create_runtime_config()
        _OWN_CONFIGS[mod] = config  # replaces the one of the context just dropped
    before = config.dynamic_shapes_kernel_specialization_strategy if wanted is not None else None
    try:
        config.set_execution_context_allocation_strategy(strategies.USER_MANAGED)
        if wanted is not None:
            config.dynamic_shapes_kernel_specialization_strategy = wanted
        mod.context = mod.engine.create_execution_context(config)
    finally:  # the module's own re-creations stay as they were
        if not own:
            config.set_execution_context_allocation_strategy(strategies.STATIC)
            if wanted is not None:
                config.dynamic_shapes_kernel_specialization_strategy = before
    _context_changed(mod)


# The runtime configs made for 2.11's modules, by module: not in the module's state (a binding
# object does not pickle), gone with the module. The engine's close() lets each context go
# before its config; a module collected without it may lose the config first.
_OWN_CONFIGS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _context_changed(mod: Any) -> None:
    states = getattr(mod, "runtime_states", None)  # 2.11: its CUDA graph records again
    if states is not None:
        states.context_changed = True


def _allocation_strategies(engine: Any) -> Any:
    """TensorRT's ``ExecutionContextAllocationStrategy``: from the ``tensorrt`` module that
    Torch-TensorRT aliases (TensorRT-RTX's too), else from the engine's own bindings."""
    return _bindings_enum(engine, "ExecutionContextAllocationStrategy")


def _specialization_strategies(engine: Any) -> Any:
    """TensorRT-RTX's ``DynamicShapesKernelSpecializationStrategy`` (LAZY, EAGER, NONE)."""
    return _bindings_enum(engine, "DynamicShapesKernelSpecializationStrategy")


def _bindings_enum(engine: Any, name: str) -> Any:
    found = getattr(sys.modules.get("tensorrt"), name, None)
    if found is None:
        found = getattr(importlib.import_module(type(engine).__module__), name)
    return found


# Where each Python-runtime engine module keeps the buffer its context runs on: the module's
# life is the contexts' life, whoever holds the module (the engine, or deploy.apply's user).
_CONTEXT_MEMORY = "_autotune_context_memory"


def _drop_shared_memory(ws: Any) -> None:
    """The modules let go of the shared buffer, once the GPU is done with it (each engine
    runs on a stream of its own, ordered after the caller's; the allocator knows only the
    caller's), so that the next one can take its place instead of joining it."""
    import torch

    mods = [m for _, m in ws.rt_mods]
    if any(_CONTEXT_MEMORY in vars(m) for m in mods):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for m in mods:
            vars(m).pop(_CONTEXT_MEMORY, None)


def _shared_memory_bytes(ws: Any) -> int | None:
    """The size of the buffer the contexts share; None where they do not share one."""
    memory = next((vars(m)[_CONTEXT_MEMORY] for _, m in ws.rt_mods if _CONTEXT_MEMORY in vars(m)),
                  None)
    return None if memory is None else int(memory.numel())


def _share_memory(ws: Any, device: str | None) -> Any:
    """One buffer of the largest engine's ``device_memory_size_v2`` (which includes the
    streaming scratch once the budget is set), given to every context, and kept by every
    module. Each engine's stream waits for the caller's and the caller's for it, so the
    engines run one after another and can share it (the same output, measured:
    benchmarks/results/issue18)."""
    import torch

    mods = [m for _, m in ws.rt_mods]
    if device is None:  # a user's module (deploy.apply): where its engines run
        index = getattr(mods[0], "target_device_id", None)
        device = ("cpu" if not torch.cuda.is_available() else
                  f"cuda:{index}" if isinstance(index, int) else "cuda")
    size = max(int(m.engine.device_memory_size_v2) for m in mods)
    memory = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    for m in mods:
        m.context.set_device_memory(memory.data_ptr(), memory.numel())
        object.__setattr__(m, _CONTEXT_MEMORY, memory)  # a plain attribute, no state-dict entry
    return memory


def set_module_budget(trt: Any, ws: Any, budget: int, device: str | None = None,
                      specialization: str | None = None) -> Any:
    """Sets ``budget`` on a compiled module through its ``weight_streaming`` object ``ws``.
    Returns the buffer that every context now shares where the engines are the Python
    runtime's (the modules keep it; the previous one is let go once every context is made
    again), else None.

    Python-runtime engines make their context again, static, at every budget change: each
    engine's is made user-managed before the next engine changes (one static context alive at
    a time), then all get one buffer.

    Engines built with dynamically_allocate_resources (attention=torch) take their context
    memory per call. Up to 2.12 a budget change re-creates each context static
    (TRTEngine::set_device_memory_budget ignores the strategy; 2.13 honours it), which then
    holds its own memory and refuses every per-call hand-over: on the H200, 33 such contexts
    made batch 1 need 18.65 GiB (benchmarks/results/issue18). There each engine gets its
    share (the same split) inside a static spell of its own, and its per-call context back
    before the next engine changes: at most one static context alive at a time, where the
    whole module's change would leave every engine's."""
    python = _python_modules(ws)
    dynamic = [getattr(m, "dynamically_allocate_resources", False) for _, m in ws.rt_mods]
    if not python and (parse_version(trt.__version__) >= (2, 13) or not any(dynamic)):
        ws.device_budget = budget
        return None
    shares = _shares(ws, budget)
    graphs = getattr(ws, "cuda_graphs_module", None)
    if graphs is not None:  # a CUDA-graphs wrapper records again, as weight_streaming asks
        graphs.is_weight_streaming_set = True
        graphs._reset_captured_graph()
    if python:
        # The old buffer stays until every context is made again: were the loop to fail
        # half-way, the contexts not reached yet still run on memory that is theirs.
        try:
            applied = 0
            for share, (_, mod) in zip(shares, ws.rt_mods, strict=True):
                mod._reset_captured_graph()
                applied += mod.set_device_memory_budget(share)
                _remake_user_managed(mod, specialization)
            object.__setattr__(ws, "device_budget", applied)  # weight_streaming's cached sum
        finally:
            _drop_shared_memory(ws)  # its block is the new buffer's, from PyTorch's cache
            memory = _share_memory(ws, device)
        return memory
    applied = 0
    for share, (_, mod), per_call in zip(shares, ws.rt_mods, dynamic, strict=True):
        if per_call:  # static first: the budget change frees it before making its own
            mod.use_dynamically_allocated_resources(False)
        mod._reset_captured_graph()
        applied += mod.set_device_memory_budget(share)
        if per_call:
            mod.use_dynamically_allocated_resources(True)
    # The weight_streaming object's cached sum, which reading its budget returns.
    object.__setattr__(ws, "device_budget", applied)
    return None


def _shares(ws: Any, budget: int) -> list[int]:
    """Each engine's part of ``budget``, split as ``weight_streaming`` splits it (§1.2)."""
    total = ws.total_device_budget
    return [int(s / total * budget) for s in ws.streamable_budget]


def _op_names(value: Any) -> list[str]:
    """``torch_executed_ops`` as names: a list (Python API) or one comma-separated string
    (``--engine-option torch_executed_ops=torch.ops.aten.bmm.default,...``)."""
    if isinstance(value, str):
        value = value.split(",")
    return sorted({str(v).strip() for v in value or () if str(v).strip()})


def _summary(found: dict[str, str], hit: bool, compile_s: float, load_s: float,
             use_cache: bool, shapes: BuildShapes, attention: str, module: Any) -> str:
    """The one line a user reads about the load: backend, versions, compile or cache hit."""
    how = (f"loaded from the cache in {load_s:.0f} s" if hit else
           f"compiled in {compile_s:.0f} s" + (", cached" if use_cache else ", not cached"))
    chunks = f"; prompts in chunks of {shapes.max_seq} tokens" if shapes.kv_cache else ""
    if attention == "torch":
        engines = sum(1 for n, _ in module.named_children() if "_run_on_acc" in n)
        chunks += f"; attention in PyTorch between {engines} engines"
    return (f"Torch-TensorRT {found['torch_tensorrt']} on {found['tensorrt_backend']} "
            f"{found['tensorrt']}; {how}{chunks}")


# Part of the cache key: a change to what is exported (ExportLlama's signature or math) must
# not reload modules compiled from the old one.
_EXPORT_FORMAT = 3
# attention=torch's own: its three ops (the heads' views and RoPE out of the engines), and each
# layer's new keys and values as outputs apart.
_TORCH_ATTENTION_FORMAT = 3


@dataclass
class _State:
    """One generation: the tokens so far in a preallocated ``[B, osl]`` buffer; without a
    KV cache, the prompt too (every step re-reads prompt + tokens)."""

    out: Any
    n: int
    prompt: Any = None
