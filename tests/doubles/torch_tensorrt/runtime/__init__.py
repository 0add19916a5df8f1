"""``torch_tensorrt.runtime`` of the double: ``weight_streaming`` exists from 2.6 on (§0); the
engine module classes are re-exported as in the real ``runtime/__init__.py`` (2.11);
``PythonTorchTensorRTModule`` only before 2.13."""

from __future__ import annotations

from typing import Any

from torch_tensorrt import _state
from torch_tensorrt.dynamo.runtime import TorchTensorRTModule

__all__ = ["TorchTensorRTModule"]


def __getattr__(name: str) -> Any:
    if name == "weight_streaming" and _state.version() >= (2, 6):
        from torch_tensorrt.runtime._weight_streaming import weight_streaming

        return weight_streaming
    if name == "PythonTorchTensorRTModule" and _state.version() < (2, 13):
        from torch_tensorrt.dynamo.runtime._modules import PythonTorchTensorRTModule

        return PythonTorchTensorRTModule
    raise AttributeError(f"module 'torch_tensorrt.runtime' has no attribute {name!r}")
