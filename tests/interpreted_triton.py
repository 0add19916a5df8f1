"""Checks of the Triton decode attention on CPU, under Triton's interpreter.

Run by ``tests/test_attention.py`` in a subprocess: ``TRITON_INTERPRET`` must be set before
triton is first imported, and it must not reach the other tests' processes.

    TRITON_INTERPRET=1 python tests/interpreted_triton.py kernel|engine|rope-kernel|rope-engine|gemv-kernel|norm-kernel|quantized-kernels|gemv-engine
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from autotune.streaming import gemv
from autotune.streaming.attention import BLOCK_N, decode_attention


def kernel() -> None:
    """Against SDPA over the same positions, masked: float32, groups of 1, 2 and 4 query heads,
    positions in the first block, at its edges and in a later one; q with a view's strides."""
    gen = torch.Generator().manual_seed(0)
    length, d = 2 * BLOCK_N + 5, 32
    for heads, kv_heads in ((4, 4), (4, 2), (8, 2)):
        for pos in (0, 7, BLOCK_N - 1, BLOCK_N, length - 1):
            qkv = torch.randn(3, heads + kv_heads, 1, d, generator=gen)
            q = qkv[:, :heads]  # the decode step's q: a slice of q and k rotated together
            k, v = (torch.randn(3, kv_heads, length, d, generator=gen) for _ in range(2))
            got = decode_attention(q, k, v, torch.tensor([pos]), d ** -0.5)
            visible = (torch.arange(length) <= pos).view(1, 1, 1, length)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                                  enable_gqa=heads != kv_heads)
            assert got.shape == (3, 1, heads, d) and got.is_contiguous()
            error = (got - want.transpose(1, 2)).abs().max().item()
            assert error < 1e-5, (heads, kv_heads, pos, error)
    print("kernel: equal to SDPA")


def _attention_tokens(option: str, fractions: tuple[float, ...], measured: bool) -> None:
    """tiny-llama float32: attention=``option`` generates the sdpa tokens at each budget
    fraction (and, ``measured``, its steps are timed in full)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_native_engine import _generate, _load

    from autotune.measure.timing import measure, random_prompt

    sdpa, triton = _load(), _load(attention=option)
    assert triton.describe()["attention"] == option and not triton.uniform_decode_steps
    assert triton.warmup_note(2) == "building the attention kernel (once per worker)"
    assert triton.warmup_note(3) is None and sdpa.warmup_note(2) is None
    prompt = random_prompt(2, 9, sdpa.spec.vocab_size, seed=3, device="cpu")
    for fraction in fractions:
        for e in (sdpa, triton):
            e.device_budget = int(fraction * e.total_device_budget)
        assert torch.equal(_generate(triton, prompt, 12), _generate(sdpa, prompt, 12)), fraction
    if measured:
        m = measure(triton, 2, 9, 12, repeats=1, warmup=0, decode_steps=2)
        assert not m.estimated and m.decode_steps_timed == 11


def engine() -> None:
    _attention_tokens("triton", (1.0, 0.4), measured=True)
    print("engine: the sdpa tokens")


def rope_engine() -> None:
    """triton-rope's tokens, streamed; and compiled with every Triton kernel (the custom ops
    inside the units' graphs, the cache written by one of them, as on the GPU), resident."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_native_engine import _generate, _load

    from autotune.measure.timing import random_prompt
    from autotune.streaming import attention

    # tiny-llama's 48-position cache is never split by the rule (MIN_SPLIT_POSITIONS): split
    # it here, so that the op's split path and its combine run inside the engine's graphs.
    attention.MIN_SPLIT_POSITIONS = 1
    _attention_tokens("triton-rope", (0.4,), measured=False)  # streamed: the resident path too
    sdpa, compiled = _load(), _load(attention="triton-rope", gemv="triton-all", compile="true")
    prompt = random_prompt(2, 9, sdpa.spec.vocab_size, seed=3, device="cpu")
    assert torch.equal(_generate(compiled, prompt, 8), _generate(sdpa, prompt, 8))
    print("rope engine: the sdpa tokens, compiled too")


