"""``torch_tensorrt.dynamo.compile`` of the double: option rules per version, then the real
pipeline's order (2.11 ``dynamo/_compiler.py`` L674-807): inputs, decompositions, lowering,
partitioning of the *decomposed* graph, one engine per ``_run_on_acc_N`` block.

Option rules (research note §2, checked against the v2.6-v2.12 tags): 2.6-2.9
``use_explicit_typing`` defaults to False; 2.10-2.12 it defaults to True and a
DeprecationWarning fires on every call (the check reads ``kwargs``); with explicit typing
``enabled_precisions`` must be exactly one of {float32} (2.8+ also float4), an AssertionError
(2.6-2.7 and 2.8+ texts differ) raised *before* the weight-streaming assertion; 2.13+ dropped
both options, so they land in ``**kwargs`` and are ignored. 2.5 has no
``enable_weight_streaming``: it is swallowed by ``**kwargs`` and the engines stream nothing.

Inputs (2.11 L683-704): ``inputs`` and ``arg_inputs`` are aliases, at least one of them or
``kwarg_inputs`` is required (AssertionError texts as in the real file). They are recorded but,
as in the real partitioned path, the engines' shapes come from the exported program.

The result is the partitioned GraphModule itself: it keeps the exported module's pytree
calling convention (``_in_spec``/``_out_spec`` and the pytree codegen), so it is called with the
same args/kwargs as ``exported_program.module()`` and returns the same output structure.

Not modelled: converter coverage, kernels, build time, the engine cache, ``dryrun``, the
global partitioner, ``lazy_engine_init``.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import fx
from torch_tensorrt import _state
from torch_tensorrt.dynamo import lowering, partitioning
from torch_tensorrt.dynamo.runtime._modules import (
    CompilationSettings,
    PythonTorchTensorRTModule,
    TorchTensorRTModule,
)

_UNSET: Any = object()


def _decompose(exported_program: Any) -> Any:
    """The decomposition step (``tests/doubles`` swaps in a memo of it: see there)."""
    return exported_program.run_decompositions(lowering.get_decompositions())

_WS_ASSERT = ("When enable_weight_streaming is enabled, it requires use_explicit_typing to be "
              "set to True")
_DEPRECATED_2_10 = ("`use_explicit_typing` is deprecated. This setting will be removed and you "
                    "should enable autocast instead.")
_DEPRECATED_2_11 = ("`use_explicit_typing` is deprecated. use_explicit_types is now on by "
                    "default, this setting will be removed and you should enable autocast to "
                    "recover weak typing behavior.")


def compile(  # noqa: A001 - the real function's name
    exported_program: Any,
    inputs: Any = None,
    *,
    arg_inputs: Any = None,
    kwarg_inputs: Any = None,
    device: Any = None,
    enabled_precisions: Any = _UNSET,
    use_explicit_typing: Any = _UNSET,
    enable_weight_streaming: Any = _UNSET,
    torch_executed_ops: Any = None,
    min_block_size: int = partitioning.MIN_BLOCK_SIZE,
    truncate_double: bool = False,
    use_python_runtime: bool = False,
    dynamically_allocate_resources: Any = _UNSET,
    **kwargs: Any,
) -> fx.GraphModule:
    version = _state.version()
    given = {k: v for k, v in locals().items() if k not in ("exported_program", "kwargs")
             and v is not _UNSET}
    _state.COMPILE_CALLS.append({"version": version, **given, **kwargs})
    streaming = _check_options(version, enable_weight_streaming, use_explicit_typing,
                               enabled_precisions)
    if use_python_runtime and version >= (2, 13):
        use_python_runtime = False  # deprecated no-op in 2.13+ (§1.3)
    _check_inputs(inputs, arg_inputs, kwarg_inputs)

    program = _decompose(exported_program)
    gm = lowering.lower(program.module())
    in_spec, out_spec = getattr(gm, "_in_spec", None), getattr(gm, "_out_spec", None)
    split = partitioning.fast_partition(gm, min_block_size, set(torch_executed_ops or ()))
    if in_spec is not None:  # compile_module's preserve_module_specs
        split._in_spec = in_spec
    if out_spec is not None:
        split._out_spec = out_spec
    # 2.11 added the setting (before, it would be an unknown keyword, ignored here).
    dynamic = dynamically_allocate_resources is True and version >= (2, 11)
    settings = CompilationSettings(enable_weight_streaming=streaming,
                                   use_python_runtime=use_python_runtime,
                                   dynamically_allocate_resources=dynamic,
                                   torch_executed_ops=set(torch_executed_ops or ()))
    engine_cls = PythonTorchTensorRTModule if use_python_runtime else TorchTensorRTModule
    for name, sub in list(split.named_children()):
        if "_run_on_acc" in name:
            _state.COUNTERS["engines_built"] += 1
            setattr(split, name, engine_cls(
                _serialize(sub, streaming), _input_names(sub), _output_names(sub),
                name=name, settings=settings))
    # The engines whose outputs reach the user hand out unowned tensors (2.11 L1107-1114).
    outputs = next(n for n in reversed(split.graph.nodes) if n.op == "output")
    for node in _flat_nodes(outputs.args):
        if node.op == "call_module" and "_run_on_acc" in str(node.target):
            split.get_submodule(str(node.target)).set_output_tensors_as_unowned(True)
    return split


def _check_options(version: tuple[int, int], enable_weight_streaming: Any,
                   use_explicit_typing: Any, enabled_precisions: Any) -> bool:
    if version < (2, 6):
        return False  # no such option before 2.6 (§0): swallowed by **kwargs
    if version < (2, 13):
        if version >= (2, 10):
            text = _DEPRECATED_2_11 if version >= (2, 11) else _DEPRECATED_2_10
            warnings.warn(text, DeprecationWarning, stacklevel=3)
            explicit = True if use_explicit_typing is _UNSET else use_explicit_typing
        else:
            explicit = False if use_explicit_typing is _UNSET else use_explicit_typing
        precisions = {torch.float32} if enabled_precisions is _UNSET else set(enabled_precisions)
        allowed = {torch.float32} | ({torch.float4_e2m1fn_x2} if version >= (2, 8) else set())
        if explicit and (len(precisions) != 1 or not precisions & allowed):
            if version < (2, 8):
                raise AssertionError(
                    "When use_explicit_typing is enabled, only torch.float32 is allowed in the "
                    f"enabled_precisions but found {precisions}")
            raise AssertionError(
                "use_explicit_typing was set to True, however found that enabled_precisions was "
                f"also specified (saw: {precisions}, expected: dtype.f32, dtype.f4). "
                "enabled_precisions should not be used when use_explicit_typing=True")
        if enable_weight_streaming is True and not explicit:
            raise AssertionError(_WS_ASSERT)
    # 2.13+: use_explicit_typing and enabled_precisions were removed; ignored if passed.
    return enable_weight_streaming is True


def _check_inputs(inputs: Any, arg_inputs: Any, kwarg_inputs: Any) -> None:
    if arg_inputs is None and kwarg_inputs is None and inputs is None:
        raise AssertionError("'arg_inputs', 'kwarg_inputs' and 'inputs' should not all be None.")
    if arg_inputs is not None and inputs is not None:
        raise AssertionError("'arg_inputs' and 'inputs' should not be used at the same time.")


def _flat_nodes(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _input_names(sub: fx.GraphModule) -> list[str]:
    # TRTInterpreter names input bindings after the placeholders' targets.
    return [str(n.target) for n in sub.graph.nodes if n.op == "placeholder"]


def _output_names(sub: fx.GraphModule) -> list[str]:
    out = next(n for n in reversed(sub.graph.nodes) if n.op == "output").args[0]
    count = len(out) if isinstance(out, (tuple, list)) else 1
    return [f"output{i}" for i in range(count)]


def _serialize(sub: fx.GraphModule, streaming: bool) -> bytes:
    """The "engine": the block's graph with its weights as constants (TensorRT embeds them)."""
    for name, param in list(sub.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = sub.get_submodule(owner_name)
        delattr(owner, attr)
        owner.register_buffer(attr, param.detach())
    tensors = list(sub.buffers())
    # Streamable: weights of two or more dimensions; norm scales and the like stay resident.
    streamable = sum(t.numel() * t.element_size() for t in tensors if t.dim() >= 2)
    total = sum(t.numel() * t.element_size() for t in tensors)
    buf = io.BytesIO()
    torch.save({"graph": sub, "streamable": streamable if streaming else 0,
                "nonstreamable": total - streamable if streaming else total}, buf)
    return buf.getvalue()
