"""The engine layer of the double: ``TorchTensorRTModule``, ``PythonTorchTensorRTModule`` and
the engine they wrap (real 2.11 ``dynamo/runtime/_TorchTensorRTModule.py``,
``_PythonTorchTensorRTModule.py``, C++ ``core/runtime/TRTEngine.cpp``; 2.13/main from the tags).

An engine holds one ``_run_on_acc`` block of the decomposed graph (run with PyTorch, standing in
for TensorRT's kernels), its streamable bytes ``S`` (weights of two or more dimensions), its
budget and an execution context. Context lifetime, per version (TRTEngine.cpp):

- 2.6-2.12 (C++ engine): the context is created with the engine; a budget change resets it,
  sets the budget and creates a new one *eagerly*, then flags ``context_changed``;
- 2.13 and main (C++ engine): the context is created lazily on the first forward;
  a budget change calls ``invalidate_exec_ctx()`` and the next forward re-creates it (eager only
  with profiling, not modelled). The Python-only ``TRTEngine`` of main re-creates eagerly, but it
  is used only where the C++ runtime is missing, which the double does not model;
- ``PythonTorchTensorRTModule`` (2.6-2.12): ``del self.context``, set, eager re-create,
  always with TensorRT's default strategy (``STATIC``: the context allocates its own memory,
  the weight-streaming scratch with it). Its ``engine`` is TensorRT's ``ICudaEngine`` and its
  ``context`` an ``IExecutionContext`` (``_PythonContext``), replaceable from outside: a
  ``USER_MANAGED`` one runs only once ``set_device_memory`` gave it at least
  ``device_memory_size_v2`` bytes, which include the streaming scratch (TensorRT's guide;
  on TensorRT-RTX, 281 MB for a llama2-7b layer at budget 0: benchmarks/results/issue18).

Resource allocation (2.11+, ``dynamically_allocate_resources``; serialized info field 10): a
dynamic engine's context is created ``kUSER_MANAGED`` and each forward hands it a workspace
(``setDeviceMemory``); a static one holds its own memory from creation to destruction. Up to
2.12 a budget change re-creates the context *static* whatever the strategy (TRTEngine.cpp v2.11
L369-378, v2.12 L421), and the next forward's ``setDeviceMemory`` is refused (TensorRT logs
"Context not created with user managed device memory, cannot set buffer"; the call still runs,
on the static memory); ``set_resource_allocation_strategy`` re-creates eagerly, the new context
before the old one goes. 2.13 and main create the context per the strategy (lazily), and a
strategy change only invalidates it. The double counts live static contexts and their peak
(``_state.STATIC_CONTEXTS``): the memory that a refused hand-over keeps held.

Also as in 2.11: the automatic budget is applied at deserialization when ``S > 0``; the extra
state is ``(name, engine_info, input_binding_names, output_binding_names)`` with
``engine_info`` the 11-field serialized list whose field 3 is the base64 engine (decoded in place
by ``set_extra_state``, which then fails on the metadata field, as 2.11's does); ``forward`` asserts the input count against the binding names and
returns one tensor for one output, else a tuple. Not modelled: speed, device memory (beyond
the static contexts' count), devices and
platforms, profiling, output allocators, the Python module's state-dict hooks.
"""

from __future__ import annotations

import base64
import ctypes
import io
import logging
import pickle
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import tensorrt
import torch
from torch_tensorrt import _state

logger = logging.getLogger("torch_tensorrt.dynamo.runtime._TorchTensorRTModule")
# The C++ runtime's logger ("ERROR: [Torch-TensorRT] - ..." on stderr), here a Python one.
_trt_logger = logging.getLogger("torch_tensorrt")
_py_logger = logging.getLogger("torch_tensorrt.dynamo.runtime._PythonTorchTensorRTModule")

# Field indices of the serialized engine info (core/runtime/runtime.h, v2.11).
NAME_IDX, ENGINE_IDX, INPUT_BINDING_NAMES_IDX, OUTPUT_BINDING_NAMES_IDX = 1, 3, 4, 5
HW_COMPATIBLE_IDX, SERIALIZED_METADATA_IDX = 6, 7
REQUIRES_OUTPUT_ALLOCATOR_IDX, RESOURCE_ALLOCATION_STRATEGY_IDX, SERIALIZATION_LEN = 9, 10, 11
_BINDING_DELIM = "%"


