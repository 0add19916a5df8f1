"""``torch_tensorrt.dynamo.compile`` of the double: option rules per version, partitioning.

Option rules (research note §2, table): on 2.6-2.9 ``use_explicit_typing`` defaults to False
and must be True with weight streaming; on 2.10-2.12 it defaults to True and warns
(DeprecationWarning) on every call; with explicit typing, ``enabled_precisions`` may only be
{float32}; on 2.13+ both options are gone from the signature and are silently ignored. 2.5
has no ``enable_weight_streaming``: it lands in ``**kwargs`` and the engines stream nothing.

Partitioning: nodes whose op is in ``torch_executed_ops`` run in PyTorch children
``_run_on_gpu_N``, maximal runs of the others become engines ``_run_on_acc_N`` (N counts all
partitions, as Torch-TRT names them). Each engine's weights move into it, as TensorRT embeds
them. The precision of an engine is the dtype of its weights (strong typing).

Not modelled: converter coverage, ``min_block_size``, kernel selection, build time.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import torch
from torch import fx
from torch.fx.passes.split_module import split_module
from torch_tensorrt import _state
from torch_tensorrt.dynamo.runtime._modules import PythonTorchTensorRTModule, TorchTensorRTModule

_UNSET: Any = object()
_WS_ASSERT = "When enable_weight_streaming is enabled, it requires use_explicit_typing to be set to True"


def compile(  # noqa: A001 - the real function's name
    exported_program: Any,
    inputs: Any = None,
    *,
    arg_inputs: Any = None,
    device: Any = None,
    enabled_precisions: Any = _UNSET,
    use_explicit_typing: Any = _UNSET,
    enable_weight_streaming: Any = _UNSET,
    torch_executed_ops: Any = None,
    truncate_double: bool = False,
    use_python_runtime: bool = False,
    **kwargs: Any,
) -> fx.GraphModule:
    version = _state.version()
    given = {k: v for k, v in locals().items() if k not in ("exported_program", "kwargs")
             and v is not _UNSET}
    _state.COMPILE_CALLS.append({"version": version, **given, **kwargs})
    if version < (2, 6):
        # No such option before 2.6 (§0): it is swallowed by **kwargs and ignored.
        enable_weight_streaming = False
    elif version < (2, 13):
        if version >= (2, 10):
            warnings.warn("`use_explicit_typing` is deprecated", DeprecationWarning, stacklevel=2)
            explicit = True if use_explicit_typing is _UNSET else use_explicit_typing
        else:
            explicit = False if use_explicit_typing is _UNSET else use_explicit_typing
        if enable_weight_streaming is True:
            assert explicit, _WS_ASSERT
        if explicit:
            precisions = {torch.float32} if enabled_precisions is _UNSET else set(enabled_precisions)
            assert precisions <= {torch.float32}, (
                "When use_explicit_typing is enabled, only torch.float32 is allowed in the "
                "enabled_precisions"
            )
    # 2.13+: use_explicit_typing and enabled_precisions were removed; ignored if passed.
    streaming = enable_weight_streaming is True
    if use_python_runtime and version >= (2, 13):
        use_python_runtime = False  # deprecated no-op in 2.13+ (§1.3)
    arg_inputs = arg_inputs if arg_inputs is not None else inputs
    gm = exported_program.module()
    _check_inputs(gm, arg_inputs)
    return _partition(gm, set(map(str, torch_executed_ops or ())), streaming, use_python_runtime)


def _check_inputs(gm: fx.GraphModule, arg_inputs: Any) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if arg_inputs is None or len(arg_inputs) != len(placeholders):
        raise ValueError(
            f"expected {len(placeholders)} inputs for the exported program; got {arg_inputs!r}"
        )


def _op_name(target: Any) -> str:
    return f"torch.ops.{target}" if hasattr(target, "_schema") else str(target)


def _partition(
    gm: fx.GraphModule, torch_ops: set[str], streaming: bool, python_runtime: bool,
) -> fx.GraphModule:
    for node in list(gm.graph.nodes):  # export's runtime guard module is not an op
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.recompile()

    parts: dict[fx.Node, int] = {}
    kinds: list[str] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        kind = "gpu" if node.op == "call_function" and _op_name(node.target) in torch_ops else "acc"
        if not kinds or kinds[-1] != kind:
            kinds.append(kind)
        parts[node] = len(kinds) - 1
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            parts[node] = min([parts[u] for u in node.users if u in parts] or [0])

    split = split_module(gm, gm, lambda n: parts[n], keep_original_order=True)
    _move_weights_into_partitions(split)

    engine_cls = PythonTorchTensorRTModule if python_runtime else TorchTensorRTModule
    for node in split.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("submod_"):
            continue
        index = int(str(node.target).removeprefix("submod_"))
        sub = split.get_submodule(node.target)
        new_name = f"_run_on_{kinds[index]}_{index}"
        if kinds[index] == "acc":
            _state.COUNTERS["engines_built"] += 1
            child: torch.nn.Module = engine_cls(_serialize(sub, streaming), name=new_name)
        else:
            child = sub
        split.add_submodule(new_name, child)
        node.target = new_name
    split.delete_all_unused_submodules()
    split.recompile()
    return split


def _move_weights_into_partitions(split: fx.GraphModule) -> None:
    """split_module leaves weights in the parent and passes them in; put them inside."""
    for node in split.graph.nodes:
        if node.op != "call_module":
            continue
        sub = split.get_submodule(node.target)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        first_op = next(n for n in sub.graph.nodes if n.op != "placeholder")
        kept = []
        for arg, ph in zip(node.args, placeholders, strict=True):
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                attr = "w_" + str(arg.target).replace(".", "_")
                # Plain tensors (not Parameters): an engine's weights are constants.
                sub.register_buffer(attr, _fetch(split, str(arg.target)).detach())
                with sub.graph.inserting_before(first_op):
                    got = sub.graph.get_attr(attr)
                ph.replace_all_uses_with(got)
                sub.graph.erase_node(ph)
            else:
                kept.append(arg)
        node.args = tuple(kept)
        sub.recompile()
    for node in list(split.graph.nodes):
        if node.op == "get_attr" and not node.users:
            split.graph.erase_node(node)
    split.delete_all_unused_submodules()
    split.recompile()


def _fetch(module: torch.nn.Module, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _serialize(sub: fx.GraphModule, streaming: bool) -> bytes:
    tensors = list(sub.buffers()) + list(sub.parameters())
    streamable = sum(t.numel() * t.element_size() for t in tensors if t.dim() >= 2)
    total = sum(t.numel() * t.element_size() for t in tensors)
    buf = io.BytesIO()
    torch.save(
        {"graph": sub, "streamable": streamable if streaming else 0,
         "nonstreamable": total - streamable if streaming else total},
        buf,
    )
    return buf.getvalue()
