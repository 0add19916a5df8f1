"""The residual GEMMs of a small-batch decode step without split-K: one Triton kernel.

A decode step's output and down projections add their product to the residual stream,
``x += y @ W.T``, with ``W`` of 4096 rows for llama2-7b. At batch 1 cuBLAS splits their K
dimension to fill the GPU (32 tiles of 128 rows would leave most SMs idle) and adds a reduce
kernel per GEMM: on the H200 these 64 GEMMs read their weights at 82% of the bandwidth, and
their 64 reduces cost another 0.12 ms of a 4.25 ms step (issue 22). This kernel gives each
program ``BLOCK_N`` rows of ``W`` and the whole of K, so that about 128 programs fill one wave,
and adds the residual in its epilogue: one kernel a GEMM.

Sums in float32 over K in its own order (not cuBLAS's), so 16-bit outputs differ in the last
bits. For ``M`` (batch x tokens) up to ``MAX_ROWS``; larger ones stay cuBLAS's. Needs
``triton`` and a CUDA tensor; on CPU only under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

MAX_ROWS = 16  # tl.dot's smallest tile: rows beyond one tile are cuBLAS's job
BLOCK_N = 32  # rows of W a program reads: 4096 / 32 = 128 programs, about one wave
BLOCK_K = 128


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def add_linear_kernel(x_ptr, y_ptr, w_ptr, m, n, k, x_sm, y_sm, w_sn,
                          ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of W: outputs
        rows = tl.arange(0, ROWS)  # of y and x, masked beyond m
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for start in range(0, k, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            y = tl.load(y_ptr + rows[:, None] * y_sm + ks[None, :],
                        mask=(rows[:, None] < m) & (ks[None, :] < k), other=0.0)
            w = tl.load(w_ptr + cols[:, None] * w_sn + ks[None, :],
                        mask=(cols[:, None] < n) & (ks[None, :] < k), other=0.0)
            acc += tl.dot(y, tl.trans(w), input_precision=PRECISION)
        where = x_ptr + rows[:, None] * x_sm + cols[None, :]
        inside = (rows[:, None] < m) & (cols[None, :] < n)
        x = tl.load(where, mask=inside, other=0.0)
        tl.store(where, (acc + x.to(tl.float32)).to(x_ptr.dtype.element_ty), mask=inside)

    return add_linear_kernel


def add_linear_(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, *,
                block_n: int = BLOCK_N, block_k: int = BLOCK_K, num_warps: int = 4,
                num_stages: int = 3) -> torch.Tensor:
    """``x += y @ weight.T`` in place, ``x`` [M, N], ``y`` [M, K], ``weight`` [N, K] (each
    with a unit last stride), M <= MAX_ROWS; returns ``x``. The keywords are the kernel's
    tiling (``benchmarks/gemv.py`` compares them)."""
    m, n = x.shape
    k = y.shape[1]
    if y.stride(1) != 1 or weight.stride(1) != 1:  # the kernel reads rows as runs
        y, weight = y.contiguous(), weight.contiguous()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # 16-bit: tensor cores as is
    _kernel()[(-(-n // block_n),)](
        x, y, weight, m, n, k, x.stride(0), y.stride(0), weight.stride(0),
        ROWS=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages)
    return x