@dataclass
class CompilationSettings:
    """The few ``dynamo._settings.CompilationSettings`` fields the double uses."""

    enable_weight_streaming: bool = False
    use_python_runtime: bool = False
    dynamically_allocate_resources: bool = False
    lazy_engine_init: bool = False
    torch_executed_ops: set[Any] = field(default_factory=set)


class _Engine:
    """Stands in for ``torch.classes.tensorrt.Engine`` (or the Python runtime's engine)."""

    def __init__(self, serialized: bytes, eager_context: bool, dynamic: bool = False) -> None:
        payload = torch.load(io.BytesIO(serialized), weights_only=False)
        self.graph = payload["graph"]
        self.streamable = int(payload["streamable"])  # bytes; 0 without enable_weight_streaming
        self.nonstreamable = int(payload["nonstreamable"])
        self.serialized = serialized
        self._budget = self.streamable  # TensorRT's default: >= S, streaming off (§6)
        self.eager_context = eager_context
        self.dynamic = dynamic  # ResourceAllocationStrategy::kDynamic
        self.context: str | None = None  # "static" or "user_managed" while one is alive
        self.contexts_created = 0
        self.refused_workspaces = 0
        self.context_changed = False
        self.graph_captured = False
        self.graph_resets = 0
        self.executions = 0
        self.output_tensors_unowned = False
        _state.COUNTERS["engines_deserialized"] += 1
        if self.streamable > 0:
            # Applied on deserialization, before any context exists (TRTEngine.cpp v2.11 L128).
            self._budget = self.automatic_device_memory_budget
        if eager_context:
            self._create_context()

    @property
    def context_alive(self) -> bool:
        return self.context is not None

    # -- ICudaEngine, as the Python runtime uses it ------------------------------------------

    @property
    def weight_streaming_scratch_memory_size(self) -> int:
        return int(SCRATCH_SHARE * max(0, self.streamable - self._budget))

    @property
    def device_memory_size_v2(self) -> int:
        """Activations and, once a budget streams, the scratch (read after the budget is set)."""
        return ACTIVATION_BYTES + self.weight_streaming_scratch_memory_size

    def create_execution_context(self, strategy: Any = 0) -> _PythonContext:
        """From an allocation strategy, or from an ``IRuntimeConfig`` (its strategy and, on
        TensorRT-RTX, its kernel specialization)."""
        if isinstance(strategy, _RuntimeConfig):
            return _PythonContext(self, strategy.allocation, strategy._specialization)
        return _PythonContext(self, strategy)

    def create_runtime_config(self) -> _RuntimeConfig:
        return _RuntimeConfig()

    def is_shape_inference_io(self, name: str) -> bool:
        """A size that an earlier block computed, which Torch-TensorRT hands over as a shape
        input (named ``sym_size_int_N`` there and here), read from host memory."""
        return any(n.op == "placeholder" and n.name == name and name.startswith("sym_size")
                   for n in self.graph.graph.nodes)

    @property
    def streamable_device_memory_budget(self) -> int:
        return self.streamable

    @property
    def automatic_device_memory_budget(self) -> int:
        # TensorRT's free-memory heuristic per engine at call time, capped at S (§1.2).
        free = max(0, _state.FREE_DEVICE_MEMORY - _state.AUTO_RESERVE)
        return min(self.streamable, free)

    @property
    def device_memory_budget(self) -> int:
        return self._budget

    @device_memory_budget.setter
    def device_memory_budget(self, value: int) -> None:
        if not _state.FAULTS["keep_context_on_set"]:
            self._destroy_context()  # exec_ctx.reset() / invalidate_exec_ctx()
        if not self.context_alive:  # TensorRT refuses a change under a live context (#4333)
            self._budget = int(value)
        if self.eager_context:
            self._create_context(static=True)  # 2.6-2.12: createExecutionContext(), static
        self.context_changed = True

    def set_resource_allocation_strategy(self, dynamic: bool) -> None:
        if dynamic == self.dynamic:
            return
        self.dynamic = dynamic
        if self.eager_context:
            self._create_context()  # the new context first, then the old one is released
        else:
            self._destroy_context()  # 2.13+: invalidate_exec_ctx(); the next forward creates

    def reset_captured_graph(self) -> None:
        self.graph_captured = False
        self.graph_resets += 1

    def _create_context(self, static: bool | None = None) -> None:
        kind = "static" if (not self.dynamic if static is None else static) else "user_managed"
        if kind == "static":
            _state.STATIC_CONTEXTS["alive"] += 1
            _state.STATIC_CONTEXTS["peak"] = max(_state.STATIC_CONTEXTS["peak"],
                                                 _state.STATIC_CONTEXTS["alive"])
        self._destroy_context()
        self.context = kind
        self.contexts_created += 1

    def _destroy_context(self) -> None:
        if self.context == "static":
            _state.STATIC_CONTEXTS["alive"] -= 1
        self.context = None

    def run(self, inputs: list[Any]) -> list[Any]:
        """The block's graph alone (the Python runtime checks its own context)."""
        self.executions += 1
        out = self.graph(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def execute(self, inputs: list[Any]) -> list[Any]:
        if not self.context_alive:
            self._create_context()  # 2.13+: lazily, on the first forward after load or a change
        if self.dynamic and self.context == "static":
            # execute_engine.cpp: setDeviceMemory on a context TensorRT allocated itself.
            self.refused_workspaces += 1
            _trt_logger.error(
                "IExecutionContext::setDeviceMemory: Error Code 3: API Usage Error (Parameter "
                "check failed, condition: mAllocationStrategy == ExecutionContextAllocation"
                "Strategy::kUSER_MANAGED. setDeviceMemory: Context not created with user "
                "managed device memory, cannot set buffer)")
        if self.context_changed:
            # Shapes and addresses are re-bound and a per-engine graph re-recorded (§1.5).
            self.graph_captured = False
            self.context_changed = False
        self.executions += 1
        out = self.graph(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]


# Stand-ins for TensorRT's sizes (the real ones come from the built engine): activation memory
# per context, and the streaming scratch as a share of the bytes a budget leaves streamed.
ACTIVATION_BYTES = 4096
SCRATCH_SHARE = 0.7  # a llama2-7b layer engine at budget 0: 281 MB of 405 MB


class _RuntimeConfig:
    """An ``IRuntimeConfig`` as TensorRT-RTX 1.4's bindings show it: the context's allocation
    strategy (a setter) and, on TensorRT-RTX only, its kernel specialization (a property that
    takes the enum), their defaults static and lazy."""

    def __init__(self) -> None:
        self.allocation = tensorrt.ExecutionContextAllocationStrategy.STATIC
        self._specialization: Any = None

    def set_execution_context_allocation_strategy(self, strategy: Any) -> None:
        self.allocation = tensorrt.ExecutionContextAllocationStrategy(strategy)

    @property
    def dynamic_shapes_kernel_specialization_strategy(self) -> Any:
        kind = tensorrt.DynamicShapesKernelSpecializationStrategy  # AttributeError off RTX
        return kind.LAZY if self._specialization is None else self._specialization

    @dynamic_shapes_kernel_specialization_strategy.setter
    def dynamic_shapes_kernel_specialization_strategy(self, value: Any) -> None:
        kind = tensorrt.DynamicShapesKernelSpecializationStrategy
        if not isinstance(value, kind):  # pybind11's enums take their own members only
            raise TypeError(f"incompatible function arguments: {value!r}")
        self._specialization = value


class _PythonContext:
    """An ``IExecutionContext`` as the Python bindings show it: its strategy, and the memory
    ``set_device_memory(ptr, size)`` (``setDeviceMemoryV2``) gave it (user-managed only)."""

    def __init__(self, engine: _Engine, strategy: Any, specialization: Any = None) -> None:
        self.engine, self.strategy = engine, tensorrt.ExecutionContextAllocationStrategy(strategy)
        self.specialization = specialization  # None: the default (lazy on TensorRT-RTX)
        self.memory: tuple[int, int] | None = None  # (address, bytes)
        self.addresses: dict[str, int] = {}  # set_tensor_address, by tensor name
        # The double's own bookkeeping: the host copy that the module's setup_input_tensors
        # bound a shape input to, until someone binds that input again.
        self.bound_copies: dict[str, weakref.ref[Any]] = {}
        if self.static:
            _state.STATIC_CONTEXTS["alive"] += 1
            _state.STATIC_CONTEXTS["peak"] = max(_state.STATIC_CONTEXTS["peak"],
                                                 _state.STATIC_CONTEXTS["alive"])

    @property
    def static(self) -> bool:
        return self.strategy != tensorrt.ExecutionContextAllocationStrategy.USER_MANAGED

    def set_device_memory(self, memory: int, size: int) -> None:
        if self.static:
            _trt_logger.error("IExecutionContext::setDeviceMemoryV2: Error Code 3: API Usage "
                              "Error (Context not created with user managed device memory, "
                              "cannot set buffer)")
            return
        self.memory = (int(memory), int(size))

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = int(address)
        self.bound_copies.pop(name, None)

    def shape_input(self, name: str) -> int:
        """The value TensorRT reads at ``infer_shapes`` and at the launch: what lies at the
        bound host address then. Where that was the runtime's own copy, already freed, the real
        one reads whatever is there (a batch of 92 where 8 ran, on the H200); the double
        fails as TensorRT did then."""
        copy = self.bound_copies.get(name)
        if copy is not None and copy() is None:
            _trt_logger.error(f"IExecutionContext::inferShapes: Error Code 7: Internal Error "
                              f"(shape input {name} read from freed host memory)")
            raise RuntimeError("infer_shapes error code: -1")
        return ctypes.c_int64.from_address(self.addresses[name]).value

    def check_runnable(self) -> None:
        """What ``execute_async_v3`` needs of a user-managed context: enough memory given."""
        if self.static:
            return
        need = self.engine.device_memory_size_v2
        if self.memory is None or self.memory[1] < need:
            raise RuntimeError(f"IExecutionContext::enqueueV3: Error Code 1: device memory of "
                               f"{need} bytes not set (got {self.memory})")

    def __del__(self) -> None:
        if self.static:
            _state.STATIC_CONTEXTS["alive"] -= 1


class _BudgetMethods(torch.nn.Module):
    """The four budget methods both runtime modules have (2.11, identical bodies)."""

    engine: _Engine | None
    _log = logger

    def get_streamable_device_memory_budget(self) -> int:
        return self.engine.streamable_device_memory_budget  # type: ignore[union-attr]

    def get_automatic_device_memory_budget(self) -> int:
        return self.engine.automatic_device_memory_budget  # type: ignore[union-attr]

    def get_device_memory_budget(self) -> int:
        return self.engine.device_memory_budget  # type: ignore[union-attr]

    def set_device_memory_budget(self, budget_bytes: int) -> int:
        if budget_bytes < 0:  # negative means the streamable size: streaming off
            budget_bytes = self.get_streamable_device_memory_budget()
        self.engine.device_memory_budget = budget_bytes  # type: ignore[union-attr]
        if self.engine.device_memory_budget != budget_bytes:  # type: ignore[union-attr]
            self._log.error(f"Failed to set weight streaming budget to {budget_bytes}")
            budget_bytes = self.engine.device_memory_budget  # type: ignore[union-attr]
        if self.get_streamable_device_memory_budget() == budget_bytes:
            self._log.warning("Weight streaming is disabled")
        return budget_bytes

    def _reset_captured_graph(self) -> None:
        self.engine.reset_captured_graph()  # type: ignore[union-attr]

    def set_output_tensors_as_unowned(self, enabled: bool) -> None:
        self.engine.output_tensors_unowned = enabled  # type: ignore[union-attr]

    def _run(self, inputs: tuple[Any, ...], expected: int) -> Any:
        assert len(inputs) == expected, (
            f"Wrong number of inputs, expected {expected} got {len(inputs)}."
        )
        outputs = self.engine.execute(list(inputs))  # type: ignore[union-attr]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class _ScriptEngine(_Engine):
    """The C++ runtime's engine is a TorchScript object (``torch.classes.tensorrt.Engine``):
    asking it for truthiness raises, as its ``__len__`` is not implemented, so 2.11's
    ``get_extra_state`` (``if self.engine:``) fails for a live engine; its ``__getstate__()``
    gives ``[engine info]``, the serialized engine in base64 (as 2.11's refit reads it)."""

    packed: list[Any] | None = None  # set by the module that owns it

    def __len__(self) -> int:
        raise NotImplementedError(
            "'__len__' is not implemented for __torch__.torch.classes.tensorrt.Engine")

    def __getstate__(self) -> list[Any]:
        return [list(self.packed or [])]


class TorchTensorRTModule(_BudgetMethods):
    """``nn.Module`` around one engine (C++ runtime in the real package)."""

    def __init__(
        self,
        serialized_engine: bytes | None = None,
        input_binding_names: list[str] | None = None,
        output_binding_names: list[str] | None = None,
        *,
        name: str = "",
        settings: CompilationSettings | None = None,
        weight_name_map: dict[Any, Any] | None = None,
        requires_output_allocator: bool = False,
        symbolic_shape_expressions: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.weight_name_map = weight_name_map
        self.requires_output_allocator = requires_output_allocator
        self.symbolic_shape_expressions = symbolic_shape_expressions
        self.input_binding_names = input_binding_names if input_binding_names is not None else []
        self.output_binding_names = (output_binding_names if output_binding_names is not None
                                     else [])
        self.name = name
        self.settings = settings if settings is not None else CompilationSettings()
        self.dynamically_allocate_resources = self.settings.dynamically_allocate_resources
        self.serialized_engine = serialized_engine
        self.engine: _Engine | None = None
        if serialized_engine and not self.settings.lazy_engine_init:
            self.setup_engine()

    def setup_engine(self) -> None:
        if self.engine is None:
            self.engine = _ScriptEngine(self.serialized_engine,  # type: ignore[arg-type]
                                        eager_context=_state.version() < (2, 13),
                                        dynamic=self.dynamically_allocate_resources)
            self.engine.packed = self._encoded_info()

    def use_dynamically_allocated_resources(self, dynamically_allocate_resources: bool = False,
                                            ) -> None:
        self.dynamically_allocate_resources = dynamically_allocate_resources
        self.engine.set_resource_allocation_strategy(  # type: ignore[union-attr]
            dynamically_allocate_resources)

    def _pack_engine_info(self) -> list[Any]:
        """2.11: from the module's own ``serialized_engine`` (kept after setup), raw bytes."""
        assert self.serialized_engine
        info: list[Any] = [""] * SERIALIZATION_LEN
        info[NAME_IDX] = self.name + "_engine" if self.name != "" else "tensorrt_engine"
        info[ENGINE_IDX] = self.serialized_engine
        info[INPUT_BINDING_NAMES_IDX] = _BINDING_DELIM.join(self.input_binding_names)
        info[OUTPUT_BINDING_NAMES_IDX] = _BINDING_DELIM.join(self.output_binding_names)
        info[HW_COMPATIBLE_IDX] = "0"
        # A str, as the real encode_metadata returns (b64encode(...).decode("utf-8")).
        info[SERIALIZED_METADATA_IDX] = base64.b64encode(
            pickle.dumps({"settings": self.settings})).decode("utf-8")
        info[REQUIRES_OUTPUT_ALLOCATOR_IDX] = "0"
        info[RESOURCE_ALLOCATION_STRATEGY_IDX] = str(int(self.dynamically_allocate_resources))
        return info

    def _encoded_info(self) -> list[Any]:
        info = self._pack_engine_info()
        info[ENGINE_IDX] = base64.b64encode(info[ENGINE_IDX])
        return info

    def get_extra_state(self) -> tuple[str, Any, list[str], list[str]]:
        # The real branches: a live engine's own state (its truthiness raises first, for a
        # C++ engine), a module holding only serialized bytes, or nothing.
        if self.engine:
            state: Any = self.engine.__getstate__()
        elif self.serialized_engine:
            state = self._encoded_info()
        else:
            state = None
        return (self.name, state, self.input_binding_names, self.output_binding_names)

    def set_extra_state(self, state: tuple[str, list[Any] | None, list[str], list[str]]) -> None:
        self.name = state[0]
        info = state[1]
        if info is not None:
            # Decoded in place, like the real one: the same state cannot be applied twice.
            info[ENGINE_IDX] = base64.b64decode(info[ENGINE_IDX])
            self.serialized_engine = info[ENGINE_IDX]
            self.engine = _ScriptEngine(info[ENGINE_IDX],
                                        eager_context=_state.version() < (2, 13),
                                        dynamic=info[RESOURCE_ALLOCATION_STRATEGY_IDX] == "1")
            # 2.11's own lines: the metadata _pack_engine_info made is a str, so this assert
            # fails (an AssertionError with no message); were it bytes, decode_metadata's
            # ``.encode("utf-8")`` would fail instead. The round trip never worked in 2.11.
            serialized_metadata = info[SERIALIZED_METADATA_IDX]
            assert isinstance(serialized_metadata, bytes)
            self.settings = pickle.loads(base64.b64decode(serialized_metadata.encode("utf-8")))[
                "settings"]
        else:
            self.engine = None
            self.settings = CompilationSettings()
        self.input_binding_names = state[2]
        self.output_binding_names = state[3]
        if isinstance(self.engine, _ScriptEngine):
            self.engine.packed = self._encoded_info()

    def forward(self, *inputs: Any) -> Any:
        if self.engine is None:
            raise RuntimeError("Engine has not been setup yet.")
        return self._run(inputs, len(self.input_binding_names))


class PythonTorchTensorRTModule(_BudgetMethods):
    """The Python-runtime module of 2.6-2.12 (``use_python_runtime=True``), not a subclass of
    ``TorchTensorRTModule``. Its context (``self.context``) is made in Python, with TensorRT's
    default strategy (static), at setup and again at every budget change
    (``_PythonTorchTensorRTModule.py`` v2.11 L255-262, L283-294); at load it applies the
    automatic budget through its own setter (so it may log "Weight streaming is disabled").
    Binding names are kept as ``input_names``/``output_names``; a shape input (a size an
    earlier block computed) is bound to a host copy that the module lets go before TensorRT
    reads it, as 2.11's does (``setup_input_tensors``). Pickled, it leaves out its
    engine and context and sets them up again when unpickled (so an empty one cannot be
    unpickled); its state-dict hooks are not modelled."""

    _log = _py_logger

    def __init__(
        self,
        serialized_engine: bytes | None = None,
        input_binding_names: list[str] | None = None,
        output_binding_names: list[str] | None = None,
        *,
        name: str = "",
        settings: CompilationSettings | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        self.name = name
        self.input_names = input_binding_names if input_binding_names is not None else []
        self.output_names = output_binding_names if output_binding_names is not None else []
        self.settings = settings if settings is not None else CompilationSettings()
        self.serialized_engine = serialized_engine
        self.engine: _Engine | None = None
        self.context: _PythonContext | None = None
        # TorchTRTRuntimeStates: context_changed makes a CUDA graph record again.
        self.runtime_states = SimpleNamespace(context_changed=False)
        if serialized_engine is not None and not self.settings.lazy_engine_init:
            self.setup_engine()

    def setup_engine(self) -> None:
        self.engine = _Engine(self.serialized_engine,  # type: ignore[arg-type]
                              eager_context=False)
        if self.settings.enable_weight_streaming:
            self.set_device_memory_budget(self.get_automatic_device_memory_budget())
        else:
            self.context = self.engine.create_execution_context()

    def set_device_memory_budget(self, budget_bytes: int) -> int:
        self.context = None  # ``del self.context``: its memory goes first
        budget_bytes = super().set_device_memory_budget(budget_bytes)
        self.context = self.engine.create_execution_context()  # type: ignore[union-attr]
        self.runtime_states.context_changed = True
        return budget_bytes

    def __getstate__(self) -> dict[str, Any]:  # 2.11: pickled without engine and context
        state = self.__dict__.copy()
        state.pop("engine", None)
        state.pop("context", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:  # and set up again on unpickling
        self.__dict__.update(state)
        self.setup_engine()

    def setup_input_tensors(self, contiguous_inputs: list[Any], cudagraphs_enabled: bool,
                            need_cudagraphs_record: bool) -> None:
        """Binds each input (2.11 L381-440): a shape input to a host copy made in the loop and
        let go with it, as the real one does (``inputs_cpu``, a local)."""
        for name, value in zip(self.input_names, contiguous_inputs, strict=True):
            if self.engine.is_shape_inference_io(name):  # type: ignore[union-attr]
                inputs_cpu = value.cpu().to(torch.int64).numpy().copy()
                self.context.set_tensor_address(name, inputs_cpu.ctypes.data)  # type: ignore[union-attr]
                self.context.bound_copies[name] = weakref.ref(inputs_cpu)  # type: ignore[union-attr]
            else:
                self.context.set_tensor_address(name, value.data_ptr())  # type: ignore[union-attr]

    def forward(self, *inputs: Any) -> Any:
        assert len(inputs) == len(self.input_names), (
            f"Wrong number of inputs, expected {len(self.input_names)} got {len(inputs)}."
        )
        if self.context is None:
            raise RuntimeError("Engine has not been setup yet.")
        # A size arrives as a Python int and goes over as a tensor (2.11 L691-694).
        contiguous = [i.contiguous() if isinstance(i, torch.Tensor) else torch.tensor(i)
                      for i in inputs]
        self.setup_input_tensors(contiguous, False, False)
        self.context.check_runnable()
        self.runtime_states.context_changed = False
        values = [self.context.shape_input(name)
                  if self.engine.is_shape_inference_io(name) else value  # type: ignore[union-attr]
                  for name, value in zip(self.input_names, contiguous, strict=True)]
        outputs = self.engine.run(values)  # type: ignore[union-attr]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
