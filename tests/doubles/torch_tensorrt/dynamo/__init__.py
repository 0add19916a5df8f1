"""``torch_tensorrt.dynamo`` of the double: ``compile`` and the ``runtime`` modules."""

from __future__ import annotations

from torch_tensorrt.dynamo import runtime
from torch_tensorrt.dynamo._compiler import compile

__all__ = ["compile", "runtime"]
