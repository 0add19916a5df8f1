"""``torch_tensorrt.Input``: a shape range (min/opt/max) and a dtype (research note §2)."""

from __future__ import annotations

from typing import Any


class Input:
    def __init__(
        self,
        shape: tuple[int, ...] | None = None,
        *,
        min_shape: tuple[int, ...] | None = None,
        opt_shape: tuple[int, ...] | None = None,
        max_shape: tuple[int, ...] | None = None,
        dtype: Any = None,
        name: str = "",
    ) -> None:
        if shape is not None:
            min_shape = opt_shape = max_shape = tuple(shape)
        if min_shape is None or opt_shape is None or max_shape is None:
            raise ValueError("Input needs shape, or min_shape, opt_shape and max_shape")
        if not (len(min_shape) == len(opt_shape) == len(max_shape)):
            raise ValueError("min_shape, opt_shape and max_shape differ in rank")
        for lo, mid, hi in zip(min_shape, opt_shape, max_shape, strict=True):
            if not lo <= mid <= hi:
                raise ValueError(f"expected min <= opt <= max; got {min_shape}, {opt_shape}, {max_shape}")
        self.shape = {"min_shape": tuple(min_shape), "opt_shape": tuple(opt_shape),
                      "max_shape": tuple(max_shape)}
        self.dtype = dtype
        self.name = name

    def __repr__(self) -> str:
        return f"Input({self.shape}, dtype={self.dtype})"
