"""Exact accounting of the native runtime's device allocations, for its memory plan.

Every figure here follows one allocation the runtime makes (weights, slots, KV cache) or the
transient peak of its own forward pass (:mod:`autotune.streaming.llama`), rounded the way
PyTorch's caching allocator rounds large blocks (2 MiB), so that a plan is comparable with the
allocator's peak. The constants below the formulas are the calibration points: adjust them
from ``benchmarks/streaming.py``'s predicted-vs-measured columns (the plan predicts the
allocator's peak *reserved* bytes, which a ``gpu_memory_limit`` caps; NVML also counts the CUDA
context, outside any plan).

This module allocates nothing and measures nothing.
"""

from __future__ import annotations

from autotune.models import ModelSpec, dtype_bytes

_LARGE = 2**20  # the caching allocator's small/large boundary (bytes)
_ROUND_LARGE = 2 * 2**20  # large segments are rounded up to 2 MiB
_SMALL_SEGMENT = 2 * 2**20  # small blocks come from 2 MiB segments

# cuBLAS/cuBLASLt workspaces (one per stream that runs matmuls: compute and capture) and the
# small blocks (rotary tables, masks, token buffers) (bytes).
DEFAULT_WORKSPACE = 32 * 2**20
# Reserved over live bytes of the transient blocks: the caching allocator splits and caches
# the prefill's temporaries of many sizes. Fitted on the H100 (llama2-7b fp16, isl 128, batch
# 1/16/75: peak reserved minus weights, slots and KV cache = 1.55 x activations + 30 MiB,
# within 1.5%); see benchmarks/results/.
FRAGMENTATION = 1.55
# Allocator segments the decode graph's private pool keeps besides its tensors (bytes).
GRAPH_POOL_OVERHEAD = 8 * 2**20


def alloc_size(nbytes: int) -> int:
    """Bytes the caching allocator reserves for one block of ``nbytes``."""
    if nbytes <= 0:
        return 0
    if nbytes <= _LARGE:
        return (nbytes + 511) // 512 * 512
    return (nbytes + _ROUND_LARGE - 1) // _ROUND_LARGE * _ROUND_LARGE


def kv_cache_alloc(spec: ModelSpec, dtype: str, batch: int, length: int) -> int:
    """The static cache: 2 tensors ``[B, kv_heads, L, head_dim]`` per layer (bytes)."""
    one = batch * spec.num_key_value_heads * length * spec.head_dim * dtype_bytes(dtype)
    return 2 * spec.num_hidden_layers * alloc_size(one)


def _forward_peak(spec: ModelSpec, dtype: str, batch: int, tokens: int) -> int:
    """Transient peak of one forward pass over ``tokens`` positions per sequence (bytes).

    The larger of the two blocks. MLP: the residual [T, h], gate|up [T, 2I] and silu(gate)
    [T, I] (multiplied in place). Attention: the residual, the fused qkv [T, h + 2kv], and
    rotated q|k with two rotary temporaries [T, h + kv]. Then the logits [B, V] of the last
    position.
    """
    b = dtype_bytes(dtype)
    t = batch * tokens
    h, i = spec.hidden_size, spec.intermediate_size
    kv = spec.num_key_value_heads * spec.head_dim
    mlp = [t * h * b, t * 2 * i * b, t * i * b]
    attn = [t * h * b, t * (h + 2 * kv) * b] + [t * (h + kv) * b] * 3
    peak = max(sum(alloc_size(n) for n in part) for part in (mlp, attn))
    logits = 2 * alloc_size(batch * spec.vocab_size * b)
    return peak + logits


def prefill_bytes(spec: ModelSpec, dtype: str, batch: int, isl: int) -> int:
    return _forward_peak(spec, dtype, batch, isl)


def decode_pool_bytes(spec: ModelSpec, dtype: str, batch: int) -> int:
    """The decode step's transient peak; with CUDA graphs it stays held by the graph's pool."""
    return _forward_peak(spec, dtype, batch, 1) + GRAPH_POOL_OVERHEAD
