"""The Llama forward pass of the native runtime, gpt-fast style, over a :class:`WeightStore`.

RMSNorm, rotary embeddings (Hugging Face's rotate-half convention), grouped-query attention
through ``torch.nn.functional.scaled_dot_product_attention`` over a static KV cache
``[B, kv_heads, L, head_dim]`` per layer, and the SwiGLU MLP, written so that a decode step
has static shapes and reads its position from a device tensor: a CUDA graph can capture it.
Matrices stored 8-bit (``--quantization``) are widened to the compute dtype just before their
matmul (:mod:`autotune.streaming.quant`), inside the step, so the graph captures that too.
Each unit's weights come from ``store.acquire`` / ``store.release``, which stream them; the LM
head is one or more vocabulary chunks, each writing its columns of the logits.

The arithmetic follows ``transformers``' LlamaForCausalLM (float32 RMSNorm, rotary tables in
float32 cast to the model dtype), so float32 greedy tokens equal its tokens; a few steps are
fused to cut the kernels of a decode step (which bound batch-1 speed even under a CUDA graph):
the fused RMSNorm kernel; q and k rotated together in three kernels on the projection's own
layout; the decode mask made additive once per step (a boolean mask is converted inside every
attention call); residual adds inside the output GEMMs, in place. With ``compile_mode``, each
unit of a decode step up to its output GEMM is compiled by TorchInductor instead: RMSNorm, RoPE
with the cache writes, and SwiGLU become generated kernels around the projection GEMMs and the
attention, which stay library calls (issue 22: a batch-1 step is bound by its kernel count,
not its bytes); in ``max-autotune`` mode the projection GEMMs are the fastest of the kernels
it benchmarks, cuBLAS's among them. Compilation happens at the first decode step of each new
shape, eagerly (never inside a CUDA graph capture), and prefill stays eager. This module holds
no generation loop and no CUDA graph: :mod:`autotune.engines.native` does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from autotune.models import ModelSpec
from autotune.streaming import gemv, quant
from autotune.streaming.attention import decode_attention, decode_rope_attention
from autotune.streaming.runtime import WeightStore


class KVCache:
    """Static KV cache: per layer, keys and values ``[B, kv_heads, length, head_dim]``."""

    def __init__(self, spec: ModelSpec, batch: int, length: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, spec.num_key_value_heads, length, spec.head_dim)
        # Zeros, not empty: masked positions still enter q.k, and garbage there may be NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(spec.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(spec.num_hidden_layers)]
        self.batch, self.length = batch, length


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """One fused kernel on CUDA (float32 inside); transformers rounds the normalized value
    before scaling by the weight, which differs only in the last bit."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _add_linear_(x: torch.Tensor, y: torch.Tensor, w: dict[str, Any], key: str
                 ) -> torch.Tensor:
    """``x += y @ W.T`` for the unit's matrix ``key``, as one GEMM, in place: the residual is
    its C operand and its output (out of place, ``addmm`` first copies the residual: a kernel
    per call). A matrix stored 8-bit is widened first."""
    weight = quant.weight(w, key, x.dtype)
    x.view(-1, x.shape[-1]).addmm_(y.reshape(-1, y.shape[-1]), weight.t())
    return x


