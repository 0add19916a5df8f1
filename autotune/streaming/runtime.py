"""Streamable units, their pinned host copies, resident device buffers and the ring of slots.

A *unit* is the block of weights one piece of compute needs: a decoder layer's attention
(input norm + q, k, v, o) or its MLP (post-attention norm + gate, up, down), a chunk of the LM
head's vocabulary (rows of ``lm_head``, each no larger than the largest decoder unit, so the
slots stay that size), or the token embedding. Each unit lives in one contiguous flat buffer
(bytes), and its parameters are views into it, so one copy moves a whole unit. Every unit has a
pinned host copy, made once at load. The device budget picks which units also get a device
buffer (resident); the others are *streamed*: copied into a small ring of device slots on a
side CUDA stream, ahead of the compute that reads them, ordered by CUDA events only (no host
synchronization on the hot path). The embedding is the exception: left out of the budget, it is
*gathered*, never copied (see :meth:`WeightStore._map_embedding`).

The step protocol, driven by the model's forward pass (:mod:`autotune.streaming.llama`)::

    store.begin_step(); for i in units: w = store.acquire(i); <compute>; store.release(i)
    store.end_step()

``release(i)`` of the j-th streamed unit enqueues the copy of the next unit that uses the same
slot (streamed unit j+K, or unit j mod K of the *next* step), so the host enqueues copy and
compute interleaved, in the order the device must honour them. On CPU the same code runs with
synchronous copies and no streams, so CPU tests exercise the slots and their ordering.

This module knows nothing of attention or of generation; it does not decide the budget (the
engine does) and it does not time anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autotune.models import ModelSpec, RandomWeights, WeightSource, dtype_bytes, torch_dtype
from autotune.precision import QUANTIZED_BYTES
from autotune.streaming import quant

log = logging.getLogger(__name__)

ALIGN = 256  # bytes; every parameter view starts aligned, as kernels like it

# Parameters of a unit, in buffer order. q, k, v are adjacent (and gate, up) so that one view
# of the buffer is the fused [q; k; v] matrix: one matmul instead of three.
_ATTN = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
         "self_attn.o_proj")
_MLP = ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_SHORT = {"input_layernorm": "norm", "post_attention_layernorm": "norm", "self_attn.q_proj": "q",
          "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
          "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
_FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"
# Head chunks are whole multiples of these rows (but the last): their columns of the logits
# start aligned, and the GEMM's N dimension tiles evenly.
_HEAD_ROW_MULTIPLE = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ParamSlice:
    name: str  # Hugging Face name, e.g. model.layers.3.mlp.up_proj.weight
    key: str  # short name inside the unit: norm, q, k, v, o, gate, up, down
    shape: tuple[int, ...]
    offset: int  # bytes into the unit's flat buffer
    nbytes: int
    rows: tuple[int, int] | None = None  # rows [a, b) of the named tensor held here; None: all
    # "w": in the compute dtype; "q": 8-bit values (int8 or fp8) of a quantized matrix;
    # "s": that matrix's scales, one per row, in the compute dtype (key: "<matrix>.scale").
    fmt: str = "w"


@dataclass(frozen=True)
class UnitLayout:
    """Where each parameter of one unit lies in its flat buffer."""

    index: int  # position in the forward pass
    kind: str  # "embed", "attn", "mlp" or "head"
    layer: int  # decoder layer; -1 for the embedding and the head
    params: tuple[ParamSlice, ...]
    nbytes: int  # size of the flat buffer (bytes), padding included


def head_chunks(spec: ModelSpec, dtype: str, limit: int, quantization: str = "none"
                ) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` of the LM head, as few as keep each chunk within ``limit`` bytes
    (its buffer aligned), rows a multiple of 64 but the last."""
    row = spec.hidden_size * dtype_bytes(dtype)  # bytes
    if quantization in QUANTIZED_BYTES:  # 8-bit values and a scale per row
        row = spec.hidden_size * QUANTIZED_BYTES[quantization] + dtype_bytes(dtype)
    vocab = spec.vocab_size
    n = max(1, -(-vocab * row // limit))
    while True:
        rows = -(-vocab // n)
        rows = -(-rows // _HEAD_ROW_MULTIPLE) * _HEAD_ROW_MULTIPLE
        if _align(rows * row) <= limit or rows <= _HEAD_ROW_MULTIPLE:
            break
        n += 1
    return [(a, min(a + rows, vocab)) for a in range(0, vocab, rows)]


def unit_layouts(spec: ModelSpec, dtype: str, chunk_head: bool = True,
                 quantization: str = "none") -> list[UnitLayout]:
    """The units of ``spec`` in forward order: embed, attn 0, mlp 0, attn 1, mlp 1, ..., then
    the head's chunks (one chunk, the whole head, when ``chunk_head`` is False).

    With ``quantization`` int8 or fp8, every matrix of the decoder units and the head is held
    as 8-bit values (aligned, adjacent, so q|k|v and gate|up still fuse) followed by the
    unit's scales packed one after another (one per row, compute dtype); the norms and the
    embedding stay in the compute dtype."""
    b = dtype_bytes(dtype)
    q8 = QUANTIZED_BYTES.get(quantization)
    units: list[UnitLayout] = []

    def add(kind: str, layer: int, params: list[tuple[str, str, tuple[int, ...], Any]]) -> None:
        slices, offset = [], 0
        scales = []
        for name, key, shape, rows in params:
            numel = 1
            for s in shape:
                numel *= s
            if q8 is not None and len(shape) == 2 and kind != "embed":
                slices.append(ParamSlice(name, key, shape, offset, numel * q8, rows, "q"))
                offset = _align(offset + numel * q8)
                scales.append((name, key, shape, rows))
                continue
            slices.append(ParamSlice(name, key, shape, offset, numel * b, rows))
            offset = _align(offset + numel * b)
        for name, key, shape, rows in scales:  # packed: a unit's scales read as one vector
            slices.append(ParamSlice(name, key + ".scale", (shape[0],), offset, shape[0] * b,
                                     rows, "s"))
            offset += shape[0] * b
        units.append(UnitLayout(len(units), kind, layer, tuple(slices), _align(offset)))

    outer = spec.other_shapes()
    add("embed", -1, [(_EMBED, "embed", outer[_EMBED], None)])
    for layer in range(spec.num_hidden_layers):
        shapes = spec.layer_shapes(layer)
        for kind, names in (("attn", _ATTN), ("mlp", _MLP)):
            add(kind, layer, [(f"model.layers.{layer}.{short}.weight", _SHORT[short],
                               shapes[f"model.layers.{layer}.{short}.weight"], None)
                              for short in names])
    vocab, hidden = outer[_HEAD]
    chunks = head_chunks(spec, dtype, max(u.nbytes for u in units[1:]), quantization) \
        if chunk_head else [(0, vocab)]
    for a, z in chunks:
        add("head", -1, [(_HEAD, "head", (z - a, hidden), (a, z))])
    return units


def unit_views(layout: UnitLayout, buf: torch.Tensor, dtype: torch.dtype,
               fused: bool = True, qdtype: torch.dtype | None = None) -> dict[str, Any]:
    """Parameter views of a flat uint8 buffer (``buf`` may be longer than the unit: a slot);
    with ``fused``, also the stacked ``qkv`` and ``gate_up`` matrices (one GEMM each), and of
    a quantized unit their stacked scales (``qkv.scale``). ``qdtype``: the 8-bit values'
    dtype (int8 or float8_e4m3fn) in a quantized unit."""
    views: dict[str, Any] = {}
    by_key = {p.key: p for p in layout.params}

    def of(p: ParamSlice) -> torch.dtype:
        if p.fmt == "q":
            assert qdtype is not None, "a quantized unit needs the dtype of its values"
            return qdtype
        return dtype

    for p in layout.params:
        views[p.key] = buf[p.offset:p.offset + p.nbytes].view(of(p)).view(p.shape)
    for fused_key, keys in _FUSED.items():
        if not fused:
            break
        for suffix in ("", ".scale"):
            parts = [by_key[k + suffix] for k in keys if k + suffix in by_key]
            if len(parts) != len(keys):
                continue
            contiguous = all(a.offset + a.nbytes == c.offset
                             for a, c in zip(parts, parts[1:], strict=False))
            if not contiguous:
                continue
            rows = sum(p.shape[0] for p in parts)
            span = buf[parts[0].offset:parts[-1].offset + parts[-1].nbytes].view(of(parts[0]))
            # Rows stacked in memory: [sum of rows, hidden] (scales: [sum of rows]).
            views[fused_key + suffix] = span.view(
                (rows, parts[0].shape[1]) if suffix == "" else (rows,))
        if fused_key in views and by_key.get(keys[0] + ".scale") is not None \
                and fused_key + ".scale" not in views:
            del views[fused_key]  # values fused but not their scales: use the parts
    return views


def spread_order(n: int) -> list[int]:
    """Indices 0..n-1 such that every prefix is spread evenly (van der Corput, base 2)."""
    order: list[int] = []
    seen: set[int] = set()
    m = 0
    while len(order) < n:
        x, denom, k = 0.0, 1.0, m
        while k:
            denom *= 2
            x += (k & 1) / denom
            k >>= 1
        i = int(x * n)
        if i not in seen:
            seen.add(i)
            order.append(i)
        m += 1
    return order


def select_resident(sizes: Sequence[int], budget: int,
                    order: Sequence[int] | None = None) -> list[bool]:
    """Which units stay resident under ``budget`` bytes: greedy in ``order`` (default: spread
    order, so the streamed units fall between resident ones and their copies overlap resident
    compute); units not in ``order`` are never chosen."""
    resident = [False] * len(sizes)
    used = 0
    for i in (spread_order(len(sizes)) if order is None else order):
        if used + sizes[i] <= budget:
            resident[i] = True
            used += sizes[i]
    return resident


class _CudaArray:
    """Pinned host bytes offered as device memory: ``torch.as_tensor`` aliases (never copies)
    what a ``__cuda_array_interface__`` points at. Bytes, not the weights' dtype: the interface
    has no bfloat16."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host  # kept alive as long as the alias (torch holds this object)
        self.__cuda_array_interface__ = {"shape": (host.numel(),), "typestr": "|u1",
                                         "data": (host.data_ptr(), False), "version": 2,
                                         "strides": None}


def _take_cuda_error(device: torch.device) -> None:
    """A failed CUDA runtime call leaves its error as the thread's last error, and PyTorch's
    check after its next kernel launch raises it as that kernel's failure (a refused
    cudaHostRegister surfaced as "part or all of the requested memory range is already
    mapped" from a weight generator's normal_). One launch here takes it: the check reads
    and resets it."""
    try:
        torch.zeros(1, device=device)
    except RuntimeError:
        pass


class WeightStore:
    """All weights of a model: the final norm on the device, the units pinned on the host,
    resident units on the device, streamed units through ``slots`` device slots.

    ``stream_embed_head`` False is the older layout: the embedding and the whole LM head (one
    unit) stay resident outside the budget, as TensorRT's non-streamable weights do.
    ``fused`` False computes q, k, v (and gate, up) with one GEMM each instead of one per unit
    (for comparison). ``quantization`` int8 or fp8 holds every matrix 8-bit with per-row
    scales (:func:`unit_layouts`), on the host, in the slots and resident alike: the bytes
    that move are 8-bit; the forward pass widens each matrix just before its matmul."""

    def __init__(self, spec: ModelSpec, dtype: str, device: torch.device, source: WeightSource,
                 slots: int = 2, *, stream_embed_head: bool = True, fused: bool = True,
                 quantization: str = "none") -> None:
        if slots < 1:
            raise ValueError(f"slots: expected 1 or more; got {slots}")
        self.spec, self.dtype, self.device = spec, dtype, device
        self.tdtype = torch_dtype(dtype)
        self.quantization = quantization
        self.qdtype = quant.storage_dtype(quantization) if quantization != "none" else None
        self.num_slots = slots
        self.fused = fused
        self.layouts = unit_layouts(spec, dtype, chunk_head=stream_embed_head,
                                    quantization=quantization)
        self.embed = self.layouts[0]
        self.decoder = [u for u in self.layouts if u.kind in ("attn", "mlp")]
        self.head = [u for u in self.layouts if u.kind == "head"]
        self.sizes = [u.nbytes for u in self.layouts]
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.fixed = {"model.norm.weight": source.get(
            "model.norm.weight", (spec.hidden_size,), self.tdtype, device)}
        self._host, self._registered = self._allocate_host(sum(self.sizes))
        self.hosts: list[torch.Tensor] = []
        offset = 0
        for u in self.layouts:
            self.hosts.append(self._host[offset:offset + u.nbytes])
            offset += u.nbytes
        self._fill(source)
        # Units outside the budget are always resident; the others are chosen by the budget.
        self.budgeted = [stream_embed_head or u.kind in ("attn", "mlp") for u in self.layouts]
        self._embed_host: torch.Tensor | None = None
        if stream_embed_head:
            self._embed_host = self._map_embedding()
            self.budgeted[self.embed.index] = self._embed_host is not None
        self.total = sum(s for s, b in zip(self.sizes, self.budgeted, strict=True) if b)
        self.fixed_nbytes = self.fixed["model.norm.weight"].numel() * self.tdtype.itemsize + sum(
            s for s, b in zip(self.sizes, self.budgeted, strict=True) if not b)
        # The order units become resident in: the decoder and the head spread evenly, the
        # embedding last (gathered from the host it costs a step almost nothing).
        e = self.embed.index
        self._order = [i for i in spread_order(len(self.layouts)) if i != e and self.budgeted[i]]
        self._order += [e] if self.budgeted[e] else []
        self.devices: list[torch.Tensor | None] = [None] * len(self.layouts)
        self.slots: list[torch.Tensor] = []
        self.views: list[dict[str, Any]] = []
        self.streamed: list[int] = []  # unit indices, forward order
        self.stream_pos: list[int] = []  # unit index -> j among streamed, or -1
        self.ready: list[Any] = []  # slot -> event of its pending copy (None: ordered already)
        self.prefetched = False  # the next step's first units are in (or on their way to) slots
        self._capturing = False
        self.apply_budget(0)

    # -- load -----------------------------------------------------------------------------

    def _allocate_host(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        """One host arena for all units, pinned once. cudaHostRegister pins exactly nbytes
        (the caching host allocator would round 13.5 GB up to 16 GB) and keeps the arena out
        of that allocator's event bookkeeping, which CUDA-graph capture of copies dislikes."""
        host = torch.empty(nbytes, dtype=torch.uint8)
        if not self.cuda or nbytes == 0:
            return host, False
        cudart = torch.cuda.cudart()
        # cudaHostRegisterMapped (2): kernels may read the arena directly (the embedding).
        err = cudart.cudaHostRegister(host.data_ptr(), nbytes, 2)
        if int(getattr(err, "value", err)) == 0:
            return host, True
        _take_cuda_error(self.device)
        log.warning("cudaHostRegister failed (%s); pinning through torch's host allocator", err)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), False

    def _fill(self, source: WeightSource) -> None:
        """Writes every unit into its host buffer. Random weights are generated on the device
        (fast) and copied down; checkpoint weights come through the CPU."""
        gen_device = self.device if isinstance(source, RandomWeights) else "cpu"
        whole: dict[str, torch.Tensor] = {}  # a tensor split over units (the head), read once
        for u, host in zip(self.layouts, self.hosts, strict=True):
            views = unit_views(u, host, self.tdtype, fused=False, qdtype=self.qdtype)
            for p in u.params:
                if p.fmt == "s":  # written with its matrix
                    continue
                if p.rows is None:
                    w = source.get(p.name, p.shape, self.tdtype, gen_device)
                else:
                    if p.name not in whole:
                        whole.clear()
                        shape = self.spec.other_shapes()[p.name]
                        whole[p.name] = source.get(p.name, shape, self.tdtype, gen_device)
                    w = whole[p.name][p.rows[0]:p.rows[1]]
                if p.fmt == "q":  # the 16-bit matrix, quantized: what `none` would hold
                    values, scale = quant.quantize(w, self.quantization, self.tdtype)
                    views[p.key].copy_(values)
                    views[p.key + ".scale"].copy_(scale)
                else:
                    views[p.key].copy_(w)

    def _map_embedding(self) -> torch.Tensor | None:
        """The embedding's pinned host bytes as a tensor the step's gather kernel can read.

        A step reads only the rows of its tokens (batch x hidden x 2 bytes: 8 KiB a sequence
        at hidden 4096), so streaming the table through a slot (1.05 GB for Llama 3, ~19 ms at
        55 GB/s) would buy nothing. The host cannot gather the rows either: the tokens are made
        on the device by the previous step, inside its graph, and copying them down would
        synchronize every step. So the gather kernel reads its rows over the link from pinned
        memory mapped into the device's address space (zero-copy, unified addressing; the
        pointer is the host's on 64-bit Linux), inside the graph, for microseconds of latency.
        On CPU the host copy is the table. None where the device cannot read it (then the
        embedding stays resident, outside the budget)."""
        host = self.hosts[self.embed.index]
        if not self.cuda:
            return host
        try:
            alias = torch.as_tensor(_CudaArray(host), device=self.device)
            probe = slice(0, min(host.numel(), 2**16))
            read = (alias[probe] + 0).cpu()  # an elementwise kernel reads it, as the gather will
            ok = torch.equal(read, host[probe])
        except (RuntimeError, TypeError) as e:
            log.warning("the device cannot read pinned host memory (%s): the embedding stays "
                        "resident, outside the budget", e)
            return None
        if not ok:
            log.warning("reading pinned host memory from the device gave other bytes: the "
                        "embedding stays resident, outside the budget")
            return None
        return alias

    # -- budget ---------------------------------------------------------------------------

    @property
    def resident_bytes(self) -> int:
        """Bytes of the budgeted units resident now: the budget as applied."""
        return sum(s for s, d, b in zip(self.sizes, self.devices, self.budgeted, strict=True)
                   if d is not None and b)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied into slots per forward pass (the gathered embedding's rows excluded)."""
        return sum(self.sizes[i] for i in self.streamed)

    @property
    def gathered_bytes(self) -> int:
        """Bytes of the embedding table left on the host (0 when it is resident)."""
        return self.sizes[self.embed.index] if self.devices[self.embed.index] is None else 0

    def choose(self, budget: int) -> list[bool]:
        """Which units are resident under ``budget`` (those outside the budget always)."""
        want = select_resident(self.sizes, budget, self._order)
        return [w or not b for w, b in zip(want, self.budgeted, strict=True)]

    def ring(self, resident: Sequence[bool]) -> list[int]:
        """The units that pass through the slots, in forward order: the streamed ones but the
        embedding, which is gathered."""
        return [i for i, r in enumerate(resident) if not r and i != self.embed.index]

    def streamed_at(self, budget: int) -> int:
        """Bytes streamed per forward pass under ``budget``, without applying it."""
        return sum(self.sizes[i] for i in self.ring(self.choose(budget)))

    def slot_bytes(self, resident: Sequence[bool]) -> int:
        """Size of one slot (bytes): the largest streamed unit, 0 when nothing streams."""
        return max((self.sizes[i] for i in self.ring(resident)), default=0)

    def apply_budget(self, budget: int) -> int:
        """Makes the units :meth:`choose` picks resident; returns the budgeted ones' bytes.
        Copies from the pinned host copies: no reload, no re-pinning."""
        want = self.choose(budget)
        if self.cuda:
            # Host sync: buffers freed below may still be read by queued kernels and copies.
            # A budget change is off the hot path.
            torch.cuda.synchronize(self.device)
        self.slots, self.views = [], []  # the views hold the old slots alive
        for i, r in enumerate(want):
            if not r:
                self.devices[i] = None
        for i, r in enumerate(want):
            if r and self.devices[i] is None:
                if self.cuda:
                    buf = torch.empty(self.sizes[i], dtype=torch.uint8, device=self.device)
                    buf.copy_(self.hosts[i], non_blocking=True)
                    self.devices[i] = buf
                else:
                    self.devices[i] = self.hosts[i]  # CPU: the host copy is the device copy
        self.streamed = self.ring(want)
        self.stream_pos = [-1] * len(self.layouts)
        for j, i in enumerate(self.streamed):
            self.stream_pos[i] = j
        nslots = min(self.num_slots, len(self.streamed))
        size = self.slot_bytes(want)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device)
                      for _ in range(nslots)]
        self.views = []
        for i, u in enumerate(self.layouts):
            j = self.stream_pos[i]
            buf = self.devices[i] if j < 0 else self.slots[j % nslots]
            if buf is None:  # the embedding, gathered from the host
                buf = self._embed_host
            self.views.append(unit_views(u, buf, self.tdtype, self.fused, self.qdtype))
        self.ready = [None] * nslots
        self.prefetched = False
        if self.cuda:
            # Host sync: the resident copies above must land before anything is timed.
            torch.cuda.synchronize(self.device)
        return self.resident_bytes

    def release_device(self) -> None:
        """Frees every device buffer of the budgeted units and the slots (the host copies
        stay): another store of the same model (another precision) takes the device. The next
        :meth:`apply_budget` makes this store usable again."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # host sync: queued work may still read them
        self.slots, self.views, self.ready = [], [], []
        self.devices = [None if b else d for d, b in zip(self.devices, self.budgeted,
                                                          strict=True)]
        self.streamed, self.stream_pos = [], [-1] * len(self.layouts)
        self.prefetched = False

    @property
    def widen_bytes(self) -> int:
        """The largest matrix a quantized forward pass widens at once, in the compute dtype
        (bytes; the fused q|k|v or gate|up): a transient its memory plan counts. 0 unquantized."""
        if self.qdtype is None:
            return 0
        size = self.tdtype.itemsize
        most = 0
        for u in self.layouts:
            by_key = {p.key: p for p in u.params if p.fmt == "q"}
            groups = [[k] for k in by_key]
            if self.fused:
                groups += [[k for k in keys if k in by_key] for keys in _FUSED.values()]
            for keys in groups:
                numel = sum(by_key[k].shape[0] * by_key[k].shape[1] for k in keys)
                most = max(most, numel * size)
        return most

    # -- the step protocol ----------------------------------------------------------------

    def begin_step(self, capturing: bool = False) -> None:
        self._capturing = capturing
        if not self.streamed:
            return
        if capturing:
            # Copies enqueued before the graph are ordered by the launch (see before_replay):
            # inside the capture nothing may wait on an event recorded outside it.
            assert self.prefetched, "capture needs the step's first units prefetched"
            self.ready = [None] * len(self.slots)
            return
        if not self.prefetched:
            if self.cuda:
                # The side stream waits for all work queued so far: the slots may still be
                # read by it (or were just allocated on the compute stream).
                self.side.wait_event(self._record(torch.cuda.current_stream(self.device)))
            for s in range(len(self.slots)):
                self._copy(self.streamed[s], s)
            self.prefetched = True

    def acquire(self, i: int) -> dict[str, Any]:
        """Views of unit ``i``; for a streamed unit, compute first waits for its copy."""
        j = self.stream_pos[i]
        if j >= 0:
            event = self.ready[j % len(self.slots)]
            if event is not None:
                # Device-side wait: the compute stream reads the slot only after its copy.
                torch.cuda.current_stream(self.device).wait_event(event)
        return self.views[i]

    def release(self, i: int) -> None:
        """Compute on unit ``i`` is enqueued; the slot it read gets its next unit."""
        j = self.stream_pos[i]
        if j < 0:
            return
        k = len(self.slots)
        s = j % k
        nxt = j + k if j + k < len(self.streamed) else s  # else: the next step's unit in slot s
        if self.cuda:
            # The copy into slot s waits until the compute just enqueued has read it. During
            # capture this wait also forks the side stream into the graph.
            self.side.wait_event(self._record(torch.cuda.current_stream(self.device)))
        self._copy(self.streamed[nxt], s)

    def end_step(self) -> None:
        if self._capturing and self.streamed:
            # Join: a captured graph must end on its origin stream, so the graph (and each
            # replay) completes only when the next step's prefetch has landed.
            torch.cuda.current_stream(self.device).wait_event(self._record(self.side))
        self._capturing = False

    def _copy(self, unit: int, slot: int) -> None:
        """Copies one unit (bytes: sizes[unit]) from pinned host into a slot."""
        dst = self.slots[slot][:self.sizes[unit]]
        if not self.cuda:
            dst.copy_(self.hosts[unit])  # CPU: synchronous, in enqueue order
            return
        with torch.cuda.stream(self.side):
            dst.copy_(self.hosts[unit], non_blocking=True)
        self.ready[slot] = self._record(self.side)

    @staticmethod
    def _record(stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    # -- CUDA graphs ----------------------------------------------------------------------

    def capture_state(self) -> list[Any]:
        """The eager copy events pending before a capture, restored after it."""
        return list(self.ready)

    def restore_state(self, ready: list[Any]) -> None:
        self.ready = ready
        self.prefetched = True

    def before_replay(self) -> None:
        """A graph starts with its first units already in slots: wait (device side) for eager
        prefetches still in flight; the graph itself waits on nothing outside it."""
        stream = torch.cuda.current_stream(self.device)
        for event in self.ready:
            if event is not None:
                stream.wait_event(event)

    def after_replay(self) -> None:
        # The replay joined its copies back: what it prefetched is ordered before later work.
        self.ready = [None] * len(self.slots)
        self.prefetched = True

    # -- end ------------------------------------------------------------------------------

    def __del__(self) -> None:
        # Dropped without close() (a failed test, a notebook's reassignment): an arena freed
        # still registered makes the next one at its address fail to register.
        if getattr(self, "_registered", False):
            try:
                # Collected in a stream capture, the synchronize would break the capture:
                # better to leave the arena registered.
                if not torch.cuda.is_current_stream_capturing():
                    self._unregister()
            except Exception:  # at interpreter exit CUDA may be gone already
                pass

    def _unregister(self) -> None:
        torch.cuda.synchronize(self.device)  # host sync: nothing may still read the arena
        self._embed_host = None  # the device's alias of the arena goes before the arena
        err = torch.cuda.cudart().cudaHostUnregister(self._host.data_ptr())
        self._registered = False
        if int(getattr(err, "value", err)) != 0:
            _take_cuda_error(self.device)
            log.warning("cudaHostUnregister failed (%s)", err)

    def close(self) -> None:
        if self._registered:
            self._unregister()  # synchronizes first
        elif self.cuda:
            torch.cuda.synchronize(self.device)  # host sync: nothing may still read the buffers
        self.devices = [None] * len(self.layouts)
        self.slots, self.views, self.fixed = [], [], {}
        self._embed_host = None
        self.hosts = []
        self._host = torch.empty(0, dtype=torch.uint8)
