"""8-bit weight-only quantization: per-output-channel (row) scales, symmetric.

``quantize`` turns a matrix ``[rows, cols]`` into 8-bit values and a scale per row (in the
compute dtype, rounded there first, so that the stored scale is the one the values were made
with); ``widen`` is what the forward pass does on the device just before a matmul: the 8-bit
values times their row's scale, in the compute dtype. It is elementwise, static in shape and
allocation, so a CUDA graph captures it like any kernel. ``check_supported`` refuses fp8 where
the device has no e4m3 (compute capability below 8.9) or torch lacks the dtype.

See :mod:`autotune.precision` for the names and what is (and is not) quantized.
"""

from __future__ import annotations

from typing import Any

import torch

from autotune.errors import UserInputError
from autotune.precision import FP8_MIN_CAPABILITY

INT8_MAX = 127.0
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def storage_dtype(precision: str) -> torch.dtype:
    if precision == "int8":
        return torch.int8
    if precision == "fp8":
        return fp8_dtype()
    raise ValueError(f"not a quantized precision: {precision!r}")


def fp8_dtype() -> torch.dtype:
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise UserInputError(f"--quantization fp8: this torch ({torch.__version__}) has no "
                             "float8_e4m3fn")
    return dtype


def check_supported(precision: str, device: Any) -> None:
    """Refuses ``fp8`` where it cannot run (one clear line): a GPU of compute capability below
    8.9, or a torch without ``float8_e4m3fn``. On CPU it is allowed where torch has the dtype
    (the widening runs there too, for tests)."""
    if precision != "fp8":
        return
    fp8_dtype()
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < FP8_MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            raise UserInputError(
                f"--quantization fp8: {name} has compute capability {cap[0]}.{cap[1]}; fp8 "
                f"(e4m3) needs {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or more (Ada, "
                "Hopper and later): use int8")


def quantize(w: torch.Tensor, precision: str, scale_dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit values ``[rows, cols]`` and one scale per row ``[rows]`` (``scale_dtype``)."""
    x = w.float()
    top = INT8_MAX if precision == "int8" else FP8_MAX
    amax = x.abs().amax(dim=1)
    # The scale as it will be stored (rounded to scale_dtype), never 0 (an all-zero row), and
    # never rounded below max|w| / top (the row's largest value would then be clipped): a
    # scale rounded down is rounded again from one step of scale_dtype above.
    exact = amax / top
    scale = exact.to(scale_dtype)
    up = (exact * (1 + torch.finfo(scale_dtype).eps)).to(scale_dtype)
    scale = torch.where(scale.float() < exact, up, scale)
    tiny = torch.finfo(scale_dtype).tiny
    scale = torch.where(scale.float() > 0, scale, torch.full_like(scale, tiny))
    y = x / scale.float()[:, None]
    if precision == "int8":
        q = y.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = y.clamp_(-FP8_MAX, FP8_MAX).to(fp8_dtype())
    return q, scale


def widen(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The matrix in ``dtype``: ``q * scale`` per row (on the device, before the matmul)."""
    if q.dtype == torch.int8:
        # int8 x float promotes to the float: one kernel reads 1 byte, writes 2.
        return torch.mul(q, scale.unsqueeze(1))
    # fp8 has no promotion with 16-bit floats: cast, then scale in place, so that one widened
    # matrix is alive (the memory plan counts one). `q.to(dtype) * scale` held two: fp8 ran
    # out of memory where its plan fitted, on the H200 (benchmarks/results/issue21).
    return q.to(dtype).mul_(scale.unsqueeze(1))


def linear(x: torch.Tensor, w: dict[str, Any], key: str, rows: slice = slice(None)
           ) -> torch.Tensor:
    """``x @ W[rows].T`` for the unit's matrix ``key`` (all its rows by default): widened
    first where it is stored 8-bit."""
    scale = w.get(key + ".scale")
    if scale is None:
        return torch.nn.functional.linear(x, w[key][rows])
    return torch.nn.functional.linear(x, widen(w[key][rows], scale[rows], x.dtype))


def weight(w: dict[str, Any], key: str, dtype: torch.dtype) -> torch.Tensor:
    """The unit's matrix ``key`` in ``dtype`` (widened where stored 8-bit)."""
    scale = w.get(key + ".scale")
    return w[key] if scale is None else widen(w[key], scale, dtype)


def stored(w: dict[str, Any], key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unit's matrix ``key`` as stored, and its row scales (None: not 8-bit), for kernels
    that read 8-bit values themselves (:mod:`autotune.streaming.gemv`)."""
    return w[key], w.get(key + ".scale")
