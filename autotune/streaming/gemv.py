"""A small-batch decode step's GEMMs as Triton kernels, each one kernel with its neighbours.

A decode step's output and down projections add their product to the residual stream,
``x += y @ W.T``, with ``W`` of 4096 rows for llama2-7b. At batch 1 cuBLAS splits their K
dimension to fill the GPU (32 tiles of 128 rows would leave most SMs idle) and adds a reduce
kernel per GEMM: on the H200 these 64 GEMMs read their weights at 82% of the bandwidth, and
their 64 reduces cost another 0.12 ms of a 4.25 ms step (issue 22). This kernel gives each
program ``block_n`` rows of ``W`` and the whole of K, so that about 128 programs fill one wave,
and adds the residual in its epilogue: one kernel a GEMM.

The projections fed by an RMSNorm, q-k-v and gate-up, get one kernel each as well
(:func:`norm_linear`, ``gemv=triton-all``): the norm moves into the GEMM, and gate-up's SwiGLU
into its epilogue, which takes a decode layer from about 12 kernels to 6. Each program reads
its rows of x whole anyway, so it sums their squares on the way and scales its outputs by
``rsqrt(mean + eps)`` at the end: ``rms_norm(x) @ W.T = r * ((x * g) @ W.T)``, one pass, no
separate norm kernel and no normalized copy of x.

Weights stored 8-bit (:mod:`autotune.streaming.quant`) are read as stored, each row's scale
applied once after its sum, where the cuBLAS path widens the matrix in memory first.

Sums in float32 over K in their own order (not cuBLAS's), so 16-bit outputs differ in the last
bits. For ``M`` (batch x tokens) up to ``MAX_ROWS``; larger ones stay cuBLAS's. Needs
``triton`` and a CUDA tensor; on CPU only under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

MAX_ROWS = 16  # tl.dot's smallest tile: rows beyond one tile are cuBLAS's job
TRITON_CHOICES = ("triton", "triton-all")  # the ``gemv`` option's values that run these kernels
# Default tilings (block_n, block_k, warps, stages), to be replaced by what the GPU's sweep
# (benchmarks/gemv.py) finds. Chosen from what each compiles to for sm_90
# (benchmarks/triton_resources.py): a program keeps stages - 1 tiles of W in flight, and an
# H200 SM needs about 30 KiB in flight to keep its share of 4.8 TB/s at ~1 us of latency (an
# estimate, by Little's law). The residual GEMMs (N 4096: 128 programs of 32 rows, one an SM)
# need deep tiles for that: 3 x 32 x 256 x 2 bytes = 48 KiB; the norm GEMMs (N 12288 and
# 2 x 11008) have 3 programs an SM, and reach it with smaller ones.
RESIDUAL = (32, 256, 4, 4)
NORM = (32, 128, 4, 3)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def add_linear_kernel(x_ptr, y_ptr, w_ptr, scale_ptr, m, n, k, x_sm, y_sm, w_sn,
                          SCALED: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of W: outputs
        rows = tl.arange(0, ROWS)  # of y and x, masked beyond m
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for start in range(0, k, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            y = tl.load(y_ptr + rows[:, None] * y_sm + ks[None, :],
                        mask=(rows[:, None] < m) & (ks[None, :] < k), other=0.0)
            w = tl.load(w_ptr + cols[:, None] * w_sn + ks[None, :],
                        mask=(cols[:, None] < n) & (ks[None, :] < k), other=0.0)
            acc += tl.dot(y, tl.trans(w.to(y.dtype)), input_precision=PRECISION)
        if SCALED:  # 8-bit rows: their scale, once, after the sum
            acc *= tl.load(scale_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        where = x_ptr + rows[:, None] * x_sm + cols[None, :]
        inside = (rows[:, None] < m) & (cols[None, :] < n)
        x = tl.load(where, mask=inside, other=0.0)
        tl.store(where, (acc + x.to(tl.float32)).to(x_ptr.dtype.element_ty), mask=inside)

    return add_linear_kernel


def add_linear_(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                scale: torch.Tensor | None = None, *, block_n: int = RESIDUAL[0],
                block_k: int = RESIDUAL[1], num_warps: int = RESIDUAL[2],
                num_stages: int = RESIDUAL[3]) -> torch.Tensor:
    """``x += y @ weight.T`` in place, ``x`` [M, N], ``y`` [M, K], ``weight`` [N, K] (each
    with a unit last stride), M <= MAX_ROWS; returns ``x``. ``scale`` [N]: ``weight`` is
    stored 8-bit (:mod:`autotune.streaming.quant`), each row times its scale, read as 8 bits
    (never widened in memory). The keywords are the kernel's tiling (``benchmarks/gemv.py``
    compares them)."""
    m, n = x.shape
    k = y.shape[1]
    if y.stride(1) != 1 or weight.stride(1) != 1:  # the kernel reads rows as runs
        y, weight = y.contiguous(), weight.contiguous()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # 16-bit: tensor cores as is
    _kernel()[(-(-n // block_n),)](
        x, y, weight, x if scale is None else scale, m, n, k, x.stride(0), y.stride(0),
        weight.stride(0), SCALED=scale is not None, ROWS=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages)
    return x


@functools.cache
def _norm_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def norm_linear_kernel(x_ptr, g_ptr, w_ptr, scale_ptr, out_ptr, m, n, k, x_sm, w_sn,
                           out_sm, up_offset, eps, SWIGLU: tl.constexpr, SCALED: tl.constexpr,
                           ROWS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
        dtype = out_ptr.dtype.element_ty
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # outputs (gate's, with SWIGLU)
        rows = tl.arange(0, ROWS)
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        up = tl.zeros([ROWS, BLOCK_N], tl.float32)  # SWIGLU: the up rows' products
        squares = tl.zeros([ROWS], tl.float32)
        for start in range(0, k, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            inside_k = ks < k
            x = tl.load(x_ptr + rows[:, None] * x_sm + ks[None, :],
                        mask=(rows[:, None] < m) & inside_k[None, :], other=0.0).to(tl.float32)
            g = tl.load(g_ptr + ks, mask=inside_k, other=0.0).to(tl.float32)
            squares += tl.sum(x * x, 1)
            scaled = (x * g[None, :]).to(dtype)  # the norm's weight; its 1/rms comes last
            w_mask = (cols[:, None] < n) & inside_k[None, :]
            w = tl.load(w_ptr + cols[:, None] * w_sn + ks[None, :], mask=w_mask, other=0.0)
            acc += tl.dot(scaled, tl.trans(w.to(dtype)), input_precision=PRECISION)
            if SWIGLU:
                wu = tl.load(w_ptr + (cols[:, None] + up_offset) * w_sn + ks[None, :],
                             mask=w_mask, other=0.0)
                up += tl.dot(scaled, tl.trans(wu.to(dtype)), input_precision=PRECISION)
        rms = (1.0 / tl.sqrt(squares / k + eps))[:, None]
        out = acc * rms
        up = up * rms
        if SCALED:  # 8-bit rows: their scale, once, after the sum
            inside_n = cols < n
            out *= tl.load(scale_ptr + cols, mask=inside_n, other=0.0).to(tl.float32)[None, :]
            if SWIGLU:
                up *= tl.load(scale_ptr + cols + up_offset, mask=inside_n,
                              other=0.0).to(tl.float32)[None, :]
        if SWIGLU:  # rounded where the eager step rounds: each GEMM's output, silu's
            gate = out.to(dtype).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            out = silu * up.to(dtype).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * out_sm + cols[None, :], out.to(dtype),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))

    return norm_linear_kernel


def norm_linear_tiled(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                      scale: torch.Tensor | None, eps: float, swiglu: bool = False, *,
                      block_n: int = NORM[0], block_k: int = NORM[1], num_warps: int = NORM[2],
                      num_stages: int = NORM[3]
                      ) -> torch.Tensor:
    """:func:`norm_linear` with the kernel's tiling as keywords (``benchmarks/gemv.py``)."""
    m, k = x.shape
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if x.stride(1) != 1 or weight.stride(1) != 1:  # the kernel reads rows as runs
        x, weight = x.contiguous(), weight.contiguous()
    out = x.new_empty(m, n)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _norm_kernel()[(-(-n // block_n),)](
        x, norm_weight, weight, x if scale is None else scale, out, m, n, k, x.stride(0),
        weight.stride(0), out.stride(0), n, eps, SWIGLU=swiglu, SCALED=scale is not None,
        ROWS=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    return out


@torch.library.custom_op("autotune::norm_linear", mutates_args=())
def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                scale: torch.Tensor | None, eps: float, swiglu: bool) -> torch.Tensor:
    """``rms_norm(x, norm_weight, eps) @ weight.T``, ``x`` [M, K], ``weight`` [N, K] -> [M, N],
    M <= MAX_ROWS; with ``swiglu``, ``weight`` is gate's rows then up's, [2I, K], and the
    result is ``silu(gate) * up`` [M, I]. ``scale`` [N]: ``weight`` is stored 8-bit, as in
    :func:`add_linear_`. A custom op: ``torch.compile`` keeps it one call."""
    return norm_linear_tiled(x, norm_weight, weight, scale, eps, swiglu)


@norm_linear.register_fake
def _(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
      scale: torch.Tensor | None, eps: float, swiglu: bool) -> torch.Tensor:
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    return x.new_empty(x.shape[0], n)
