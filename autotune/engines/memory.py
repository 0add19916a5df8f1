"""Predicts the peak device memory of a configuration, before it runs.

A configuration's peak is the sum of: the weights kept resident (what is never streamed plus
the device budget), the streaming scratch (device slots that streamed weights are copied into),
the KV cache, the transient activations of prefill, and a workspace margin (cuBLAS workspace,
allocator rounding). Engines know their own layout and fill in a :class:`MemoryPlan`; the
formulas for the parts every Llama shares live here. The worker (:mod:`autotune.measure.worker`)
compares a plan with the headroom NVML reports before it runs anything, so that
configurations that cannot fit are recorded without being run.

This module does not measure anything; :mod:`autotune.measure.timing` does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from autotune.models import ModelSpec, dtype_bytes
from autotune.units import format_bytes

# Left free below the NVML headroom or the user's limit: fragmentation of the caching
# allocator and the CUDA context's own growth (bytes).
DEFAULT_MARGIN = 256 * 2**20


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak device memory of one configuration, by part (bytes)."""

    resident_weights: int
    streaming_scratch: int
    kv_cache: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return (
            self.resident_weights + self.streaming_scratch + self.kv_cache
            + self.activations + self.workspace
        )

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in asdict(self).items() if v)
        return f"{format_bytes(self.total)} ({parts})"


def kv_cache_bytes(spec: ModelSpec, dtype: str, batch: int, seq_len: int) -> int:
    """A static KV cache for ``batch`` sequences of ``seq_len`` tokens, all layers."""
    return spec.kv_bytes_per_token(dtype) * batch * seq_len


# The default --max-batch on a GPU: at least the long-standing 256, more where the KV cache of
# more sequences fits in the memory (grouped-query models on large GPUs), at most this.
MAX_AUTO_BATCH = 2048
MIN_AUTO_BATCH = 256
# The most sequences any configuration may hold: beyond, a typo (no GPU fits 10**7), refused
# wherever a batch is given (run's --max-batch, bench's --batch, a recommendation's best).
MAX_BATCH = 1 << 20


def auto_max_batch(spec: ModelSpec, dtype: str, seq_len: int, memory: int) -> int:
    """The largest batch worth searching in ``memory`` bytes: the KV cache alone of more
    sequences of ``seq_len`` would not fit, whatever else the configuration keeps resident.
    Clamped to [MIN_AUTO_BATCH, MAX_AUTO_BATCH]."""
    fits = memory // kv_cache_bytes(spec, dtype, 1, seq_len)
    return int(min(MAX_AUTO_BATCH, max(MIN_AUTO_BATCH, fits)))


# What the tensorrt engine holds before any sequence (CUDA context, TensorRT's staging of
# streamed weights: about two decoder layers, an assumption), and its context memory per
# sequence of the largest batch it is built for, as a multiple of that sequence's KV cache.
# Measured on the H200 (TensorRT-RTX 1.4, budget 0, batch 1; benchmarks/results/issue18):
# llama2-7b built for batch 42 held 9.32 GiB, llama3.2-1b built for 170 held 1.88 GiB, both
# about 1x the KV cache of the largest batch beyond the weights it keeps.
_TRT_FIXED = 512 * 2**20
TRT_CONTEXT_PER_KV = 1.0


def trt_max_batch(spec: ModelSpec, dtype: str, seq_len: int, memory: int,
                  attention_in_engine: bool = True) -> int:
    """The tensorrt engine's default largest batch: TensorRT sizes its context memory for the
    largest batch a build serves (about one more KV cache of that batch, measured, where the
    engine attends over the cache), so a build serves only batches whose cache and that
    context fit in ``memory`` beside the fixed part; at most MIN_AUTO_BATCH."""
    fixed = _TRT_FIXED + 2 * spec.layer_params() * dtype_bytes(dtype)
    context = TRT_CONTEXT_PER_KV if attention_in_engine else 0.0
    per_sequence = (1 + context) * kv_cache_bytes(spec, dtype, 1, seq_len)
    return int(max(1, min(MIN_AUTO_BATCH, (memory - fixed) // per_sequence)))


def prefill_activation_bytes(spec: ModelSpec, dtype: str, batch: int, isl: int) -> int:
    """Peak transient memory of one decoder layer during prefill of ``[batch, isl]``.

    The MLP dominates: gate and up projections ([B, S, I] each) and their product live at
    once, beside the residual stream and the attention scores ([B, heads, S, S], fp32 softmax
    in the worst case), plus the logits of the last position ([B, vocab], float32).
    """
    b = dtype_bytes(dtype)
    tokens = batch * isl
    mlp = 3 * tokens * spec.intermediate_size * b
    residual = 4 * tokens * spec.hidden_size * b
    scores = batch * spec.num_attention_heads * isl * isl * 4
    logits = batch * spec.vocab_size * 4
    return mlp + residual + scores + logits
