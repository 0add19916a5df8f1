"""Issue 22: the residual GEMMs of a small-batch decode step without split-K
(``--engine-option gemv=triton``, :mod:`autotune.streaming.gemv`), and gate-up as two cuBLAS
GEMMs (``gemv=cublas-halves``).

On CPU the kernel runs under Triton's interpreter, in a subprocess (as in test_attention.py);
GPU tests (marked) compile it for the device, against torch's GEMM and today's tokens.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from test_attention import TOLERANCE, _interpreted
from test_native_engine import _generate, _load, assert_graphs_tokens

from autotune.errors import UserInputError
from autotune.measure.timing import random_prompt
from autotune.streaming import gemv


def test_the_kernel_adds_the_product_to_the_residual() -> None:
    _interpreted("gemv-kernel")


def test_the_norm_kernel_normalizes_and_multiplies() -> None:
    _interpreted("norm-kernel")


def test_the_kernels_read_8_bit_rows_and_apply_their_scales() -> None:
    _interpreted("quantized-kernels")


def test_the_engine_with_the_kernels_generates_the_cublas_tokens() -> None:
    _interpreted("gemv-engine")


def test_the_gemv_option_is_checked_before_the_weights_load() -> None:
    with pytest.raises(UserInputError, match="gemv: expected cublas, triton, triton-all or "
                                             "cublas-halves; got 'cutlass'"):
        _load(gemv="cutlass")
    assert _load().describe()["gemv"] == "cublas"


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_gate_up_in_halves_generates_the_one_gemm_tokens(quantization) -> None:
    """``gemv=cublas-halves`` (no Triton needed: it loads on CPU) splits each decode step's
    gate-up GEMM in two, gate's rows then up's, each half's 8-bit scales with it; its tokens
    are the one GEMM's, resident and streamed; a batch of more than gemv.MAX_ROWS keeps one."""
    prompt = random_prompt(2, 9, 512, seed=3, device="cpu")
    one, halves = (_load(quantization=(quantization,), gemv=g) for g in ("cublas", "cublas-halves"))
    assert halves.describe()["gemv"] == "cublas-halves"
    linear = torch.nn.functional.linear
    calls = []

    def counted(x, weight, *args):
        calls.append(weight.shape[0])
        return linear(x, weight, *args)

    rows = halves.spec.intermediate_size
    for fraction in (1.0, 0.4):
        for e in (one, halves):
            e.device_budget = int(fraction * e.total_device_budget)
        want = _generate(one, prompt, 6)
        calls.clear()
        with mock.patch.object(torch.nn.functional, "linear", counted):
            got = _generate(halves, prompt, 6)
        assert torch.equal(got, want), fraction
        # Prefill's one GEMM of 2 I rows a layer; each decode step's two of I rows.
        assert calls.count(rows) == 2 * 5 * halves.spec.num_hidden_layers, calls
    big = random_prompt(gemv.MAX_ROWS + 1, 4, 512, seed=4, device="cpu")
    calls.clear()
    with mock.patch.object(torch.nn.functional, "linear", counted):
        _generate(halves, big, 3)
    assert rows not in calls
    one.close()
    halves.close()


# -- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_gpu_kernel_equals_torch(dtype) -> None:
    """llama2-7b's output and down projections at 1, 8 and 16 rows."""
    pytest.importorskip("triton")
    gen = torch.Generator("cuda").manual_seed(0)
    for m in (1, 8, gemv.MAX_ROWS):
        for n, k in ((4096, 4096), (4096, 11008)):
            x, y, w = (torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)
                       for shape in ((m, n), (m, k), (n, k)))
            want = x.float() + y.float() @ w.float().t()
            got = gemv.add_linear_(x, y, w).float()
            error = (got - want).abs().max().item()
            assert error <= 4 * TOLERANCE[dtype] * want.abs().max().item(), (m, n, k, error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_gpu_norm_kernel_equals_torch(dtype) -> None:
    """llama2-7b's q-k-v and gate-up (with SwiGLU) at 1, 8 and 16 rows, against the eager
    RMSNorm and GEMMs in float32."""
    pytest.importorskip("triton")
    gen = torch.Generator("cuda").manual_seed(0)
    for m in (1, 8, gemv.MAX_ROWS):
        for n, swiglu in ((3 * 4096, False), (2 * 11008, True)):
            x = torch.randn(m, 4096, generator=gen, device="cuda", dtype=dtype)
            g = torch.rand(4096, generator=gen, device="cuda", dtype=dtype) + 0.5
            w = torch.randn(n, 4096, generator=gen, device="cuda", dtype=dtype) / 64
            h = torch.nn.functional.rms_norm(x.float(), (4096,), g.float(), 1e-5)
            want = h @ w.float().t()
            if swiglu:
                gate, up = want.chunk(2, dim=-1)
                want = torch.nn.functional.silu(gate) * up
            got = gemv.norm_linear(x, g, w, None, 1e-5, swiglu).float()
            error = (got - want).abs().max().item()
            assert error <= 4 * TOLERANCE[dtype] * want.abs().max().item(), (m, n, error)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("option", ["triton", "triton-all", "cublas-halves"])
def test_gpu_gemv_generates_the_graphs_tokens(dtype, option) -> None:
    """tiny-llama in the decode graph, resident and streamed: today's graphs' tokens (a
    failure gives the share of equal ones)."""
    pytest.importorskip("triton")
    assert_graphs_tokens(dtype, (1.0, 0.3), gemv=option)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_kernels_read_8_bit_rows(precision, dtype) -> None:
    """llama2-7b's gate-up and output projections stored 8-bit, at 1 and 16 rows: the kernels
    over the stored values and scales equal torch's GEMM over the widened matrix."""
    pytest.importorskip("triton")
    from autotune.streaming import quant

    quant.check_supported(precision, "cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    for m in (1, gemv.MAX_ROWS):
        w = torch.randn(2 * 11008, 4096, generator=gen, device="cuda", dtype=dtype) / 64
        q, scale = quant.quantize(w, precision, dtype)
        wide = quant.widen(q, scale, dtype).float()
        x = torch.randn(m, 4096, generator=gen, device="cuda", dtype=dtype)
        y = torch.randn(m, 8192, generator=gen, device="cuda", dtype=dtype)  # a view's rows
        # The residual kernel over 4096 of those rows (the output projection's shape).
        want = x.float() + y[:, :4096].float() @ wide[:4096].t()
        got = gemv.add_linear_(x.clone(), y[:, :4096], q[:4096], scale[:4096]).float()
        assert (got - want).abs().max().item() <= 4 * TOLERANCE[dtype] * want.abs().max().item()
        g = torch.rand(4096, generator=gen, device="cuda", dtype=dtype) + 0.5
        h = torch.nn.functional.rms_norm(x.float(), (4096,), g.float(), 1e-5)
        gate, up = (h @ wide.t()).chunk(2, dim=-1)
        want = torch.nn.functional.silu(gate) * up
        got = gemv.norm_linear(x, g, q, scale, 1e-5, True).float()
        assert (got - want).abs().max().item() <= 4 * TOLERANCE[dtype] * want.abs().max().item()
