"""``torch_tensorrt.runtime.weight_streaming`` of the double, rule by rule from the real file
(2.11 wheel ``runtime/_weight_streaming.py``; v2.6, v2.7 and v2.13 tags for the version
differences); written from that reading, not copied.

Per version: 2.6 sets the CUDA-graph wrapper's ``is_weight_streaming_set`` *after* the engines'
budgets and resets no graph; 2.7-2.12 set the flag and reset the wrapper's graph *before*, and
reset each engine's captured graph before its budget; 2.13+ also warm the wrapper up (3
forwards) after the budgets, and no longer accept ``PythonTorchTensorRTModule`` children.

Deliberately the same sharp edges as the real object: reading ``device_budget`` returns the
cached sum (it does not query the engines), floats are accepted and truncated, and a module
without engines yields ``total_device_budget == 0`` rather than an error at construction.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch_tensorrt import _state
from torch_tensorrt.dynamo.runtime._CudaGraphsTorchTensorRTModule import (
    CudaGraphsTorchTensorRTModule,
)
from torch_tensorrt.dynamo.runtime._modules import PythonTorchTensorRTModule, TorchTensorRTModule

logger = logging.getLogger("torch_tensorrt.runtime._weight_streaming")


def _engine_types() -> tuple[type, ...]:
    if _state.version() < (2, 13):
        return (PythonTorchTensorRTModule, TorchTensorRTModule)
    return (TorchTensorRTModule,)


class _WeightStreamingContextManager:
    def __init__(self, module: torch.nn.Module) -> None:
        rt_mods = []
        self.current_device_budget = 0
        self.cuda_graphs_module: CudaGraphsTorchTensorRTModule | None = None
        if isinstance(module, CudaGraphsTorchTensorRTModule):
            self.cuda_graphs_module = module
            module = module.compiled_module
        types = _engine_types()
        for name, rt_mod in module.named_children():  # one level deep only
            if "_run_on_acc" in name and isinstance(rt_mod, types):
                rt_mods.append((name, rt_mod))
                self.current_device_budget += rt_mod.get_device_memory_budget()
        self.streamable_budget = [m.get_streamable_device_memory_budget() for _, m in rt_mods]
        self.rt_mods = rt_mods
        # Bypass __setattr__: these are bookkeeping, not a budget request.
        object.__setattr__(self, "device_budget", self.current_device_budget)
        object.__setattr__(self, "total_device_budget", sum(self.streamable_budget))

    def get_automatic_weight_streaming_budget(self) -> int:
        return sum(m.get_automatic_device_memory_budget() for _, m in self.rt_mods)

    def __enter__(self) -> _WeightStreamingContextManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.total_device_budget > 0:
            logger.debug(
                f"Revert weight streaming budget to initial size: {self.current_device_budget}"
            )
            self.device_budget = self.current_device_budget

    def _set_streamable_weight_bytes(self, requested_budget: Any) -> int:
        total = self.total_device_budget
        if total == 0:
            raise RuntimeError(
                "Streamable bytes are zero. Was module complied with "
                "enable_weight_streaming=True option?"
            )
        elif total < requested_budget:
            logger.error(
                f"Requested budget is greater than streamable bytes: {total}. "
                f"requested budget: {requested_budget}"
            )
            requested_budget = total
        elif requested_budget < 0:
            raise RuntimeError("Requested budget cannot be negative")
        version = _state.version()
        shares = [int(s / total * requested_budget) for s in self.streamable_budget]
        graphs = self.cuda_graphs_module
        if graphs is not None and version >= (2, 7):
            graphs.is_weight_streaming_set = True
            graphs._reset_captured_graph()
        applied = 0
        for share, (name, rt_mod) in zip(shares, self.rt_mods, strict=True):
            if version >= (2, 7):
                rt_mod._reset_captured_graph()
            applied += rt_mod.set_device_memory_budget(share)
            logger.debug(f"Set weight streaming size {share} for {name}")
        if graphs is not None and version < (2, 7):
            graphs.is_weight_streaming_set = True  # 2.6: flag only, after the engines
        if graphs is not None and version >= (2, 13):
            graphs.warm_up()
        return applied

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "device_budget":
            value = self._set_streamable_weight_bytes(value)
        object.__setattr__(self, name, value)


def weight_streaming(module: torch.nn.Module) -> _WeightStreamingContextManager:
    return _WeightStreamingContextManager(module)
