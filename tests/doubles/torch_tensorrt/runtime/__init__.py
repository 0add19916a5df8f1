"""``torch_tensorrt.runtime`` of the double: ``weight_streaming`` exists from 2.6 on (§0)."""

from __future__ import annotations

from typing import Any

from torch_tensorrt import _state
from torch_tensorrt.runtime._weight_streaming import CudaGraphsTorchTensorRTModule

__all__ = ["CudaGraphsTorchTensorRTModule"]


def __getattr__(name: str) -> Any:
    if name == "weight_streaming" and _state.version() >= (2, 6):
        from torch_tensorrt.runtime._weight_streaming import weight_streaming

        return weight_streaming
    raise AttributeError(f"module 'torch_tensorrt.runtime' has no attribute {name!r}")
