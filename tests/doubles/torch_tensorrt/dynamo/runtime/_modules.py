"""The engine layer of the double: ``TorchTensorRTModule`` and the engine it wraps.

Models research note §1.3-1.5. An engine holds one partition of the exported graph (run with
PyTorch, standing in for TensorRT's kernels), its streamable bytes ``S`` (weights with two or
more dimensions; the rest, norm scales and buffers, TensorRT keeps resident), its budget, and
an execution context whose lifetime follows the version's rules. The "serialized engine" is
``torch.save`` of that state, so the state-dict path (``get_extra_state``/``set_extra_state``)
is exercised like the real one. Speed, device memory and TensorRT's own optimizations are not
modelled.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

import torch
from torch_tensorrt import _state

logger = logging.getLogger("torch_tensorrt.dynamo.runtime")


class _Engine:
    """Stands in for ``torch.classes.tensorrt.Engine`` / the Python ``TRTEngine``."""

    def __init__(self, serialized: bytes) -> None:
        payload = torch.load(io.BytesIO(serialized), weights_only=False)
        self.graph = payload["graph"]
        self.streamable = int(payload["streamable"])  # bytes; 0 without enable_weight_streaming
        self.nonstreamable = int(payload["nonstreamable"])
        self.serialized = serialized
        self._budget = self.streamable  # TensorRT's default: >= S, streaming off (§6)
        self.context_alive = False
        self.contexts_created = 0
        self.context_changed = False
        self.graph_captured = False
        self.graph_resets = 0
        self.executions = 0
        _state.COUNTERS["engines_deserialized"] += 1
        if self.streamable > 0:
            # Torch-TRT applies TensorRT's automatic budget on deserialization, before any
            # context exists (§1.4).
            self._budget = self.automatic_device_memory_budget
        if _state.version() < (2, 13):
            self._create_context()  # 2.6-2.12 create the context with the engine

    # The TorchScript properties (§1.4).
    @property
    def streamable_device_memory_budget(self) -> int:
        return self.streamable

    @property
    def automatic_device_memory_budget(self) -> int:
        # Computed independently per engine at call time from "free memory", capped at S;
        # summed over engines it may count the same free memory twice (§1.2).
        free = max(0, _state.FREE_DEVICE_MEMORY - _state.AUTO_RESERVE)
        return min(self.streamable, free)

    @property
    def device_memory_budget(self) -> int:
        return self._budget

    @device_memory_budget.setter
    def device_memory_budget(self, value: int) -> None:
        if not _state.FAULTS["keep_context_on_set"]:
            self._invalidate_context()
        if self.context_alive:
            return  # TensorRT refuses a budget change while a context is alive (§1.5, #4333)
        self._budget = int(value)
        self.context_changed = True
        if _state.version() != (2, 13):
            self._create_context()  # eager before 2.13 and again in 2.14 (§1.5)

    def reset_captured_graph(self) -> None:
        self.graph_captured = False
        self.graph_resets += 1

    def _invalidate_context(self) -> None:
        self.context_alive = False

    def _create_context(self) -> None:
        self.context_alive = True
        self.contexts_created += 1

    def execute(self, inputs: list[Any]) -> Any:
        if not self.context_alive:
            self._create_context()  # lazy creation on the next forward (2.13)
        if self.context_changed:
            # Shapes and addresses are re-bound and a per-engine graph re-recorded (§1.5).
            self.graph_captured = False
            self.context_changed = False
        self.executions += 1
        return self.graph(*inputs)


class TorchTensorRTModule(torch.nn.Module):
    """``nn.Module`` around one engine; the four budget methods of §1.3."""

    def __init__(
        self,
        serialized_engine: bytes | None = None,
        input_binding_names: list[str] | None = None,
        output_binding_names: list[str] | None = None,
        *,
        name: str = "",
        settings: Any = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_binding_names = list(input_binding_names or [])
        self.output_binding_names = list(output_binding_names or [])
        self.settings = settings
        self.serialized_engine = serialized_engine
        self.engine: _Engine | None = _Engine(serialized_engine) if serialized_engine else None

    def _get_engine(self) -> _Engine:
        if self.engine is None:
            raise RuntimeError("Engine has not been setup yet.")
        return self.engine

    def get_streamable_device_memory_budget(self) -> int:
        return self._get_engine().streamable_device_memory_budget

    def get_automatic_device_memory_budget(self) -> int:
        return self._get_engine().automatic_device_memory_budget

    def get_device_memory_budget(self) -> int:
        return self._get_engine().device_memory_budget

    def set_device_memory_budget(self, budget_bytes: int) -> int:
        engine = self._get_engine()
        if budget_bytes < 0:  # negative means the streamable size: streaming off
            budget_bytes = self.get_streamable_device_memory_budget()
        engine.device_memory_budget = budget_bytes
        if engine.device_memory_budget != budget_bytes:
            logger.error("Failed to set weight streaming budget to %s", budget_bytes)
            budget_bytes = engine.device_memory_budget
        if self.get_streamable_device_memory_budget() == budget_bytes:
            logger.warning("Weight streaming is disabled")
        return budget_bytes

    def _reset_captured_graph(self) -> None:
        self._get_engine().reset_captured_graph()

    def get_extra_state(self) -> tuple[str, Any, list[str], list[str]]:
        blob = base64.b64encode(self.serialized_engine) if self.serialized_engine else None
        return (self.name, blob, self.input_binding_names, self.output_binding_names)

    def set_extra_state(self, state: tuple[str, Any, list[str], list[str]]) -> None:
        self.name = state[0]
        self.serialized_engine = base64.b64decode(state[1]) if state[1] is not None else None
        self.engine = _Engine(self.serialized_engine) if self.serialized_engine else None
        self.input_binding_names = list(state[2])
        self.output_binding_names = list(state[3])

    def forward(self, *inputs: Any) -> Any:
        outputs = self._get_engine().execute(list(inputs))
        if isinstance(outputs, (tuple, list)) and len(outputs) == 1:
            return outputs[0]
        return outputs


class PythonTorchTensorRTModule(TorchTensorRTModule):
    """The separate Python-runtime module of 2.6-2.12 (``use_python_runtime=True``); same four
    methods (§1.3). Gone in 2.13, where the runtimes merged."""
