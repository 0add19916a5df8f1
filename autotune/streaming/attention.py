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
than the SMs and the cache is long enough to pay for it, several programs share each pair's
positions, the last one writing ``pos``, and a second kernel combines their partial softmaxes
(flash-decoding), so that a batch-1 step does not read a long cache with a quarter of the GPU.

Exposed as the custom ops ``autotune::decode_attention`` and ``autotune::decode_rope_attention``
so that ``torch.compile`` keeps each one opaque call. Needs ``triton`` and a CUDA tensor; on CPU only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is first imported), which the tests use.
"""

from __future__ import annotations

from typing import Any

import torch

from autotune.streaming import triton_check

BLOCK_N = 64  # positions a loop iteration reads (per KV head: 64 x head_dim x 2 bytes each)


def unavailable(device: torch.device, head_dim: int) -> str | None:
    """Why the kernel cannot run for this device and head size; None where it can."""
    if head_dim & (head_dim - 1) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two of at least 16"
    return triton_check.unavailable(device)


def _kernel() -> Any:
    """The Triton kernel, imported at first use."""
    from autotune.streaming import attention_kernels

    return attention_kernels.decode_attention_kernel


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
# The fewest cache positions each part of a split must get (so nothing is split below 1024).
# The combine kernel costs a launch: on the H100, llama2-7b at batch 1 over a 384-position
# cache, 5 splits made the rope kernel 4.9 us a layer and their combine 3.3 us, where one
# program a pair (decode_attention_kernel, no combine) took 5.5 us (benchmarks/results/
# issue22, 2026-12-05-h100). With a loop iteration (BLOCK_N positions) at about 0.6 us there,
# 5 splits save about 0.48 us a 64 positions and win back those 2.7 us from about 750
# positions on. An estimate to measure, not a tuned figure.
MIN_SPLIT_POSITIONS = 512


def splits_for(programs: int, positions: int, device: torch.device) -> int:
    """How many programs share a (sequence, KV head)'s ``positions`` (the cache's length, the
    most a step reads): enough for about one per SM (batch 1 of llama2-7b has 32 pairs for 132
    SMs on the H200, llama3-8b 8), one where the pairs fill the GPU, and none where each part
    would hold fewer than ``MIN_SPLIT_POSITIONS``. The interpreter (CPU) counts 8 SMs."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 8)
    by_sms = max(1, min(MAX_SPLITS, -(-sms // programs))) if programs < sms else 1
    return max(1, min(by_sms, positions // MIN_SPLIT_POSITIONS))


def _rope_kernels() -> tuple[Any, Any]:
    """The rope kernel and its combine kernel, imported at first use."""
    from autotune.streaming import attention_kernels

    return attention_kernels.decode_rope_attention_kernel, attention_kernels.combine_kernel



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
    Where the (sequence, KV head) pairs are fewer than the SMs and the cache is long, several
    programs share each pair's positions (:func:`splits_for`)."""
    splits = splits_for(qkv.shape[0] * k.shape[1], k.shape[2], qkv.device)
    return rope_attention(qkv, k, v, pos, cos, signed_sin, heads, scale, splits)


@decode_rope_attention.register_fake
def _(qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
      cos: torch.Tensor, signed_sin: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    return qkv.new_empty(qkv.shape[0], 1, heads, k.shape[3])
