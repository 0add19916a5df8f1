"""``torch_tensorrt.dynamo`` of the double: ``compile``, lowering, partitioning, ``runtime``."""

from __future__ import annotations

from torch_tensorrt.dynamo import lowering, partitioning, runtime
from torch_tensorrt.dynamo._compiler import compile

__all__ = ["compile", "lowering", "partitioning", "runtime"]
