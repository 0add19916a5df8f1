"""The native weight-streaming runtime, and its ``weight_streaming`` context manager.

:mod:`~autotune.streaming.runtime` holds the units (pinned host copies, resident buffers, the
ring of device slots and the copy/compute ordering), :mod:`~autotune.streaming.llama` the
forward pass, :mod:`~autotune.streaming.plan` the memory accounting. The engine built on them
is :class:`autotune.engines.native.NativeEngine`.

:func:`weight_streaming` mirrors ``torch_tensorrt.runtime.weight_streaming`` (2.6+) for any
autotune engine. Importing this package does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WeightStreamingContext", "weight_streaming"]


class WeightStreamingContext:
    """``total_device_budget``, ``device_budget`` (assigning applies the budget and stores the
    value applied, which may be less than requested), ``get_automatic_weight_streaming_budget()``;
    as a context manager it restores, on exit, the budget it found at construction."""

    total_device_budget: int
    device_budget: int

    def __init__(self, engine: Any) -> None:
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "total_device_budget", int(engine.total_device_budget))
        object.__setattr__(self, "current_device_budget", int(engine.device_budget))
        object.__setattr__(self, "device_budget", int(engine.device_budget))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "device_budget":
            value = self._set_streamable_weight_bytes(value)
        object.__setattr__(self, name, value)

    def _set_streamable_weight_bytes(self, requested: Any) -> int:
        if self.total_device_budget == 0:
            raise RuntimeError(
                "weight streaming: the engine has no streamable weights "
                "(total_device_budget is 0)")
        self.engine.device_budget = int(requested)  # clamps above total, rejects negative
        return int(self.engine.device_budget)

    def get_automatic_weight_streaming_budget(self) -> int:
        return int(self.engine.get_automatic_weight_streaming_budget())

    def __enter__(self) -> WeightStreamingContext:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.total_device_budget > 0:
            self.device_budget = self.current_device_budget


def weight_streaming(engine: Any) -> WeightStreamingContext:
    """The weight-streaming controls of ``engine``, as ``torch_tensorrt.runtime`` names them."""
    return WeightStreamingContext(engine)
