"""The Llama forward that the Torch-TensorRT engine exports: plain tensors in, plain tensors out.

Hugging Face's model does not export well for TensorRT: its mask machinery puts guards on the
dynamic sequence length (``Constraints violated (seq_len)`` on the GPU machine's torch 2.11),
and its cache is a Python object, not tensors. This module computes what transformers'
LlamaForCausalLM computes (float32 RMSNorm and softmax, rotary tables in float32 cast to the
model dtype, rotate-half RoPE, grouped-query attention, SwiGLU) with only the operations
TensorRT converts, and with the KV cache as an explicit input and output:

    forward(tokens [B, T], positions [T], k_0, v_0, ..., k_L-1, v_L-1)
        -> logits of the last position [B, V], new keys [L, B, KV, d, T], new values
           [L, B, KV, T, d]  (with attention="torch": each layer's apart, L keys then L values)

The cache is static (S = the longest sequence the engine serves) and goes in as 2L separate
tensors, each layer's keys (stored transposed, ``[B, KV, d, S]``: the ``q @ k^T`` operand as it
is) and values (``[B, KV, S, d]``). One cache tensor sliced per layer inside the engine made
TensorRT materialize the slices (and the transposed keys) of every layer in its activation
memory, sized for the largest batch: about 1.8x the cache itself, 4.2 GiB of llama3.2-1b's
budget-0 footprint on the H200 at batch 1. Slots at or beyond ``positions[0]`` are masked, so a
decode step (T = 1) does the same work at every position, as the native engine's does. The
caller writes the new keys and values into the cache at ``positions`` (two copies; one a layer
per tensor with ``attention="torch"``) before the next call; TensorRT cannot update an input
in place. Prefill is the same call with T = a chunk of the prompt (the slots before it filled
by earlier chunks). Without a cache
(``cache_len=None``, the seed's and Torch-TensorRT's example mode) the signature is
``forward(tokens, positions) -> logits [B, V]`` and every step recomputes the whole sequence.

With ``attention="torch"`` a layer's heads, RoPE and attention over the cache are three custom
ops (``autotune::key_heads``, ``value_heads``, ``cache_attention``) that no Torch-TensorRT
converter claims: they run in PyTorch, the graph becomes one engine per stretch between
attentions, and no engine takes the cache (or a size) as an input. Inside TensorRT, attention
over a cache input costs about one more cache of the build's largest batch in the engines'
context memory (measured on the H200 with
``benchmarks/trt_memory.py``: +0.115 GB per llama2-7b layer at max batch 17, whose cache is
0.107 GB a layer; keys stored untransposed, +0.169), which is what caps the tensorrt engine's
batch at about half the native engine's.

This module builds and runs no engine; :mod:`autotune.engines.tensorrt` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autotune.models import ModelSpec, WeightSource, torch_dtype
from autotune.streaming.llama import rope_frequencies


class _Layer(nn.Module):
    """One decoder layer's weights, Hugging Face's shapes ([out, in])."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in weights.items():
            self.register_buffer(name, tensor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attend(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, causal: torch.Tensor,
            past: tuple[torch.Tensor, torch.Tensor] | None,
            filled: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of q ``[B, KV, G*T, d]`` (group-major rows) over the cache's filled
    slots (``past``: keys ``[B, KV, d, S]``, values ``[B, KV, S, d]``) and the new keys ``kt``
    ``[B, KV, d, T]`` and values ``v`` ``[B, KV, T, d]``; float32 softmax."""
    g = q.shape[2] // causal.shape[0]
    scale = q.shape[-1] ** -0.5
    minus_inf = torch.finfo(q.dtype).min
    scores = (q @ kt) * scale  # [B, KV, G * T, T]
    scores = scores.masked_fill(~causal.repeat(g, 1), minus_inf)
    if past is not None:
        past_kt, past_v = past
        old = (q @ past_kt) * scale  # [B, KV, G * T, S]
        scores = torch.cat((old.masked_fill(~filled, minus_inf), scores), dim=-1)
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    if past is None:
        return probs @ v
    s = past[1].shape[2]
    return probs[..., :s] @ past[1] + probs[..., s:] @ v  # [B, KV, G * T, d]


def _masks(positions: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, T]: a new token sees the new tokens at or before it; [T, S]: and the cache's slots
    before the first new position (the filled ones)."""
    return (positions[None, :] <= positions[:, None]), (slots[None, :] < positions[:1, None])


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """A projection ``[B, T, n * d]`` as ``n`` heads, ``[B, T, n, d]``."""
    return x.view(x.shape[0], x.shape[1], n, x.shape[-1] // n)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Queries ``[B, T, H, d]`` as ``[B, KV, G, T, d]``: a group's queries are rows of one
    matrix per KV head (grouped-query attention without repeating keys)."""
    b, t, h, d = q.shape
    return q.view(b, t, kv_heads, h // kv_heads, d).permute(0, 2, 3, 1, 4)


def _attend_heads(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, causal: torch.Tensor,
                  past: tuple[torch.Tensor, torch.Tensor] | None,
                  filled: torch.Tensor | None) -> torch.Tensor:
    """:func:`_attend` of queries ``[B, KV, G, T, d]``; the heads' outputs ``[B, T, H * d]``."""
    b, nkv, g, t, d = q.shape
    o = _attend(q.reshape(b, nkv, g * t, d), kt, v, causal, past, filled)
    return o.view(b, nkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, nkv * g * d)


# attention=torch: three ops that no Torch-TensorRT converter claims, so they run in PyTorch
# between the engines, which then only multiply, normalize and add [B, T, n] tensors. The
# heads' views and RoPE happen in the ops, for two reasons measured on the GPU
# (benchmarks/results/issue18, 2026-12-06):
# - a dimension derived from another (G * T) that crosses into an engine gets a profile from
#   its symbolic range, whose least T is 2, and a decode step (T = 1) did not fit it ("Set
#   dimension [8,2,2,32] for tensor cache_attention does not satisfy any optimization
#   profiles", tiny-llama, G = 2);
# - viewing heads inside an engine makes the batch and the call length its shape inputs,
#   which 2.11's Python runtime reads back to the host (a synchronization per engine) into
#   copies it frees before TensorRT reads them.
# Each op has one output: a tuple's items would cross into the next engine as one input.

@torch.library.custom_op("autotune::key_heads", mutates_args=())
def key_heads(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              kv_heads: int) -> torch.Tensor:
    """The new keys ``[B, T, KV * d]`` as the cache stores them: rotated, ``[B, KV, d, T]``."""
    return _rope(_heads(k, kv_heads), cos, sin).permute(0, 2, 3, 1).contiguous()


@key_heads.register_fake
def _(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, t, n = k.shape
    return k.new_empty((b, kv_heads, n // kv_heads, t))


@torch.library.custom_op("autotune::value_heads", mutates_args=())
def value_heads(v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The new values ``[B, T, KV * d]`` as the cache stores them, ``[B, KV, T, d]``."""
    # A copy: at T = 1 the permuted view is already contiguous, and an op may not return
    # its input's memory.
    return _heads(v, kv_heads).permute(0, 2, 1, 3).clone(memory_format=torch.contiguous_format)


@value_heads.register_fake
def _(v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, t, n = v.shape
    return v.new_empty((b, kv_heads, t, n // kv_heads))


@torch.library.custom_op("autotune::cache_attention", mutates_args=())
def cache_attention(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, past_kt: torch.Tensor, past_v: torch.Tensor,
                    positions: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of the queries ``[B, T, H * d]`` (rotated here) over the cache and the new
    keys and values (:func:`key_heads`, :func:`value_heads`): ``[B, T, H * d]``."""
    q = _group_queries(_rope(_heads(q, heads), cos, sin), kt.shape[1])
    causal, filled = _masks(positions, torch.arange(past_v.shape[2], device=q.device))
    return _attend_heads(q, kt, v, causal, (past_kt, past_v), filled)


@cache_attention.register_fake
def _(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
      past_kt: torch.Tensor, past_v: torch.Tensor, positions: torch.Tensor,
      heads: int) -> torch.Tensor:
    return q.new_empty(q.shape)


class ExportLlama(nn.Module):
    """The model as one exportable function (see the module docstring)."""

    def __init__(self, spec: ModelSpec, dtype: str, device: str, source: WeightSource,
                 cache_len: int | None, positions: int, attention: str = "tensorrt") -> None:
        super().__init__()
        self.spec, self.cache_len, self.attention = spec, cache_len, attention
        tdtype = torch_dtype(dtype)

        def get(name: str) -> torch.Tensor:
            return source.get(name, spec.all_shapes()[name], tdtype, device)

        # Buffers, not parameters: an engine's weights are constants (and export keeps
        # buffers as inputs of the graph it lifts, which Torch-TensorRT folds in).
        self.register_buffer("embed", get("model.embed_tokens.weight"))
        self.register_buffer("norm", get("model.norm.weight"))
        self.register_buffer("lm_head", get("lm_head.weight"))
        short = {"input_layernorm": "attn_norm", "self_attn.q_proj": "q",
                 "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
                 "post_attention_layernorm": "mlp_norm", "mlp.gate_proj": "gate",
                 "mlp.up_proj": "up", "mlp.down_proj": "down"}
        self.layers = nn.ModuleList(
            _Layer({s: get(f"model.layers.{i}.{n}.weight") for n, s in short.items()})
            for i in range(spec.num_hidden_layers))
        # Rotary tables for every position served, float32 then cast, as transformers does.
        t = torch.arange(positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, rope_frequencies(spec, device))
        emb = torch.cat((freqs, freqs), dim=-1)  # [positions, d]
        self.register_buffer("cos", emb.cos().to(tdtype))
        self.register_buffer("sin", emb.sin().to(tdtype))
        if cache_len is not None:
            self.register_buffer("slots", torch.arange(cache_len, device=device))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                *cache: torch.Tensor) -> Any:
        x = self.embed[tokens]  # [B, T, h]
        cos = self.cos[positions][:, None, :]  # [T, 1, d]: broadcast over heads
        sin = self.sin[positions][:, None, :]
        if cache:
            causal, filled = _masks(positions, self.slots)
        else:
            causal, filled = positions[None, :] <= positions[:, None], None
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.attn_norm)
            past = (cache[2 * i], cache[2 * i + 1]) if cache else None
            o, k, v = self._attention(h, layer, cos, sin, causal, filled, past, positions)
            x = x + o
            new_k.append(k)
            new_v.append(v)
            h = self._rms_norm(x, layer.mlp_norm)
            gate = torch.nn.functional.silu(h @ layer.gate.t())
            x = x + (gate * (h @ layer.up.t())) @ layer.down.t()
        last = self._rms_norm(x[:, -1], self.norm)  # [B, h]
        logits = last @ self.lm_head.t()  # [B, V]
        if not cache:
            return logits
        if self.attention == "torch":
            # Each layer's own, as its ops made them: stacked, the last engine would take every
            # layer's as inputs and hold a second copy of all of them beside (a prefill call's
            # new keys and values twice, 1.06 GB for llama2-7b at batch 35, 29 tokens).
            return (logits, *new_k, *new_v)
        return logits, torch.stack(new_k), torch.stack(new_v)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.spec.rms_norm_eps)
        return weight * h.to(x.dtype)

    def _attention(self, h: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor,
                   causal: torch.Tensor, filled: torch.Tensor | None,
                   past: tuple[torch.Tensor, torch.Tensor] | None, positions: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of the new tokens; returns the output, the new keys transposed
        ``[B, KV, d, T]`` and the new values ``[B, KV, T, d]``."""
        nh, nkv = self.spec.num_attention_heads, self.spec.num_key_value_heads
        q, k, v = h @ layer.q.t(), h @ layer.k.t(), h @ layer.v.t()
        if past is not None and self.attention == "torch":
            kt = torch.ops.autotune.key_heads(k, cos, sin, nkv)
            v = torch.ops.autotune.value_heads(v, nkv)
            o = torch.ops.autotune.cache_attention(q, kt, v, cos, sin, past[0], past[1],
                                                   positions, nh)
        else:
            q = _group_queries(_rope(_heads(q, nh), cos, sin), nkv)
            kt = _rope(_heads(k, nkv), cos, sin).permute(0, 2, 3, 1)  # [B, KV, d, T]
            v = _heads(v, nkv).permute(0, 2, 1, 3)  # [B, KV, T, d]
            o = _attend_heads(q, kt, v, causal, past, filled)
        return o @ layer.o.t(), kt, v