def rope_kernel() -> None:
    """RoPE, the cache write and attention from the q-k-v projection, against apply_rope,
    index_copy_ and SDPA: float32, groups of 1 and 4 query heads, positions 0, inside the
    first block, at its edge and in a later one, each pair's positions in 1, 3 and 4 programs
    (some with nothing to read); the cache's other positions untouched."""
    from autotune.streaming.attention import decode_rope_attention, rope_attention
    from autotune.streaming.llama import apply_rope

    gen = torch.Generator().manual_seed(4)
    length, d, b = 2 * BLOCK_N + 5, 32, 3
    for heads, kv_heads, splits in ((4, 4, None), (8, 2, 1), (8, 2, 3), (4, 4, 4)):
        for pos in (0, 7, BLOCK_N, BLOCK_N + 1, length - 1):
            qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=gen)
            cache = [torch.randn(b, kv_heads, length, d, generator=gen) for _ in range(2)]
            cos, sin = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
            at = torch.tensor([pos])
            kc, vc = (c.clone() for c in cache)
            args = (qkv, kc, vc, at, cos, sin, heads, d ** -0.5)
            # None: the op's own choice (3 x 4 pairs, 8 "SMs" here: 1 split).
            got = (decode_rope_attention(*args) if splits is None
                   else rope_attention(*args, splits))
            qk, v = qkv.view(b, 1, -1).split([(heads + kv_heads) * d, kv_heads * d], dim=-1)
            qk = apply_rope(qk.reshape(b, 1, heads + kv_heads, d), cos.view(1, 1, d),
                            sin.view(1, 1, d)).transpose(1, 2)
            want_k, want_v = (c.clone() for c in cache)
            want_k.index_copy_(2, at, qk[:, heads:])
            want_v.index_copy_(2, at, v.view(b, 1, kv_heads, d).transpose(1, 2))
            assert torch.equal(vc, want_v), (heads, pos)  # keys: rotated in another order
            assert torch.allclose(kc, want_k, rtol=1e-6, atol=1e-6), (heads, pos, splits)
            assert torch.equal(kc[:, :, pos + 1:], cache[0][:, :, pos + 1:])
            visible = (torch.arange(length) <= pos).view(1, 1, 1, length)
            want = F.scaled_dot_product_attention(qk[:, :heads], want_k, want_v,
                                                  attn_mask=visible,
                                                  enable_gqa=heads != kv_heads)
            assert got.shape == (b, 1, heads, d) and got.is_contiguous()
            error = (got - want.transpose(1, 2)).abs().max().item()
            assert error < 1e-5, (heads, kv_heads, splits, pos, error)
    print("rope kernel: equal to apply_rope, index_copy_ and SDPA")


def gemv_kernel() -> None:
    """``x += y @ w.T`` against torch, float32: 1, 3 and 16 rows; N and K that are and are not
    multiples of the kernel's blocks; y with a view's strides, w transposed once."""
    gen = torch.Generator().manual_seed(1)
    block_n, block_k = gemv.RESIDUAL[:2]
    for m, n, k in ((1, 96, 2 * block_k + 8), (3, block_n, block_k), (16, 40, 77)):
        x = torch.randn(m, n, generator=gen)
        y = torch.randn(m, 2 * k, generator=gen)[:, :k]
        w = torch.randn(n, k, generator=gen) if m > 1 else torch.randn(k, n, generator=gen).t()
        want = x + y @ w.t()
        got = gemv.add_linear_(x, y, w)
        assert got is x
        error = (got - want).abs().max().item()
        assert error < 1e-4, (m, n, k, error)
    print("gemv kernel: equal to torch")


def quantized_kernels() -> None:
    """Both kernels over int8 rows and their scales, read as stored: equal to torch over the
    widened matrix (float32), with the SwiGLU's up rows scaled by their own scales."""
    from autotune.streaming import quant

    gen = torch.Generator().manual_seed(5)
    for m, n, k in ((1, 96, 2 * gemv.RESIDUAL[1] + 8), (5, 40, 77)):
        w = torch.randn(2 * n, k, generator=gen) * torch.linspace(0.1, 3, 2 * n)[:, None]
        q, scale = quant.quantize(w, "int8", torch.float32)
        wide = quant.widen(q, scale, torch.float32)
        x, y = torch.randn(m, n, generator=gen), torch.randn(m, k, generator=gen)
        want = x + y @ wide[:n].t()
        got = gemv.add_linear_(x, y, q[:n], scale[:n])
        assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item(), (m, n, k)
        g = torch.rand(k, generator=gen) + 0.5
        h = F.rms_norm(y, (k,), g, 1e-5)
        want = F.silu(h @ wide[:n].t()) * (h @ wide[n:].t())
        got = gemv.norm_linear(y, g, q, scale, 1e-5, True)
        assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item(), (m, n, k)
    print("quantized kernels: equal to torch over the widened rows")


