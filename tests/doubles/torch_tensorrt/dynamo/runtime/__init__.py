"""``torch_tensorrt.dynamo.runtime``: the engine modules (PythonTorchTensorRTModule only on
2.6-2.12, research note §1.3)."""

from __future__ import annotations

from typing import Any

from torch_tensorrt import _state
from torch_tensorrt.dynamo.runtime._modules import TorchTensorRTModule

__all__ = ["TorchTensorRTModule"]


def __getattr__(name: str) -> Any:
    if name == "PythonTorchTensorRTModule" and _state.version() < (2, 13):
        from torch_tensorrt.dynamo.runtime._modules import PythonTorchTensorRTModule

        return PythonTorchTensorRTModule
    raise AttributeError(f"module 'torch_tensorrt.dynamo.runtime' has no attribute {name!r}")
