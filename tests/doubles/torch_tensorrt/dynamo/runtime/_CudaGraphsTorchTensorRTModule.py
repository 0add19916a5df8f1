"""``CudaGraphsTorchTensorRTModule``: the whole-graph CUDA-graph wrapper (real 2.11
``dynamo/runtime/_CudaGraphsTorchTensorRTModule.py``), reduced to what weight streaming touches.

Modelled: ``compiled_module``; the 3-forward ``warm_up`` run by the constructor (counted, not
run: it needs captured inputs); the ``is_weight_streaming_set`` flag, which the next forward
consumes by re-recording the graph; ``_reset_captured_graph``. Not modelled: capture itself,
streams, input buffers, the shape key (the double records on the first forward and after a
reset or the flag).
"""

from __future__ import annotations

from typing import Any

import torch


class CudaGraphsTorchTensorRTModule(torch.nn.Module):
    def __init__(self, compiled_module: torch.nn.Module) -> None:
        super().__init__()
        self.compiled_module = compiled_module
        self.is_weight_streaming_set = False
        self.cudagraph: object | None = None
        self.graph_resets = 0
        self.records = 0
        self.warm_up_forwards = 0
        self.warm_up()

    def warm_up(self) -> None:
        self.warm_up_forwards += 3

    def _reset_captured_graph(self) -> None:
        if self.cudagraph is not None:
            self.graph_resets += 1
            self.cudagraph = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.cudagraph is None or self.is_weight_streaming_set:
            self._reset_captured_graph()
            self.cudagraph = object()  # stands in for the captured torch.cuda.CUDAGraph
            self.records += 1
        self.is_weight_streaming_set = False
        return self.compiled_module(*args, **kwargs)
