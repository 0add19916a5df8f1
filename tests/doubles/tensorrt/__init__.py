"""Test double of the ``tensorrt`` package: only ``__version__``, which autotune records.

The builder and runtime live in ``torch_tensorrt``'s double; the version is set to the one the
chosen Torch-TensorRT release pins (research note §0) by ``doubles.install_torch_tensorrt``.
"""

from __future__ import annotations

__version__ = "11.0.0"