def norm_kernel() -> None:
    """``rms_norm(x) @ w.T`` and its SwiGLU form against torch, float32: 1, 5 and 16 rows; N
    and K that are and are not multiples of the kernel's blocks; x with a view's strides."""
    gen = torch.Generator().manual_seed(2)
    block_n, block_k = gemv.NORM[:2]
    for m, n, k in ((1, 96, 2 * block_k + 8), (5, block_n, block_k), (16, 40, 77)):
        x = 3 * torch.randn(m, 2 * k, generator=gen)[:, :k]
        g = torch.rand(k, generator=gen) + 0.5
        w = torch.randn(2 * n, k, generator=gen)
        h = F.rms_norm(x, (k,), g, 1e-5)
        for swiglu, want in ((False, h @ w.t()),
                             (True, F.silu(h @ w[:n].t()) * (h @ w[n:].t()))):
            got = gemv.norm_linear(x, g, w, None, 1e-5, swiglu)
            error = (got - want).abs().max().item()
            assert error < 1e-4 * want.abs().max().item(), (m, n, k, swiglu, error)
    print("norm kernel: equal to torch")


def gemv_engine() -> None:
    """tiny-llama float32: gemv=triton and triton-all generate the cuBLAS tokens, resident and
    streamed, each running its kernels (17 sequences stay cuBLAS's); and with int8 weights,
    read as stored, the widened path's tokens."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_native_engine import _generate, _load

    from autotune.measure.timing import random_prompt

    calls = {"add_linear_": 0, "norm_linear": 0}  # which kernels each option really runs
    kernels = {name: getattr(gemv, name) for name in calls}
    for name, kernel in kernels.items():
        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)
        setattr(gemv, name, counted)
    int8 = _load(quantization=("int8",)), _load(quantization=("int8",), gemv="triton-all")
    prompt = random_prompt(2, 9, int8[0].spec.vocab_size, seed=3, device="cpu")
    for e in int8:
        e.device_budget = int(0.4 * e.total_device_budget)
    want = _generate(int8[0], prompt, 6)
    calls.update(dict.fromkeys(calls, 0))
    assert torch.equal(_generate(int8[1], prompt, 6), want), "int8"
    assert calls == dict.fromkeys(calls, 5 * int8[1].spec.num_hidden_layers * 2), calls
    cublas = _load()
    cases = {"triton": ((2, 0.4),), "triton-all": ((2, 1.0), (2, 0.4), (gemv.MAX_ROWS + 1, 1.0))}
    for option, runs in (("triton", {"add_linear_"}), ("triton-all", set(calls))):
        triton = _load(gemv=option)
        assert triton.describe()["gemv"] == option
        assert triton.warmup_note(2) == "building the GEMV kernel (once per worker)"
        for batch, fraction in cases[option]:
            prompt = random_prompt(batch, 9, cublas.spec.vocab_size, seed=3, device="cpu")
            for e in (cublas, triton):
                e.device_budget = int(fraction * e.total_device_budget)
            want = _generate(cublas, prompt, 6)
            calls.update(dict.fromkeys(calls, 0))
            assert torch.equal(_generate(triton, prompt, 6), want), (option, batch, fraction)
            small = batch <= gemv.MAX_ROWS  # 5 decode steps, 2 calls a layer each
            each = 5 * triton.spec.num_hidden_layers * 2 * small
            assert calls == {k: each * (k in runs) for k in calls}, (option, calls)
        triton.close()
    print("gemv engine: the cuBLAS tokens")  # compiled: rope_engine


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"
    {"kernel": kernel, "engine": engine, "rope-kernel": rope_kernel, "rope-engine": rope_engine, "gemv-kernel": gemv_kernel, "norm-kernel": norm_kernel,
     "quantized-kernels": quantized_kernels,
     "gemv-engine": gemv_engine}[sys.argv[1]]()