def _add_linear_triton_(x: torch.Tensor, y: torch.Tensor, w: dict[str, Any], key: str
                        ) -> torch.Tensor:
    """:func:`_add_linear_` by :func:`autotune.streaming.gemv.add_linear_` (no split-K; a
    matrix stored 8-bit read as such, its scales applied in the kernel)."""
    gemv.add_linear_(x.view(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), *quant.stored(w, key))
    return x


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE, ``x * cos + cat(-x2, x1) * sin``, in three kernels: the halves swapped
    by one flip (any layout), and the minus sign of ``-x2`` carried by ``signed_sin`` =
    ``cat(-sin1, sin2)`` (exact: negation does not round). ``x`` [B, S, heads, d]; ``cos``,
    ``signed_sin`` [S, 1, d]."""
    b, s, h, d = x.shape
    swapped = x.view(b, s, h, 2, d // 2).flip(-2).view(b, s, h, d)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _small_decode(rows: int, pos: torch.Tensor | None) -> bool:
    """A decode step (``pos`` given) of few enough rows for the Triton GEMMs of ``gemv``."""
    return pos is not None and rows <= gemv.MAX_ROWS


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def rope_frequencies(spec: ModelSpec, device: Any) -> torch.Tensor:
    """The rotary inverse frequencies ``[head_dim / 2]`` (float32), scaled as the spec says.

    ``linear`` divides every frequency by ``factor``. ``llama3`` (Llama 3.1) leaves the high
    frequencies (wavelength below original context / high_freq_factor) alone, divides the low
    ones (wavelength above original context / low_freq_factor) by ``factor``, and blends the
    two linearly in original context / wavelength between them."""
    d = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (
        torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = dict(spec.rope_scaling)
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        cycles = context * inv_freq / (2 * math.pi)  # original context / wavelength
        blend = ((cycles - low) / (high - low)).clamp(0.0, 1.0)  # 0: low band, 1: high band
        return inv_freq / factor * (1.0 - blend) + inv_freq * blend
    return inv_freq


def compile_options(mode: str) -> dict[str, Any]:
    """TorchInductor's options for ``torch.compile`` ``mode`` (one without CUDA graphs of its
    own), rounding every intermediate to the model dtype where eager would: fused kernels
    otherwise keep float32 between ops, and 16-bit greedy tokens drift from the eager step's
    (85% equal on the H200, tiny-llama, 20 steps)."""
    import torch._inductor

    return {**torch._inductor.list_mode_options(mode), "emulate_precision_casts": True}


class Llama:
    """The forward pass: ``prefill`` of a prompt, ``decode`` of one token per sequence.

    ``positions``: how many positions the rotary tables cover (the engine's longest
    sequence; Llama 3.1 allows 131072, whose tables alone would take 64 MiB).
    ``compile_mode``: decode steps run the unit functions compiled in this ``torch.compile``
    mode (the module docstring, :func:`compile_options`); None: eager.
    ``attention``: a decode step attends through ``sdpa`` over the whole static cache, masked,
    or through ``triton`` over its filled positions only, or ``triton-rope``, which also
    rotates q and k and writes the cache (:mod:`autotune.streaming.attention`).
    ``gemv``: a decode step's output and down projections are ``cublas``'s GEMMs or, up to
    ``gemv.MAX_ROWS`` sequences, ``triton``'s kernel without split-K; ``triton-all`` also
    runs q-k-v and gate-up by Triton kernels with the RMSNorm (and SwiGLU) inside
    (:mod:`autotune.streaming.gemv`); ``cublas-halves`` runs gate-up's cuBLAS GEMM as two, one
    per half, at those batches (for GPUs where cuBLAS's tiles for the one GEMM leave SMs idle;
    on an H100 it did not pay: ``benchmarks/results/issue22``)."""

    def __init__(self, spec: ModelSpec, store: WeightStore, positions: int | None = None,
                 compile_mode: str | None = None, attention: str = "sdpa",
                 gemv: str = "cublas") -> None:
        self.spec, self.store = spec, store
        self.attention, self.gemv = attention, gemv
        device, dtype = store.device, store.tdtype
        d = spec.head_dim
        positions = spec.max_position_embeddings if positions is None else positions
        inv_freq = rope_frequencies(spec, device)
        t = torch.arange(positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [positions, d/2], float32 as in transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype).unsqueeze(1)  # [positions, 1, d]: broadcast over heads
        sin = emb.sin().to(dtype)
        half = d // 2
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).unsqueeze(1)
        self.arange = torch.arange(_pad16(positions), device=device)
        self.visible = torch.zeros((), dtype=dtype, device=device)
        self.hidden = torch.full((), float("-inf"), dtype=dtype, device=device)
        self.gqa = spec.num_attention_heads != spec.num_key_value_heads
        self.eps = spec.rms_norm_eps
        # The decode step's unit functions, compiled whole up to the output GEMM (fullgraph: a
        # graph break would split the fusions silently); a unit's weights, cache and tables
        # are arguments, so every layer shares one compiled function per shape. The output
        # GEMM and its residual add stay eager, in place (a library call either way).
        self._decode_attend, self._decode_swiglu = self._attend, self._swiglu
        if compile_mode is not None:
            options = compile_options(compile_mode)
            self._decode_attend = torch.compile(self._attend, fullgraph=True, options=options)
            self._decode_swiglu = torch.compile(self._swiglu, fullgraph=True, options=options)

    def prefill(self, tokens: torch.Tensor, cache: KVCache, all_positions: bool = False
                ) -> torch.Tensor:
        """Prompt ``[B, S]`` at positions 0..S-1 -> logits of its last position ``[B, V]``
        (``all_positions``: of every position, ``[B, S, V]``: a teacher-forced pass)."""
        return self._forward(tokens, cache, None, None, capturing=False,
                             all_positions=all_positions)

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache,
               capturing: bool = False) -> torch.Tensor:
        """One token per sequence ``[B, 1]`` at position ``pos`` ([1], int64, on the device)
        -> logits ``[B, V]``. Static shapes: capturable in a CUDA graph."""
        if self.attention != "sdpa":  # the Triton kernels read pos themselves: no mask
            return self._forward(tokens, cache, pos, None, capturing)
        # Additive [1, 1, 1, L]: 0 where key j <= pos, -inf beyond. Its rows are padded to 16
        # elements, the alignment the fused attention kernels want (else they pad per call).
        length = cache.length
        padded = _pad16(length)
        mask = torch.where(self.arange[:padded] <= pos, self.visible, self.hidden)
        mask = mask.view(1, 1, 1, padded)[..., :length]
        return self._forward(tokens, cache, pos, mask, capturing)

    def _forward(self, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor | None,
                 mask: torch.Tensor | None, capturing: bool,
                 all_positions: bool = False) -> torch.Tensor:
        store = self.store
        if pos is None:
            s = tokens.shape[1]
            cos, sin = self.cos[:s], self.signed_sin[:s]
        else:
            cos, sin = self.cos[pos], self.signed_sin[pos]  # [1, 1, d], gathered on the device
        store.begin_step(capturing)
        # Resident, or read from the host's pinned table (never streamed): the same kernel.
        x = F.embedding(tokens, store.acquire(store.embed.index)["embed"])  # [B, S, h]
        attend, swiglu = ((self._attend, self._swiglu) if pos is None
                          else (self._decode_attend, self._decode_swiglu))
        small = _small_decode(tokens.shape[0], pos)
        add = _add_linear_triton_ if small and self.gemv in gemv.TRITON_CHOICES else _add_linear_
        for unit in store.decoder:
            w = store.acquire(unit.index)
            if unit.kind == "attn":
                kc, vc = cache.k[unit.layer], cache.v[unit.layer]
                y = attend(x, w, kc, vc, cos, sin, pos, mask)  # the heads' output
                x = add(x, y, w, "o")
            else:
                y = swiglu(x, w, pos)
                x = add(x, y, w, "down")
            del y  # prefill: its [B, S, I] goes before the next unit's
            store.release(unit.index)
        x = x if all_positions else x[:, -1]
        x = rms_norm(x, store.fixed["model.norm.weight"], self.eps)  # [B, h] ([B, S, h])
        logits = x.new_empty(*x.shape[:-1], self.spec.vocab_size)  # [B, V] ([B, S, V])
        for unit in store.head:  # each vocabulary chunk writes its columns, in place
            w = store.acquire(unit.index)
            a, b = unit.params[0].rows
            head = quant.weight(w, "head", x.dtype)  # widened here where stored 8-bit
            if all_positions:
                logits[..., a:b] = torch.matmul(x, head.t())
            else:
                torch.mm(x, head.t(), out=logits[:, a:b])
            store.release(unit.index)
        store.end_step()
        return logits

    def _attend(self, x: torch.Tensor, w: dict[str, Any], kc: torch.Tensor,
                vc: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                pos: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """One layer's attention block up to its output projection: its keys and values
        written into ``kc``, ``vc``; the heads' output ``[B, S, H * d]``."""
        spec = self.spec
        b, s, _ = x.shape
        nh, nkv, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        if pos is not None and self.attention == "triton-rope" and "qkv" in w:
            # RoPE, the cache write and attention in one kernel, from the projection's output.
            return decode_rope_attention(self._qkv_fused(x, w, pos), kc, vc, pos, cos.view(-1),
                                         sin.view(-1), nh, 1.0 / math.sqrt(d)).view(b, s, -1)
        qk, v = self._qkv(x, w, pos)
        # q and k rotated together, in the projection's layout, then viewed head-major.
        qk = apply_rope(qk.view(b, s, nh + nkv, d), cos, sin).transpose(1, 2)
        q, k = qk[:, :nh], qk[:, nh:]  # [B, H, S, d], [B, KV, S, d]
        v = v.view(b, s, nkv, d).transpose(1, 2)
        extra = {"enable_gqa": True} if self.gqa else {}
        if pos is None:  # prefill from position 0: attend within the prompt
            kc[:, :, :s].copy_(k)
            vc[:, :, :s].copy_(v)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
        else:  # decode: the static cache, from position 0 to pos
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            if mask is None:  # the filled positions only, [B, 1, H, d]
                return decode_attention(q, kc, vc, pos, 1.0 / math.sqrt(d)).view(b, s, nh * d)
            o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, **extra)  # all of it
        return o.transpose(1, 2).reshape(b, s, nh * d)

    def _qkv(self, x: torch.Tensor, w: dict[str, Any], pos: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention block's RMSNorm and projections: q and k side by side
        ``[B, S, (H + KV) * d]``, and v ``[B, S, KV * d]``."""
        b, s, _ = x.shape
        split = [(self.spec.num_attention_heads + self.spec.num_key_value_heads)
                 * self.spec.head_dim, self.spec.num_key_value_heads * self.spec.head_dim]
        if "qkv" in w:
            return self._qkv_fused(x, w, pos).view(b, s, -1).split(split, dim=-1)
        h = rms_norm(x, w["norm"], self.eps)
        return (torch.cat([quant.linear(h, w, "q"), quant.linear(h, w, "k")], dim=-1),
                quant.linear(h, w, "v"))

    def _qkv_fused(self, x: torch.Tensor, w: dict[str, Any], pos: torch.Tensor | None
                   ) -> torch.Tensor:
        """The RMSNorm and the fused q-k-v GEMM: ``[B * S, (H + 2 KV) * d]``."""
        b, s, _ = x.shape
        if self.gemv == "triton-all" and _small_decode(b * s, pos):  # the norm inside the GEMM
            return gemv.norm_linear(x.view(b * s, -1), w["norm"], *quant.stored(w, "qkv"),
                                    self.eps, False)
        return quant.linear(rms_norm(x, w["norm"], self.eps), w, "qkv").view(b * s, -1)

    def _swiglu(self, x: torch.Tensor, w: dict[str, Any], pos: torch.Tensor | None
                ) -> torch.Tensor:
        """One layer's MLP block up to its down projection: ``silu(gate) * up``."""
        b, s, _ = x.shape
        if "gate_up" in w and self.gemv == "triton-all" and _small_decode(b * s, pos):
            return gemv.norm_linear(x.view(b * s, -1), w["norm"],  # norm and SwiGLU inside
                                    *quant.stored(w, "gate_up"), self.eps, True).view(b, s, -1)
        h = rms_norm(x, w["norm"], self.eps)
        if "gate_up" in w and self.gemv == "cublas-halves" and _small_decode(b * s, pos):
            rows = w["gate_up"].shape[0] // 2  # gate's rows, then up's: two GEMMs, no copy
            g = quant.linear(h, w, "gate_up", slice(0, rows))
            u = quant.linear(h, w, "gate_up", slice(rows, None))
        elif "gate_up" in w:
            g, u = quant.linear(h, w, "gate_up").chunk(2, dim=-1)  # [B, S, I] each
        else:
            g, u = quant.linear(h, w, "gate"), quant.linear(h, w, "up")
        del h
        return F.silu(g).mul_(u)  # in place: one [B, S, I] temporary fewer
