"""Decode attention over the filled positions of a static KV cache: one Triton kernel.

The default decode step attends over the whole static cache ``[B, kv_heads, L, d]`` and masks
the positions beyond ``pos``: every step reads all ``L`` positions, wherever the generation is,
and at batch 32 that read was 27% of a llama2-7b step on the H200 (issue 22). This kernel reads
the position from its device tensor and loops over ``pos + 1`` positions only, so a CUDA graph
still replays one step for every position, and a step costs what its sequence holds.

One program per (sequence, KV head) serves the query heads of its group (grouped-query
attention: query head ``h`` reads KV head ``h // group``, as SDPA's ``enable_gqa``): scores and
the online softmax in float32, probabilities rounded to the cache dtype before their product
with the values, as flash attention does. Its sums run in another order than cuDNN's, so its
output differs from SDPA's in the last bits.

:func:`decode_rope_attention` (``attention=triton-rope``) does the step's rotary embedding and
cache write too, from the q-k-v projection's output: each program rotates its KV head's key and
its group's queries, attends over positions ``0..pos-1`` from the cache and over ``pos`` from
its registers (never reading back what it writes there). That takes the RoPE and cache-write
kernels (two or three a layer) out of the step. Where the (sequence, KV head) pairs are fewer
than the SMs, several programs share each pair's positions, the last one writing ``pos``, and a
second kernel combines their partial softmaxes (flash-decoding), so that a batch-1 step does
not read its cache with a quarter of the GPU.

Exposed as the custom ops ``autotune::decode_attention`` and ``autotune::decode_rope_attention``
so that ``torch.compile`` keeps each one opaque call. Needs ``triton`` and a CUDA tensor; on CPU only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is first imported), which the tests use.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from autotune.streaming import triton_check

BLOCK_N = 64  # positions a loop iteration reads (per KV head: 64 x head_dim x 2 bytes each)


def unavailable(device: torch.device, head_dim: int) -> str | None:
    """Why the kernel cannot run for this device and head size; None where it can."""
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two of at least 16"
    return triton_check.unavailable(device)


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, built at first use (importing triton costs a second)."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr,  # noqa: PLR0913
                                q_sb, q_sh, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh,
                                scale, kv_heads,
                                GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                                HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                                PRECISION: tl.constexpr):
        program = tl.program_id(0)
        b, kv = program // kv_heads, program % kv_heads
        length = tl.load(pos_ptr) + 1  # keys 0..pos
        g = tl.arange(0, GROUP_PAD)  # tl.dot wants 16 rows: the group's, then zeros
        d = tl.arange(0, HEAD_DIM)
        heads = kv * GROUP + g
        rows = g < GROUP
        q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :],
                    mask=rows[:, None], other=0.0)
        top = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores
        total = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp(score - top)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        k_base = k_ptr + b * k_sb + kv * k_sh
        v_base = v_ptr + b * v_sb + kv * v_sh
        for start in range(0, length, BLOCK):
            n = start + tl.arange(0, BLOCK)
            filled = n < length
            k = tl.load(k_base + n[:, None] * k_sl + d[None, :], mask=filled[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(filled[None, :], s, float("-inf"))
            new_top = tl.maximum(top, tl.max(s, 1))
            shrink = tl.exp(top - new_top)  # 0 at the first block (top = -inf)
            p = tl.exp(s - new_top[:, None])
            total = total * shrink + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * v_sl + d[None, :], mask=filled[:, None], other=0.0)
            acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            top = new_top
        out = acc / total[:, None]
        tl.store(o_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=rows[:, None])

    return decode_attention_kernel


@torch.library.custom_op("autotune::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Attention of one query per sequence over cache positions ``0..pos``.

    ``q`` [B, H, 1, d] (any strides with a unit last one), ``k``, ``v`` [B, KV, L, d] (the
    static cache, position ``pos`` already written), ``pos`` [1] int64 on the same device ->
    ``[B, 1, H, d]``, contiguous: viewed as ``[B, 1, H * d]`` it is the output projection's
    input, with no copy."""
    b, heads, _, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = q.new_empty(b, 1, heads, d)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # 16-bit: tensor cores as is
    _kernel()[(b * kv_heads,)](
        q, k, v, out, pos, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(2), scale, kv_heads,
        GROUP=group, GROUP_PAD=max(16, 1 << (group - 1).bit_length()), HEAD_DIM=d,
        BLOCK=BLOCK_N, PRECISION=precision)
    return out


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
      scale: float) -> torch.Tensor:
    b, heads, _, d = q.shape
    return q.new_empty(b, 1, heads, d)


