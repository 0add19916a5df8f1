"""Issue 22: decode attention over the filled positions only (``--engine-option
attention=triton``, :mod:`autotune.streaming.attention`).

On CPU the kernel runs under Triton's interpreter, in a subprocess (the interpreter is chosen
when triton is first imported); GPU tests (marked) compile it for the device and run it inside
the decode graph, against SDPA and against today's tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_native_engine import _load, assert_graphs_tokens

from autotune.errors import UserInputError
from autotune.streaming import attention

HERE = Path(__file__).resolve().parent


def _interpreted(check: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(HERE.parent)}
    done = subprocess.run([sys.executable, str(HERE / "interpreted_triton.py"), check],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def test_the_kernel_equals_sdpa_over_the_filled_positions() -> None:
    _interpreted("kernel")


def test_the_engine_with_triton_attention_generates_the_sdpa_tokens() -> None:
    _interpreted("engine")


def test_the_rope_kernel_rotates_writes_the_cache_and_attends() -> None:
    _interpreted("rope-kernel")


def test_the_engine_with_triton_rope_generates_the_sdpa_tokens_compiled_too() -> None:
    _interpreted("rope-engine")


def test_only_a_long_cache_is_split_and_only_where_the_pairs_leave_sms_idle() -> None:
    cpu = torch.device("cpu")  # counted as 8 SMs
    assert attention.splits_for(2, 384, cpu) == 1  # a combine would cost more than it saves
    assert attention.splits_for(2, attention.MIN_SPLIT_POSITIONS * 2, cpu) == 2
    assert attention.splits_for(2, 8192, cpu) == 4  # one program an SM: 8 / 2
    assert attention.splits_for(8, 8192, cpu) == 1  # the pairs fill the SMs


def test_the_attention_option_is_checked_before_the_weights_load() -> None:
    with pytest.raises(UserInputError,
                       match="attention: expected auto, sdpa, triton or triton-rope; got 'flash'"):
        _load(attention="flash")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(UserInputError, match="attention=triton: .*use attention=sdpa"):
            _load(attention="triton")  # CPU: the interpreter only
    assert attention.unavailable(torch.device("cuda"), 96) == (
        "head_dim 96 is not a power of two of at least 16")
    assert _load().describe()["attention"] == "sdpa"
    assert _load(attention="sdpa").describe()["attention"] == "sdpa"  # runs anywhere


# -- GPU ---------------------------------------------------------------------------------------

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)], ids=["mha", "gqa"])
def test_gpu_kernel_equals_sdpa(dtype, heads, kv_heads) -> None:
    """Llama shapes (head_dim 128), 384 cache positions, in a CUDA graph: one capture replayed
    at several positions gives SDPA's output over each one's filled positions."""
    pytest.importorskip("triton")
    gen = torch.Generator("cuda").manual_seed(0)
    length, d = 384, 128
    qkv = torch.randn(4, heads + kv_heads, 1, d, generator=gen, device="cuda", dtype=dtype)
    q = qkv[:, :heads]
    k, v = (torch.randn(4, kv_heads, length, d, generator=gen, device="cuda", dtype=dtype)
            for _ in range(2))
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    attention.decode_attention(q, k, v, pos, d ** -0.5)  # builds the kernel before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.decode_attention(q, k, v, pos, d ** -0.5)
    for p in (0, 63, 64, 200, length - 1):
        pos.fill_(p)
        graph.replay()
        visible = (torch.arange(length, device="cuda") <= p).view(1, 1, 1, length)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                              enable_gqa=heads != kv_heads).transpose(1, 2)
        error = (out.float() - want.float()).abs().max().item()
        assert error <= TOLERANCE[dtype] * want.float().abs().max().item(), (p, error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_triton_attention_generates_the_graphs_tokens(dtype, compiled) -> None:
    """tiny-llama in the decode graph, resident and streamed, alone and with ``compile``:
    today's graphs' tokens (a failure gives the share of equal ones)."""
    pytest.importorskip("triton")
    assert_graphs_tokens(dtype, (1.0, 0.3), attention="triton",
                         **({"compile": "true"} if compiled else {}))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)], ids=["mha", "gqa"])
def test_gpu_rope_kernel_equals_rope_cache_write_and_sdpa(dtype, heads, kv_heads) -> None:
    """Llama shapes, in a CUDA graph replayed at several positions: the cache rows written
    are apply_rope's keys and the projection's values, and the output SDPA's over them."""
    pytest.importorskip("triton")
    from autotune.streaming.llama import apply_rope

    gen = torch.Generator("cuda").manual_seed(1)
    b, length, d = 2, 1024, 128  # long enough to be split (attention.MIN_SPLIT_POSITIONS)
    qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=gen, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, kv_heads, length, d, generator=gen, device="cuda", dtype=dtype)
            for _ in range(2))
    angle = torch.rand(d // 2, generator=gen, device="cuda") * 6.28
    cos = torch.cat([angle.cos(), angle.cos()]).to(dtype)
    sin = torch.cat([-angle.sin(), angle.sin()]).to(dtype)  # signed, as the engine keeps it
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    args = (qkv, k, v, pos, cos, sin, heads, d ** -0.5)
    attention.decode_rope_attention(*args)  # builds the kernel before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.decode_rope_attention(*args)
    qk, new_v = qkv.view(b, 1, -1).split([(heads + kv_heads) * d, kv_heads * d], dim=-1)
    qk = apply_rope(qk.reshape(b, 1, heads + kv_heads, d), cos.view(1, 1, d),
                    sin.view(1, 1, d)).transpose(1, 2)
    assert attention.splits_for(b * kv_heads, length, k.device) > 1
    for p in (0, 63, 64, 200, 600, length - 1):
        pos.fill_(p)
        graph.replay()
        assert torch.equal(v[:, :, p], new_v.view(b, kv_heads, d))
        key_error = (k[:, :, p].float() - qk[:, heads:, 0].float()).abs().max().item()
        assert key_error <= TOLERANCE[dtype] * qk.float().abs().max().item(), (p, key_error)
        visible = (torch.arange(length, device="cuda") <= p).view(1, 1, 1, length)
        want = F.scaled_dot_product_attention(qk[:, :heads], k, v, attn_mask=visible,
                                              enable_gqa=heads != kv_heads).transpose(1, 2)
        error = (out.float() - want.float()).abs().max().item()
        assert error <= TOLERANCE[dtype] * want.float().abs().max().item(), (p, error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gpu_every_triton_kernel_compiled_generates_the_graphs_tokens(dtype, monkeypatch) -> None:
    """tiny-llama, attention=triton-rope, gemv=triton-all, compile=true, in the decode graph,
    resident and streamed: today's graphs' tokens (a failure gives the share of equal ones).
    Its 48-position cache is split as a long one would be (MIN_SPLIT_POSITIONS)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(attention, "MIN_SPLIT_POSITIONS", 1)
    assert_graphs_tokens(dtype, (1.0, 0.3), attention="triton-rope", gemv="triton-all",
                         compile="true")


def test_triton_needs_a_compiler_and_python_headers_on_cuda(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Triton builds a C launcher at a kernel's first launch: where it cannot, the kernels
    (and compile's auto) are refused up front, not failed in a trial."""
    import types

    from autotune.streaming import triton_check

    fake = types.ModuleType("triton")  # importable here even where triton is not
    monkeypatch.setitem(sys.modules, "triton", fake)
    cuda = torch.device("cuda", 0)
    include = tmp_path / "include"
    include.mkdir()
    (include / "Python.h").write_text("")
    monkeypatch.setattr(triton_check.sysconfig, "get_paths",
                        lambda scheme=None: {"include": str(include)})
    monkeypatch.setenv("CC", "cc")
    assert triton_check.unavailable(cuda) is None
    monkeypatch.delenv("CC")
    monkeypatch.setattr(triton_check.shutil, "which", lambda name: None)
    assert "needs a C compiler" in triton_check.unavailable(cuda)
    fake.knobs = types.SimpleNamespace(build=types.SimpleNamespace(impl=object()))
    assert triton_check.unavailable(cuda) is None  # the user's own build
    del fake.knobs
    monkeypatch.setenv("CC", "cc")
    (include / "Python.h").unlink()
    assert "python3-dev" in triton_check.unavailable(cuda)
