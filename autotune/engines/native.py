"""The ``native`` engine: our Llama forward with weight streaming, static KV cache and graphs.

Loads the model once (all streamable units pinned on the host, the rest on the device), then
serves greedy generations under a device budget that can change at any time: a change only
copies units between pinned host memory and device buffers (no reload, no re-pinning) and drops
the captured CUDA graphs. Decoding captures one CUDA graph per (batch, cache length), streaming
copies and events included, and replays it each step; prefill runs eagerly.

Options (``EngineConfig.options``): ``slots`` (device slots streamed units pass through,
default 2), ``cuda_graphs`` (default True; always off on CPU), ``workspace_bytes`` (memory
plan's workspace term, see :mod:`autotune.streaming.plan`), ``stream_embed_head`` (default
True: the embedding and the LM head's vocabulary chunks are units of the budget; False: resident
outside it, the older layout), ``fused`` (default True: one GEMM for q, k, v and one for
gate, up; False: one per matrix), ``compile`` (``true``: decode steps run the unit functions
compiled by TorchInductor, :mod:`autotune.streaming.llama`; ``max-autotune``: its GEMMs too,
each the fastest of the kernels it benchmarks; the first step of each new batch compiles, in
the warm-up, before any graph is captured) and ``attention`` (``sdpa``: decode steps attend
over the whole static cache, masked; ``triton``: over its filled positions only,
:mod:`autotune.streaming.attention`, a CUDA GPU and triton needed; ``triton-rope``: that
kernel with the rotary embedding and the cache write inside; its steps cost more as
the sequence grows, so a measurement times a window at the generation's middle, see
:meth:`NativeEngine.skip`) and ``gemv`` (default ``cublas``; ``triton``: the output and down
projections of up to 16 sequences without split-K; ``triton-all``: q-k-v and gate-up too, with
the RMSNorm and SwiGLU inside, :mod:`autotune.streaming.gemv`; ``cublas-halves``: cuBLAS, with
gate-up as two GEMMs, gate's rows and up's, where its one GEMM of twice the rows fills the SMs
unevenly). ``compile`` and ``attention`` default to ``auto``: ``true`` and ``triton`` on a CUDA
GPU where the Triton attention kernel runs, with weights not stored 8-bit
(:func:`faster_step`: 72-78% of the HBM bound where
``false`` and ``sdpa`` reach 62-69%, issue 22), ``false`` and ``sdpa`` elsewhere.
``stream_embed_head``, ``fused`` and ``compile`` exist so that old and new can be measured side
by side (``benchmarks/decode.py``).

Weight precisions (``EngineConfig.quantization``, ``--quantization``): ``none`` (the compute
dtype), ``int8`` and ``fp8`` (8-bit matrices with per-row scales, widened just before each
matmul, inside the decode graph: :mod:`autotune.streaming.quant`). Each precision the config
names is loaded once, as its own store (pinned host copies); ``precision`` switches the one in
use (the others hold no device memory), and the budget then counts that precision's bytes.
:meth:`NativeEngine.accuracy` measures how far each 8-bit precision's output is from 16-bit.

One generation at a time: a new ``prefill`` invalidates the previous generation's state.
This module does not time anything (:mod:`autotune.measure.timing` does).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from autotune.engines.base import (
    EngineConfig,
    Generation,
    clamp_budget,
    flag,
    int_option,
    say_loading,
)
from autotune.engines.memory import MemoryPlan
from autotune.errors import EngineUnavailableError, UserInputError
from autotune.models import ModelSpec, get_spec, weight_source
from autotune.precision import PRECISIONS
from autotune.streaming import attention, gemv, plan, quant, triton_check
from autotune.streaming.llama import KVCache, Llama
from autotune.streaming.runtime import WeightStore, unit_layouts

log = logging.getLogger(__name__)

# The accuracy check's prompts and generated tokens (NativeEngine.accuracy).
ACCURACY_BATCH = 8
ACCURACY_STEPS = 32


def faster_step(config: EngineConfig, spec: ModelSpec, device: torch.device) -> bool:
    """Whether ``auto`` (the ``compile`` and ``attention`` options' default) takes issue 22's
    faster decode step, compiled with attention over the filled positions: where it was
    measured (``benchmarks/results/issue22``, fp16 and bf16): a CUDA GPU where the Triton
    attention kernel runs (Triton with a C compiler and Python's headers, head_dim a power
    of two of at least 16), and the compute dtype's weights alone (``--quantization none``;
    8-bit ones, loaded alone or beside them, were not measured with it)."""
    return (device.type == "cuda" and config.quantization == ("none",)
            and attention.unavailable(device, spec.head_dim) is None)


def _compile_mode(config: EngineConfig, faster: bool = False) -> str | None:
    """``torch.compile``'s mode for the ``compile`` option; None: not compiled. ``auto``: as
    ``true`` where ``faster`` (:func:`faster_step`), else ``false``. Never a mode with CUDA
    graphs of its own: the engine captures the whole step (weight copies included)."""
    value = config.option("compile", "auto")
    word = str(value).strip().lower()
    if word == "max-autotune":
        return "max-autotune-no-cudagraphs"
    if word == "auto":
        return "default" if faster else None
    try:
        return "default" if flag(config, "compile", False) else None
    except UserInputError:
        raise UserInputError(f"--engine-option compile: expected auto, true, false or "
                             f"max-autotune; got {value!r}") from None


def _kernel_choice(config: EngineConfig, key: str, choices: tuple[str, ...],
                   unavailable: Any, fallback: str | None = None) -> str:
    """A kernel option: one of ``choices``, the first the default; ``unavailable(value)`` says
    why another cannot run here (None where it can), and the refusal names ``fallback`` (by
    default the first choice) instead."""
    value = str(config.option(key, choices[0])).strip().lower()
    if value not in choices:
        expected = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        raise UserInputError(f"--engine-option {key}: expected {expected}; got "
                             f"{config.option(key)!r}")
    why = unavailable(value) if value != choices[0] else None
    if why:
        raise UserInputError(f"--engine-option {key}={value}: {why}; use "
                             f"{key}={fallback or choices[0]}")
    return value


ATTENTION_CHOICES = ("auto", "sdpa", "triton", "triton-rope")
GEMV_CHOICES = ("cublas", *gemv.TRITON_CHOICES, "cublas-halves")


def _attention(config: EngineConfig, spec: ModelSpec, device: torch.device,
               faster: bool | None = None) -> str:
    """The ``attention`` option: ``sdpa``, or ``triton`` or ``triton-rope`` where those kernels
    can run here; ``auto``: ``triton`` where ``faster`` (:func:`faster_step`, worked out here
    where not given), else ``sdpa``."""
    value = _kernel_choice(config, "attention", ATTENTION_CHOICES, lambda v: (
        attention.unavailable(device, spec.head_dim) if v.startswith("triton") else None),
        fallback="sdpa")
    if value == "auto":
        if faster is None:
            faster = faster_step(config, spec, device)
        return "triton" if faster else "sdpa"
    return value


def _gemv(config: EngineConfig, device: torch.device) -> str:
    """The ``gemv`` option: ``cublas`` or ``cublas-halves``, or ``triton`` or ``triton-all``
    where those kernels can run here."""
    return _kernel_choice(config, "gemv", GEMV_CHOICES, lambda value: (
        triton_check.unavailable(device) if value in gemv.TRITON_CHOICES else None))


def _host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (bytes); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


@dataclass
class _Static:
    """Buffers of one (batch, cache length) that a captured decode graph reads and writes."""

    key: tuple[int, int]
    cache: KVCache
    tok: torch.Tensor  # [B, 1] int64: the step's input token
    pos: torch.Tensor  # [1] int64: its position
    out: torch.Tensor  # [B] int64: the step's greedy token
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    warm: bool = False  # one eager step has run on the capture stream


@dataclass
class _GenState:
    serial: int
    out: torch.Tensor  # [B, osl] int64: the generated tokens
    n: int  # tokens generated so far


class NativeEngine:
    """Weight-streaming Llama runtime (see the module docstring)."""

    name: ClassVar[str] = "native"
    precisions: ClassVar[tuple[str, ...]] = PRECISIONS
    engine_options: ClassVar[dict[str, str]] = {
        "slots": "device slots streamed units pass through (default 2)",
        "cuda_graphs": "capture decode steps as CUDA graphs (default true; off on CPU)",
        "workspace_bytes": "the memory plan's workspace term, bytes",
        "stream_embed_head": "the embedding and the LM head (in vocabulary chunks) are units "
                             "of the budget (default true; false: always resident, as before)",
        "fused": "one GEMM for q, k, v and one for gate, up (default true; false: one each)",
        "compile": "decode steps run kernels compiled by TorchInductor: auto (the default: "
                   "true on a CUDA GPU where attention=triton runs, with --quantization none, "
                   "else false), true, "
                   "max-autotune (GEMMs too, the fastest of those benchmarked) or false; the "
                   "first step of each new batch compiles them, in the warm-up",
        "attention": "decode attention: auto (the default: triton where compile's auto is "
                     "true, else sdpa), sdpa (the whole static cache, masked), triton (a kernel "
                     "that reads the filled positions only; CUDA) or triton-rope (that kernel "
                     "with RoPE and the cache write inside)",
        "gemv": "a decode step's projections up to 16 sequences: cublas (the default), "
                "triton (output and down by a kernel without split-K; CUDA) or triton-all "
                "(q-k-v and gate-up too, with the RMSNorm and SwiGLU inside) or cublas-halves "
                "(cuBLAS, gate-up as two GEMMs: gate's rows, then up's)",
    }

    # auto resolves by the device (faster_step); before issue 22 every step was eager SDPA.
    resolved_options: ClassVar[dict[str, tuple[str, Any]]] = {
        "compile": ("compile_mode", None), "attention": ("attention", "sdpa")}

    @classmethod
    def options_giving(cls, facts: dict[str, Any]) -> dict[str, str]:
        """The ``compile`` and ``attention`` options that give the decode step ``facts``
        (``describe()``'s) describes."""
        modes = {None: "false", "default": "true", "max-autotune-no-cudagraphs": "max-autotune"}
        return {"compile": modes.get(facts.get("compile_mode"), "false"),
                "attention": facts.get("attention", "sdpa")}

    def __init__(self, config: EngineConfig, spec: ModelSpec, store: WeightStore,
                 others: dict[str, WeightStore] | None = None) -> None:
        self.config, self.spec = config, spec
        self.device = store.device
        self._store = store
        # Every precision loaded, by name; the one in use is self._store.
        self._stores = {store.quantization: store, **(others or {})}
        self._precision = store.quantization
        # The longest sequence this engine serves (the study's isl + osl), within the model's.
        self.positions = min(spec.max_position_embeddings, config.max_seq_len)
        faster = faster_step(config, spec, store.device)  # what auto resolves to, once
        self.compile_mode = _compile_mode(config, faster)
        self.attention = _attention(config, spec, store.device, faster)
        self.gemv = _gemv(config, store.device)
        self._model = Llama(spec, store, self.positions, compile_mode=self.compile_mode,
                            attention=self.attention, gemv=self.gemv)
        self._warmed_batches: set[int] = set()  # batches whose first warm-up has run
        self.cuda_graphs = flag(config, "cuda_graphs", True) and store.cuda
        # With graphs every decode step replays the same graph over the whole static cache
        # (masked beyond the position): measure.py may time a few and extrapolate, as shown
        # within 3% on the H100 (benchmarks/shortcut.py). Eager steps (CPU) do the same work
        # too, but their timing noise there exceeds 3%: they are timed in full. Attention over
        # the filled positions only costs in proportion to the position: measure.py times a
        # window centred on the generation's middle, the steps before it skipped.
        self.uniform_decode_steps = self.cuda_graphs and self.attention == "sdpa"
        self.linear_decode_steps = self.cuda_graphs and self.attention != "sdpa"
        self.workspace_bytes = int_option(config, "workspace_bytes", plan.DEFAULT_WORKSPACE, 0)
        self._budget = store.resident_bytes
        self._static: _Static | None = None
        self._serial = 0
        self._pool: Any = None
        self._capture_stream: Any = None

    @classmethod
    def host_bytes(cls, config: EngineConfig) -> int:
        """Host memory a loaded engine holds: every streamable unit pinned once (on CPU, the
        whole model), once per precision loaded (8-bit: about half the 16-bit bytes)."""
        spec = get_spec(config.model, config.weights)
        total = 0
        for p in config.quantization:
            if p == "none":
                total += spec.weight_bytes(config.dtype)
            else:
                total += sum(u.nbytes for u in unit_layouts(spec, config.dtype,
                                                           quantization=p))
        return total

    @classmethod
    def check_config(cls, config: EngineConfig) -> None:
        """Every option's value, before anything loads (whether a kernel can run on this
        device is the load's to say)."""
        int_option(config, "slots", 2)
        int_option(config, "workspace_bytes", plan.DEFAULT_WORKSPACE, 0)
        for key in ("cuda_graphs", "stream_embed_head", "fused"):
            flag(config, key, True)
        _compile_mode(config)
        _kernel_choice(config, "attention", ATTENTION_CHOICES, lambda _: None)
        _kernel_choice(config, "gemv", GEMV_CHOICES, lambda _: None)

    @classmethod
    def load(cls, config: EngineConfig) -> NativeEngine:
        spec = get_spec(config.model, config.weights)
        device = torch.device(config.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise EngineUnavailableError(
                    f"device {config.device}: CUDA is not available here; use --device cpu")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
            if config.gpu_memory_limit is not None:
                total = torch.cuda.get_device_properties(device).total_memory
                if config.gpu_memory_limit > total:
                    raise UserInputError(
                        f"gpu_memory_limit: expected at most the GPU's {total} bytes; "
                        f"got {config.gpu_memory_limit}")
                torch.cuda.set_per_process_memory_fraction(config.gpu_memory_limit / total, device)
        slots = int_option(config, "slots", 2)  # checked with the rest by load_engine
        for p in config.quantization:
            quant.check_supported(p, device)
        _attention(config, spec, device, faster=False)  # a refused option, before the weights load
        _gemv(config, device)
        stores: dict[str, WeightStore] = {}
        for p in config.quantization:
            verb = "making" if config.weights is None else "reading"  # random, or a checkpoint's
            say_loading(f"{verb} the {'' if p == 'none' else p + ' '}weights and pinning them "
                        "in host memory")
            store = WeightStore(spec, config.dtype, device, weight_source(spec, config.seed),
                                slots, stream_embed_head=flag(config, "stream_embed_head", True),
                                fused=flag(config, "fused", True), quantization=p)
            if stores:  # only the precision in use holds device memory
                store.release_device()
            stores[p] = store
        first = stores.pop(config.quantization[0])
        engine = cls(config, spec, first, stores)
        # Like Torch-TensorRT: the budget after load is the automatic one.
        engine.device_budget = engine.get_automatic_weight_streaming_budget()
        return engine

    # -- the precision --------------------------------------------------------------------

    @property
    def precision(self) -> str:
        """The weights in use: ``none``, ``int8`` or ``fp8`` (one of those loaded)."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        if value not in self._stores:
            raise UserInputError(f"precision {value!r}: this engine loaded "
                                 f"{', '.join(self._stores)} (EngineConfig.quantization)")
        if value == self._precision:
            return
        self._release_static()  # its graphs captured the old store's buffers
        self._serial += 1
        self._store.release_device()
        if self._store.cuda:
            torch.cuda.empty_cache()
        self._precision = value
        self._store = self._stores[value]
        self._model.store = self._store
        self._budget = self._store.apply_budget(0)  # the trial's budget comes next

    @property
    def total_device_budgets(self) -> dict[str, int]:
        """Streamable bytes of each precision loaded."""
        return {p: s.total for p, s in self._stores.items()}

    def _store_of(self, precision: str | None) -> WeightStore:
        if precision is None:
            return self._store
        if precision not in self._stores:
            raise UserInputError(f"precision {precision!r}: this engine loaded "
                                 f"{', '.join(self._stores)}")
        return self._stores[precision]

    # -- the budget -----------------------------------------------------------------------

    @property
    def total_device_budget(self) -> int:
        return self._store.total

    @property
    def device_budget(self) -> int:
        return self._budget

    @device_budget.setter
    def device_budget(self, value: int) -> None:
        requested = clamp_budget(value, self.total_device_budget, log)
        # A new configuration: the KV cache and graphs of the old one (which captured the old
        # slots and resident buffers) go first, so that its memory plan holds.
        self._release_static()
        self._serial += 1  # a generation in flight cannot continue under other weights
        self._budget = self._store.apply_budget(requested)
        if self._store.cuda:
            torch.cuda.empty_cache()  # freed buffers go back, so peaks describe this budget

    def applied_budget(self, budget: int, precision: str | None = None) -> int:
        """The budget that assigning ``budget`` would apply (whole units), without applying it
        (of ``precision``'s weights; None: those in use)."""
        store = self._store_of(precision)
        budget = clamp_budget(budget, store.total, log)
        want = store.choose(budget)
        return sum(s for s, r, b in zip(store.sizes, want, store.budgeted, strict=True) if r and b)

    def streamed_bytes_at(self, budget: int, precision: str | None = None) -> int:
        """Bytes a forward pass would stream under ``budget``, without applying it (the
        gathered embedding's rows are not counted: see ``streamed_bytes_per_step``); 8-bit
        weights count their bytes and their scales'."""
        store = self._store_of(precision)
        return store.streamed_at(clamp_budget(budget, store.total, log))

    def get_automatic_weight_streaming_budget(self) -> int:
        """Free device memory now (within ``gpu_memory_limit``), counting the weights this
        engine would free, minus what a batch of 1 at ``max_seq_len`` needs besides resident
        weights; capped at the total. On CPU: the total."""
        total = self.total_device_budget
        if not self._store.cuda:
            return total
        dev = self.device
        store = self._store
        held = sum(plan.alloc_size(t.numel()) for t in store.slots)
        held += sum(plan.alloc_size(d.numel())
                    for d, b in zip(store.devices, store.budgeted, strict=True)
                    if d is not None and b)
        free, _ = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        available = free + cached + held
        if self.config.gpu_memory_limit is not None:  # the cap counts reserved bytes
            available = min(available, self.config.gpu_memory_limit
                            - torch.cuda.memory_reserved(dev) + held)
        need = self.memory_plan(1, 1, self.config.max_seq_len - 1, 0)
        other = need.total - need.resident_weights + self._fixed_alloc()
        # Slots at budget 0 are the largest; a larger budget needs fewer: conservative.
        return max(0, min(total, available - other))

    # -- generation -----------------------------------------------------------------------

    def prefill(self, prompt: Any, osl: int) -> Generation:
        if prompt.dim() != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
            raise UserInputError(f"prompt: expected token ids [batch, isl]; got {tuple(prompt.shape)}")
        if not isinstance(osl, int) or osl < 1:
            raise UserInputError(f"osl: expected a positive integer; got {osl!r}")
        batch, isl = prompt.shape
        length = isl + osl
        if length > self.spec.max_position_embeddings:
            raise UserInputError(
                f"isl + osl: {length} exceeds {self.spec.name}'s "
                f"{self.spec.max_position_embeddings} positions")
        if length > self.positions:
            raise UserInputError(
                f"isl + osl: {length} exceeds the {self.positions} positions this engine was "
                f"loaded for (EngineConfig.max_seq_len)")
        st = self._static_for(batch, length)
        with torch.inference_mode():
            logits = self._model.prefill(prompt.to(self.device), st.cache)
            first = logits.argmax(dim=-1)  # [B]
            out = torch.empty(batch, osl, dtype=torch.long, device=self.device)
            out[:, 0] = first
            st.tok.copy_(first.view(batch, 1))
            st.pos.fill_(isl)
        self._serial += 1
        return Generation(batch, isl, osl, out[:, :1], _GenState(self._serial, out, 1))

    def _state(self, gen: Generation, steps: int, what: str) -> _GenState:
        state: _GenState = gen.state
        if state is None or state.serial != self._serial:
            raise UserInputError(f"{what}: this generation was superseded by a later prefill or budget change")
        if steps < 0 or state.n + steps > gen.osl:
            raise UserInputError(
                f"{what}: expected at most {gen.osl - state.n} more steps; got {steps}")
        return state

    def skip(self, gen: Generation, steps: int) -> None:
        """Moves the generation ``steps`` positions on without computing them, for timing
        (:mod:`autotune.measure.timing`): a later step attends over the skipped positions as
        over any (their keys and values are zeros or an earlier generation's), so it costs
        what it would, but its tokens are no longer the greedy ones (the last token repeats)."""
        state = self._state(gen, steps, "skip")
        st = self._static
        assert st is not None
        with torch.inference_mode():
            st.pos.add_(steps)
            state.out[:, state.n:state.n + steps].copy_(st.tok.expand(-1, steps))
        state.n += steps
        gen.tokens = state.out[:, :state.n]

    def decode(self, gen: Generation, steps: int) -> None:
        state = self._state(gen, steps, "decode")
        st = self._static
        assert st is not None
        with torch.inference_mode():
            for _ in range(steps):
                if self.cuda_graphs:
                    self._graph_step(st)
                else:
                    self._step(st, capturing=False)
                state.out[:, state.n].copy_(st.out)
                state.n += 1
        gen.tokens = state.out[:, :state.n]

    def warmup_note(self, batch: int) -> str | None:
        """What the warm-up about to run at ``batch`` does besides warming up (the progress
        line): the first one of each batch compiles, where ``compile`` is on; the first one
        of all builds the Triton kernels, where one is on. Kept here, before the
        warm-up, so that the timed decode loop keeps no account of it."""
        first = not self._warmed_batches
        if batch in self._warmed_batches:
            return None
        self._warmed_batches.add(batch)
        if self.compile_mode:
            return "compiling the decode step's kernels for this batch (once per worker)"
        built = [name for name, on in (("attention", self.attention != "sdpa"),
                                       ("GEMV", self.gemv in gemv.TRITON_CHOICES)) if on]
        if built and first:  # Triton's JIT: a warm-up or two, whatever the batch
            return f"building the {' and '.join(built)} kernel{'s' * (len(built) > 1)} " \
                   "(once per worker)"
        return None

    def synchronize(self) -> None:
        if self._store.cuda:
            torch.cuda.synchronize(self.device)

    def _static_for(self, batch: int, length: int) -> _Static:
        key = (batch, length)
        if self._static is not None and self._static.key == key:
            return self._static
        # One shape at a time: the previous cache and its graph are freed first, so memory
        # holds what the memory plan of this shape counts.
        self._release_static()
        d = self.device
        self._static = _Static(
            key=key,
            cache=KVCache(self.spec, batch, length, self._store.tdtype, d),
            tok=torch.zeros(batch, 1, dtype=torch.long, device=d),
            pos=torch.zeros(1, dtype=torch.long, device=d),
            out=torch.zeros(batch, dtype=torch.long, device=d),
        )
        return self._static

    def _step(self, st: _Static, capturing: bool) -> None:
        """One decode step on device tensors only (capturable)."""
        logits = self._model.decode(st.tok, st.pos, st.cache, capturing)
        st.out.copy_(logits.argmax(dim=-1))
        st.tok.copy_(st.out.view(-1, 1))
        st.pos.add_(1)

    def _graph_step(self, st: _Static) -> None:
        if st.graph is None:
            if self._capture_stream is None:
                self._capture_stream = torch.cuda.Stream(self.device)
                self._pool = torch.cuda.graph_pool_handle()
            cur, side = torch.cuda.current_stream(self.device), self._capture_stream
            if not st.warm:
                # Warm-up: this step runs for real, eagerly, on the stream that will capture,
                # so cuBLAS and SDPA have set up their workspaces there.
                side.wait_stream(cur)
                with torch.cuda.stream(side):
                    self._step(st, capturing=False)
                cur.wait_stream(side)
                st.warm = True
                return
            saved = self._store.capture_state()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=side):
                self._step(st, capturing=True)  # recorded, not run
            self._store.restore_state(saved)
            st.graph = graph
        self._store.before_replay()
        st.graph.replay()
        self._store.after_replay()

    def _release_static(self) -> None:
        self._drop_graphs()
        if self._static is not None and self._store.cuda:
            torch.cuda.synchronize(self.device)  # host sync: the old cache may still be read
        self._static = None
        if self._store.cuda:
            torch.cuda.empty_cache()

    def _drop_graphs(self) -> None:
        if self._static is not None:
            if self._static.graph is not None and self._store.cuda:
                torch.cuda.synchronize(self.device)  # host sync: a replay may still run
            self._static.graph = None
            self._static.warm = False

    # -- accuracy -------------------------------------------------------------------------

    def accuracy(self, isl: int, osl: int, seed: int = 0, batch: int = ACCURACY_BATCH,
                 steps: int = ACCURACY_STEPS) -> dict[str, Any]:
        """How far each 8-bit precision loaded is from 16-bit, on the same random prompts
        (``batch`` of ``isl`` tokens, seed ``seed + 1``: not the trials' prompts):

        - ``top1_agreement``: the 16-bit weights generate ``min(osl, steps)`` tokens greedily;
          then each precision reads that same sequence (teacher-forced, one pass) and the
          fraction of positions where its top-1 token equals 16-bit's top-1 is its agreement;
        - ``generated_match``: the fraction of its own greedy tokens (free-running, each
          precision from the prompt) equal to 16-bit's, position by position;
        - ``logits_rel_error``: ``||l - l16|| / ||l16||`` of the first step's logits (the
          prompt's last position), float32 norms over the batch.

        Run eagerly with nothing resident (budget 0: it fits wherever a trial did); the
        16-bit reference uses the ``none`` weights when they are loaded, else a store built
        for the check and freed after it, when the host can hold it (else not measured)."""
        from autotune.engines.base import random_prompt

        quantized = [p for p in self._stores if p != "none"]
        out: dict[str, Any] = {"batch": batch, "isl": isl, "steps": min(osl, steps),
                               "prompt_seed": seed + 1, "dtype": self.config.dtype,
                               "weights": "checkpoint" if self.spec.weights_dir else "random",
                               "precisions": {}}
        if not quantized:
            return out
        n = min(osl, steps)
        self._release_static()
        self._serial += 1  # a generation in flight does not survive the check
        was = self._precision
        self._store.release_device()
        reference = self._stores.get("none")
        transient = None
        try:
            if reference is None:
                need = sum(u.nbytes for u in unit_layouts(self.spec, self.config.dtype))
                free = _host_available_bytes()
                if free is not None and need > 0.8 * free:
                    for p in quantized:
                        out["precisions"][p] = {
                            "status": "not measured",
                            "reason": f"the 16-bit reference needs {need / 2**30:.1f} GiB of "
                                      f"host memory and {free / 2**30:.1f} GiB is available"}
                    return out
                transient = reference = WeightStore(
                    self.spec, self.config.dtype, self.device,
                    weight_source(self.spec, self.config.seed), self._store.num_slots,
                    stream_embed_head=flag(self.config, "stream_embed_head", True),
                    fused=flag(self.config, "fused", True))
            prompt = random_prompt(batch, isl, self.spec.vocab_size, seed + 1, self.device)
            ref = self._check_pass(reference, prompt, n, None)
            # The tokens come back on the host (for the comparisons): the prompt is on the device.
            sequence = torch.cat([prompt, ref["tokens"][:, :-1].to(self.device)], dim=1)
            ref_forced = self._check_pass(reference, prompt, n, sequence)
            for p in quantized:
                free_run = self._check_pass(self._stores[p], prompt, n, None)
                forced = self._check_pass(self._stores[p], prompt, n, sequence)
                first, first16 = free_run["first_logits"], ref["first_logits"]
                error = (first - first16).norm() / first16.norm().clamp_min(1e-30)
                out["precisions"][p] = {
                    "status": "ok",
                    "top1_agreement": round(float(
                        (forced["top1"] == ref_forced["top1"]).float().mean()), 5),
                    "generated_match": round(float(
                        (free_run["tokens"] == ref["tokens"]).float().mean()), 5),
                    "logits_rel_error": round(float(error), 6),
                }
        finally:
            if transient is not None:
                transient.close()
            for st in self._stores.values():
                if st.devices and any(d is not None for d, b in zip(st.devices, st.budgeted,
                                                                     strict=True) if b):
                    st.release_device()
            self._store = self._stores[was]
            self._model.store = self._store
            try:
                self._budget = self._store.apply_budget(self._budget)
            except torch.OutOfMemoryError:
                # llama3-8b at 12 GiB on the H200: the automatic budget of the load no longer
                # fits beside what the check left. Nothing resident then; a trial sets its own.
                log.warning("after the accuracy check, budget %d no longer fits: budget 0",
                            self._budget)
                self._store.release_device()
                torch.cuda.empty_cache()
                self._budget = self._store.apply_budget(0)
        return out

    def _check_pass(self, store: WeightStore, prompt: torch.Tensor, n: int,
                    sequence: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One accuracy pass on ``store`` (budget 0, eager): greedy generation of ``n``
        tokens from ``prompt``, or with ``sequence`` one teacher-forced pass whose top-1
        tokens at the ``n`` generated positions are returned."""
        store.apply_budget(0)
        model = Llama(self.spec, store, self.positions)
        batch, isl = prompt.shape
        try:
            with torch.inference_mode():
                cache = KVCache(self.spec, batch, isl + n, store.tdtype, self.device)
                if sequence is not None:
                    logits = model.prefill(sequence, cache, all_positions=True)
                    return {"top1": logits[:, isl - 1:].argmax(dim=-1).cpu()}
                logits = model.prefill(prompt, cache)
                first = logits.float().cpu()
                tok = logits.argmax(dim=-1)
                tokens = [tok]
                pos = torch.full((1,), isl, dtype=torch.long, device=self.device)
                for _ in range(n - 1):
                    tok = model.decode(tok.view(batch, 1), pos, cache).argmax(dim=-1)
                    tokens.append(tok)
                    pos += 1
                return {"tokens": torch.stack(tokens, dim=1).cpu(), "first_logits": first}
        finally:
            store.release_device()

    # -- reports --------------------------------------------------------------------------

    def _fixed_alloc(self) -> int:
        """Device bytes of the weights outside the budget (the final norm, and the embedding
        and head when they are not units of the budget)."""
        store = self._store
        return sum(plan.alloc_size(t.numel() * t.element_size()) for t in store.fixed.values()) \
            + sum(plan.alloc_size(s) for s, b in zip(store.sizes, store.budgeted, strict=True)
                  if not b)

    def memory_plan(self, batch: int, isl: int, osl: int, budget: int,
                    precision: str | None = None) -> MemoryPlan:
        store, spec, dtype = self._store_of(precision), self.spec, self.config.dtype
        budget = clamp_budget(budget, store.total, log)
        want = store.choose(budget)
        resident = sum(plan.alloc_size(t.numel() * t.element_size())
                       for t in store.fixed.values())
        resident += sum(plan.alloc_size(s) for s, r in zip(store.sizes, want, strict=True) if r)
        streamed = len(store.ring(want))
        scratch = min(store.num_slots, streamed) * plan.alloc_size(store.slot_bytes(want))
        # 8-bit weights: the widest matrix widened to the compute dtype before its matmul, a
        # transient of prefill and one the decode graph's pool keeps.
        activations = plan.prefill_bytes(spec, dtype, batch, isl) + plan.alloc_size(
            store.widen_bytes)
        if self.cuda_graphs:  # the graph's pool stays held while prefill runs
            activations += plan.decode_pool_bytes(spec, dtype, batch) + plan.alloc_size(
                store.widen_bytes)
        if store.cuda:  # the caching allocator's split blocks around the temporaries
            activations = int(activations * plan.FRAGMENTATION)
        return MemoryPlan(
            resident_weights=resident,
            streaming_scratch=scratch,
            kv_cache=plan.kv_cache_alloc(spec, dtype, batch, isl + osl),
            activations=activations,
            workspace=self.workspace_bytes,
        )

    def streamed_bytes_per_step(self) -> int:
        """Bytes copied into slots per forward pass. A gathered embedding's rows (batch x
        hidden x dtype bytes a step, read over the link) are not counted: ~1 MB at batch 128."""
        return self._store.streamed_bytes

    def describe(self) -> dict[str, Any]:
        store = self._store
        return {
            "engine": self.name,
            "model": self.spec.name,
            "dtype": self.config.dtype,
            "precision": self._precision,
            "precisions": list(self._stores),
            "total_device_budgets": self.total_device_budgets,
            "device": str(self.device),
            "units": len(store.layouts),
            "unit_bytes": sorted(set(store.sizes)),
            "head_chunks": len(store.head),
            "embedding_in_budget": store.budgeted[store.embed.index],
            "head_in_budget": store.budgeted[store.head[0].index],
            "embedding_gathered_bytes": store.gathered_bytes,
            "fused": store.fused,
            "compile_mode": self.compile_mode,
            "attention": self.attention,
            "gemv": self.gemv,
            "resident_units": sum(d is not None for d in store.devices),
            "streamed_units": len(store.streamed),
            "slots": len(store.slots),
            "slot_bytes": int(store.slots[0].numel()) if store.slots else 0,
            "cuda_graphs": self.cuda_graphs,
            "pinned_bytes": sum(s.total for s in self._stores.values()) if store.cuda else 0,
            "non_streamable_bytes": store.fixed_nbytes,
            "total_device_budget": self.total_device_budget,
            "device_budget": self.device_budget,
        }

    def close(self) -> None:
        self._release_static()
        for s in self._stores.values():
            s.close()
        # The forward pass holds itself through its unit functions (compiled or not): collected
        # now, not at some later collection, so that the next engine's memory is all free.
        self._model = None
        gc.collect()
        if self._store.cuda:
            torch.cuda.empty_cache()
            if self.config.gpu_memory_limit is not None:
                # The cap belongs to this engine, not to the process that loads the next
                # one (a benchmark running the tensorrt engine after this one ran out of
                # memory in its compile under it).
                torch.cuda.set_per_process_memory_fraction(1.0, self._store.device)