MAX_SPLITS = 16  # of a sequence's positions, where the (sequence, KV head) pairs are few


def splits_for(programs: int, device: torch.device) -> int:
    """How many programs share a (sequence, KV head)'s positions: enough for about one per
    SM (batch 1 of llama2-7b has 32 pairs for 132 SMs on the H200, llama3-8b 8), one where the
    pairs fill the GPU. The interpreter (CPU) counts 8 SMs, so that its tests split too."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 8)
    return max(1, min(MAX_SPLITS, -(-sms // programs))) if programs < sms else 1


@functools.cache
def _rope_kernels() -> tuple[Any, Any]:
    import triton
    import triton.language as tl

    # The number of splits is an argument, not a constant, so that the batches of a study
    # (1 to 5 splits for llama2-7b) share two builds of the kernel, split or not, instead of
    # one each: Triton's build is about a second, paid in a worker's warm-ups (item 3).
    @triton.jit(do_not_specialize=["splits"])
    def decode_rope_attention_kernel(qkv_ptr, k_ptr, v_ptr, o_ptr, part_ptr, pos_ptr,  # noqa: PLR0913
                                     cos_ptr, sin_ptr,
                                     qkv_sb, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh,
                                     scale, heads, kv_heads, splits,
                                     GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                                     SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        dtype = o_ptr.dtype.element_ty
        program, split = tl.program_id(0), tl.program_id(1)
        b, kv = program // kv_heads, program % kv_heads
        pos = tl.load(pos_ptr)
        d = tl.arange(0, HEAD_DIM)
        swapped = (d + HEAD_DIM // 2) % HEAD_DIM  # rotate-half's partner of each element
        cos = tl.load(cos_ptr + d).to(tl.float32)
        sin = tl.load(sin_ptr + d).to(tl.float32)  # signed: cat(-sin1, sin2)
        row = qkv_ptr + b * qkv_sb
        g = tl.arange(0, GROUP_PAD)
        rows = g < GROUP
        q_at = row + (kv * GROUP + g)[:, None] * HEAD_DIM
        qx = tl.load(q_at + d[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
        qs = tl.load(q_at + swapped[None, :], mask=rows[:, None], other=0.0).to(tl.float32)
        # Rotated as apply_rope rounds it: x * cos, then the sum.
        q = ((qx * cos[None, :]).to(dtype).to(tl.float32) + qs * sin[None, :]).to(dtype)
        # The running maximum before any score: finite, so that exp(top - new_top) is 0 at the
        # first score and 1 (times nothing) in a split that had none, never NaN.
        top = tl.full([GROUP_PAD], -1e30, tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        k_base = k_ptr + b * k_sb + kv * k_sh
        v_base = v_ptr + b * v_sb + kv * v_sh
        # This split's share of positions 0..pos-1, read from the cache, in whole blocks.
        share = tl.cdiv(tl.cdiv(pos, splits), BLOCK) * BLOCK
        first, end = split * share, tl.minimum(split * share + share, pos)
        for start in range(first, end, BLOCK):
            n = start + tl.arange(0, BLOCK)
            filled = n < end
            k = tl.load(k_base + n[:, None] * k_sl + d[None, :], mask=filled[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(filled[None, :], s, float("-inf"))
            new_top = tl.maximum(top, tl.max(s, 1))
            shrink = tl.exp(top - new_top)
            p = tl.exp(s - new_top[:, None])
            total = total * shrink + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * v_sl + d[None, :], mask=filled[:, None], other=0.0)
            acc = acc * shrink[:, None] + tl.dot(p.to(dtype), v, input_precision=PRECISION)
            top = new_top
        if split == splits - 1:  # the last split: position pos, written, attended from registers
            k_at = row + (heads + kv) * HEAD_DIM
            k_new = ((tl.load(k_at + d).to(tl.float32) * cos).to(dtype).to(tl.float32)
                     + tl.load(k_at + swapped).to(tl.float32) * sin).to(dtype)
            v_new = tl.load(row + (heads + kv_heads + kv) * HEAD_DIM + d)
            tl.store(k_base + pos * k_sl + d, k_new)
            tl.store(v_base + pos * v_sl + d, v_new)
            s_now = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
            top_now = tl.maximum(top, s_now)
            shrink_now = tl.exp(top - top_now)
            p_now = tl.exp(s_now - top_now)
            total = total * shrink_now + p_now
            acc = acc * shrink_now[:, None] + (p_now.to(dtype).to(tl.float32)[:, None]
                                               * v_new.to(tl.float32)[None, :])
            top = top_now
        if not SPLIT:
            out = acc / total[:, None]
            tl.store(o_ptr + b * o_sb + (kv * GROUP + g)[:, None] * o_sh + d[None, :],
                     out.to(dtype), mask=rows[:, None])
        else:  # partials [pair, split, row, (top, total, acc...)], float32, for the combine
            at = part_ptr + ((program * splits + split) * GROUP_PAD + g) * (HEAD_DIM + 2)
            tl.store(at, top)
            tl.store(at + 1, total)
            tl.store(at[:, None] + 2 + d[None, :], acc)

    @triton.jit(do_not_specialize=["splits"])
    def combine_kernel(o_ptr, part_ptr, o_sb, o_sh, kv_heads, splits, GROUP: tl.constexpr,
                       GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
        program = tl.program_id(0)
        b, kv = program // kv_heads, program % kv_heads
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        top = tl.full([GROUP_PAD], -1e30, tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for split in range(splits):  # an empty split: top -1e30, total 0, acc 0
            at = part_ptr + ((program * splits + split) * GROUP_PAD + g) * (HEAD_DIM + 2)
            its_top = tl.load(at)
            new_top = tl.maximum(top, its_top)
            mine = tl.exp(top - new_top)
            its = tl.exp(its_top - new_top)
            total = total * mine + tl.load(at + 1) * its
            acc = acc * mine[:, None] + tl.load(at[:, None] + 2 + d[None, :]) * its[:, None]
            top = new_top
        out = acc / total[:, None]
        tl.store(o_ptr + b * o_sb + (kv * GROUP + g)[:, None] * o_sh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])

    return decode_rope_attention_kernel, combine_kernel


def rope_attention(qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                   cos: torch.Tensor, signed_sin: torch.Tensor, heads: int, scale: float,
                   splits: int) -> torch.Tensor:
    """:func:`decode_rope_attention` with each (sequence, KV head)'s positions shared by
    ``splits`` programs (then a kernel combines their partial softmaxes)."""
    b = qkv.shape[0]
    kv_heads, d = k.shape[1], k.shape[3]
    group = heads // kv_heads
    group_pad = max(16, 1 << (group - 1).bit_length())  # tl.dot wants 16 rows
    out = qkv.new_empty(b, 1, heads, d)
    parts = qkv.new_empty((b * kv_heads * splits * group_pad * (d + 2)) if splits > 1 else 1,
                          dtype=torch.float32)
    attend, combine = _rope_kernels()
    attend[(b * kv_heads, splits)](
        qkv, k, v, out, parts, pos, cos, signed_sin, qkv.stride(0), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(2),
        scale, heads, kv_heads, splits, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d,
        BLOCK=BLOCK_N, SPLIT=splits > 1,
        PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32")
    if splits > 1:
        combine[(b * kv_heads,)](out, parts, out.stride(0), out.stride(2), kv_heads, splits,
                                 GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d)
    return out


@torch.library.custom_op("autotune::decode_rope_attention", mutates_args=("k", "v"))
def decode_rope_attention(qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          pos: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                          heads: int, scale: float) -> torch.Tensor:
    """A decode step's attention from its q-k-v projection: RoPE, the cache write, attention.

    ``qkv`` [B, (H + 2 KV) * d] (q's heads, k's, v's; unit last stride), ``k``, ``v`` the
    static cache [B, KV, L, d], written at ``pos`` ([1] int64 on the device); ``cos``,
    ``signed_sin`` [d], the rotary tables' row at ``pos`` (``signed_sin`` = cat(-sin1, sin2),
    as :func:`autotune.streaming.llama.apply_rope` takes it) -> ``[B, 1, H, d]``, contiguous.
    Where the (sequence, KV head) pairs are fewer than the SMs, several programs share each
    pair's positions (:func:`splits_for`)."""
    splits = splits_for(qkv.shape[0] * k.shape[1], qkv.device)
    return rope_attention(qkv, k, v, pos, cos, signed_sin, heads, scale, splits)


@decode_rope_attention.register_fake
def _(qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
      cos: torch.Tensor, signed_sin: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[0], 1, heads, k.shape[3])
