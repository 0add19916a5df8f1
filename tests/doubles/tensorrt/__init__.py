"""Test double of the ``tensorrt`` module as Torch-TensorRT exposes it: ``__version__`` (which
autotune records) and ``_package_name``. The real ``torch_tensorrt`` replaces
``sys.modules["tensorrt"]`` with a proxy whose ``_package_name`` is ``"tensorrt"`` or, for the
RTX wheel, ``"tensorrt_rtx"`` (2.11 ``_TensorRTProxyModule.py::alias_tensorrt``). Both are set
by ``doubles.install_torch_tensorrt``; the builder and runtime live in ``torch_tensorrt``'s
double. The engine reads two enums from here: ``ExecutionContextAllocationStrategy`` (the
Python runtime's contexts made ``USER_MANAGED``) and, on TensorRT-RTX only,
``DynamicShapesKernelSpecializationStrategy`` (its ``IRuntimeConfig``; the 1.4 bindings;
``doubles.install_torch_tensorrt`` removes it for data-center TensorRT, which has none).
"""

from __future__ import annotations

from enum import IntEnum

__version__ = "11.0.0"
_package_name = "tensorrt"


class ExecutionContextAllocationStrategy(IntEnum):
    """TensorRT's enum (NvInferRuntime.h), as the Python bindings name its members."""

    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class DynamicShapesKernelSpecializationStrategy(IntEnum):
    """TensorRT-RTX's enum (NvInferRuntime.h), as its Python bindings name the members."""

    LAZY = 0
    EAGER = 1
    NONE = 2
