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
outside it, the older layout) and ``fused`` (default True: one GEMM for q, k, v and one for
gate, up; False: one per matrix). The last two exist so that old and new can be measured side
by side (``benchmarks/decode.py``).

One generation at a time: a new ``prefill`` invalidates the previous generation's state.
This module does not time anything (:mod:`autotune.measure.timing` does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from autotune.engines.base import EngineConfig, Generation, clamp_budget, flag
from autotune.engines.memory import MemoryPlan
from autotune.errors import EngineUnavailableError, UserInputError
from autotune.models import ModelSpec, get_spec, weight_source
from autotune.streaming import plan
from autotune.streaming.llama import KVCache, Llama
from autotune.streaming.runtime import WeightStore

log = logging.getLogger(__name__)


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
    engine_options: ClassVar[dict[str, str]] = {
        "slots": "device slots streamed units pass through (default 2)",
        "cuda_graphs": "capture decode steps as CUDA graphs (default true; off on CPU)",
        "workspace_bytes": "the memory plan's workspace term, bytes",
        "stream_embed_head": "the embedding and the LM head (in vocabulary chunks) are units "
                             "of the budget (default true; false: always resident, as before)",
        "fused": "one GEMM for q, k, v and one for gate, up (default true; false: one each)",
    }

    def __init__(self, config: EngineConfig, spec: ModelSpec, store: WeightStore) -> None:
        self.config, self.spec = config, spec
        self.device = store.device
        self._store = store
        # The longest sequence this engine serves (the study's isl + osl), within the model's.
        self.positions = min(spec.max_position_embeddings, config.max_seq_len)
        self._model = Llama(spec, store, self.positions)
        self.cuda_graphs = flag(config, "cuda_graphs", True) and store.cuda
        # With graphs every decode step replays the same graph over the whole static cache
        # (masked beyond the position): measure.py may time a few and extrapolate, as shown
        # within 3% on the H100 (benchmarks/shortcut.py). Eager steps (CPU) do the same work
        # too, but their timing noise there exceeds 3%: they are timed in full.
        self.uniform_decode_steps = self.cuda_graphs
        self.workspace_bytes = int(config.option("workspace_bytes", plan.DEFAULT_WORKSPACE))
        self._budget = store.resident_bytes
        self._static: _Static | None = None
        self._serial = 0
        self._pool: Any = None
        self._capture_stream: Any = None

    @classmethod
    def host_bytes(cls, config: EngineConfig) -> int:
        """Host memory a loaded engine holds: every streamable unit pinned once (on CPU, the
        whole model); the whole model bounds both."""
        return get_spec(config.model, config.weights).weight_bytes(config.dtype)

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
        slots = config.option("slots", 2)
        if isinstance(slots, str) and slots.strip().isdigit():  # --engine-option slots=3
            slots = int(slots)
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise UserInputError(f"option slots: expected a positive integer; got {slots!r}")
        store = WeightStore(spec, config.dtype, device, weight_source(spec, config.seed), slots,
                            stream_embed_head=flag(config, "stream_embed_head", True),
                            fused=flag(config, "fused", True))
        engine = cls(config, spec, store)
        # Like Torch-TensorRT: the budget after load is the automatic one.
        engine.device_budget = engine.get_automatic_weight_streaming_budget()
        return engine

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

    def applied_budget(self, budget: int) -> int:
        """The budget that assigning ``budget`` would apply (whole units), without applying it."""
        budget = clamp_budget(budget, self.total_device_budget, log)
        store = self._store
        want = store.choose(budget)
        return sum(s for s, r, b in zip(store.sizes, want, store.budgeted, strict=True) if r and b)

    def streamed_bytes_at(self, budget: int) -> int:
        """Bytes a forward pass would stream under ``budget``, without applying it (the
        gathered embedding's rows are not counted: see ``streamed_bytes_per_step``)."""
        return self._store.streamed_at(clamp_budget(budget, self.total_device_budget, log))

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
        if self.config.gpu_memory_limit is not None:
            available = min(available, self.config.gpu_memory_limit
                            - torch.cuda.memory_allocated(dev) + held)
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

    def decode(self, gen: Generation, steps: int) -> None:
        state: _GenState = gen.state
        if state is None or state.serial != self._serial:
            raise UserInputError("decode: this generation was superseded by a later prefill or budget change")
        if steps < 0 or state.n + steps > gen.osl:
            raise UserInputError(
                f"decode: expected at most {gen.osl - state.n} more steps; got {steps}")
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

    # -- reports --------------------------------------------------------------------------

    def _fixed_alloc(self) -> int:
        """Device bytes of the weights outside the budget (the final norm, and the embedding
        and head when they are not units of the budget)."""
        store = self._store
        return sum(plan.alloc_size(t.numel() * t.element_size()) for t in store.fixed.values()) \
            + sum(plan.alloc_size(s) for s, b in zip(store.sizes, store.budgeted, strict=True)
                  if not b)

    def memory_plan(self, batch: int, isl: int, osl: int, budget: int) -> MemoryPlan:
        store, spec, dtype = self._store, self.spec, self.config.dtype
        budget = clamp_budget(budget, self.total_device_budget, log)
        want = store.choose(budget)
        resident = sum(plan.alloc_size(t.numel() * t.element_size())
                       for t in store.fixed.values())
        resident += sum(plan.alloc_size(s) for s, r in zip(store.sizes, want, strict=True) if r)
        streamed = len(store.ring(want))
        scratch = min(store.num_slots, streamed) * plan.alloc_size(store.slot_bytes(want))
        activations = plan.prefill_bytes(spec, dtype, batch, isl)
        if self.cuda_graphs:  # the graph's pool stays held while prefill runs
            activations += plan.decode_pool_bytes(spec, dtype, batch)
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
            "device": str(self.device),
            "units": len(store.layouts),
            "unit_bytes": sorted(set(store.sizes)),
            "head_chunks": len(store.head),
            "embedding_in_budget": store.budgeted[store.embed.index],
            "head_in_budget": store.budgeted[store.head[0].index],
            "embedding_gathered_bytes": store.gathered_bytes,
            "fused": store.fused,
            "resident_units": sum(d is not None for d in store.devices),
            "streamed_units": len(store.streamed),
            "slots": len(store.slots),
            "slot_bytes": int(store.slots[0].numel()) if store.slots else 0,
            "cuda_graphs": self.cuda_graphs,
            "pinned_bytes": store.total if store.cuda else 0,
            "non_streamable_bytes": store.fixed_nbytes,
            "total_device_budget": self.total_device_budget,
            "device_budget": self.device_budget,
        }

    def close(self) -> None:
        self._release_static()
        self._store.close()
        if self._store.cuda:
            torch.cuda.empty_cache()
            if self.config.gpu_memory_limit is not None:
                # The cap belongs to this engine, not to the process that loads the next
                # one (a benchmark running the tensorrt engine after this one ran out of
                # memory in its compile under it).
                torch.cuda.set_per_process_memory_fraction(1.0, self._store.device)
