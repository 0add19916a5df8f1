"""``torch_tensorrt.runtime.weight_streaming`` of the double, rule by rule from research note
§1.1 (discovery) and §1.2 (setting the budget); written from that description, not copied.

Deliberately the same sharp edges as the real object: reading ``device_budget`` returns the
cached sum (it does not query the engines), floats are accepted and truncated, and a module
without engines yields ``total_device_budget == 0`` rather than an error at construction.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch_tensorrt import _state
from torch_tensorrt.dynamo.runtime._modules import PythonTorchTensorRTModule, TorchTensorRTModule

logger = logging.getLogger("torch_tensorrt.runtime")


class CudaGraphsTorchTensorRTModule(torch.nn.Module):
    """The whole-graph CUDA-graph wrapper, reduced to what weight streaming touches (§1.6):
    ``compiled_module``, the ``is_weight_streaming_set`` flag, graph reset and, on 2.13+, the
    3-forward warm-up after a budget change (counted, not run: it needs captured inputs)."""

    def __init__(self, compiled_module: torch.nn.Module) -> None:
        super().__init__()
        self.compiled_module = compiled_module
        self.is_weight_streaming_set = False
        self.graph_resets = 0
        self.warm_up_forwards = 0

    def _reset_captured_graph(self) -> None:
        self.graph_resets += 1

    def warm_up(self) -> None:
        self.warm_up_forwards += 3

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled_module(*args, **kwargs)


def _engine_types() -> tuple[type, ...]:
    if _state.version() < (2, 13):
        return (TorchTensorRTModule, PythonTorchTensorRTModule)
    # PythonTorchTensorRTModule no longer exists in 2.13+; in the double it is a subclass, so
    # exclude it explicitly to keep the discovery rule exact.
    return (TorchTensorRTModule,)


class _WeightStreamingContextManager:
    def __init__(self, module: torch.nn.Module) -> None:
        rt_mods = []
        streamable = []
        current = 0
        self.cuda_graphs_module = None
        if isinstance(module, CudaGraphsTorchTensorRTModule):
            self.cuda_graphs_module = module
            module = module.compiled_module
        types = _engine_types()
        for name, child in module.named_children():  # one level deep only
            if "_run_on_acc" not in name or not isinstance(child, types):
                continue
            if _state.version() >= (2, 13) and isinstance(child, PythonTorchTensorRTModule):
                continue
            current += child.get_device_memory_budget()
            streamable.append(child.get_streamable_device_memory_budget())
            rt_mods.append((name, child))
        self.current_device_budget = current
        self.streamable_budget = streamable
        self.rt_mods = rt_mods
        # Bypass __setattr__: these are bookkeeping, not a budget request.
        object.__setattr__(self, "device_budget", current)
        object.__setattr__(self, "total_device_budget", sum(streamable))

    def get_automatic_weight_streaming_budget(self) -> int:
        return sum(m.get_automatic_device_memory_budget() for _, m in self.rt_mods)

    def __enter__(self) -> _WeightStreamingContextManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.total_device_budget > 0:
            self.device_budget = self.current_device_budget

    def _set_streamable_weight_bytes(self, requested_budget: Any) -> int:
        total = self.total_device_budget
        if total == 0:
            raise RuntimeError(
                "streamable bytes are zero. Was module complied with "
                "enable_weight_streaming=True option?"
            )
        elif total < requested_budget:
            logger.error(
                "Requested budget is greater than streamable bytes: %s. requested budget: %s",
                total, requested_budget,
            )
            requested_budget = total
        elif requested_budget < 0:
            raise RuntimeError("Requested budget cannot be negative")
        version = _state.version()
        normalized = [s / total for s in self.streamable_budget]
        if self.cuda_graphs_module is not None and version >= (2, 7):
            self.cuda_graphs_module.is_weight_streaming_set = True
            self.cuda_graphs_module._reset_captured_graph()
        applied = 0
        for i, (_, rt_mod) in enumerate(self.rt_mods):
            if version >= (2, 7):
                rt_mod._reset_captured_graph()
            applied += rt_mod.set_device_memory_budget(int(normalized[i] * requested_budget))
        if self.cuda_graphs_module is not None and version >= (2, 13):
            self.cuda_graphs_module.warm_up()
        return applied

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "device_budget":
            value = self._set_streamable_weight_bytes(value)
        object.__setattr__(self, name, value)


def weight_streaming(module: torch.nn.Module) -> _WeightStreamingContextManager:
    return _WeightStreamingContextManager(module)
