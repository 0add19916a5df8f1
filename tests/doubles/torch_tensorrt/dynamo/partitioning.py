"""``torch_tensorrt.dynamo.partitioning`` of the double: the default (fast, adjacency)
partitioner of real 2.11 ``partitioning/_adjacency_partitioner.py``, built like the real one on
torch's ``torch.fx.passes.splitter_base._SplitterBase``.

Modelled: which nodes are "supported" (every callable node whose qualified name or target is not
in ``torch_executed_ops``; get_attr nodes too), fusion groups (skipped when every op is
supported), the greedy dependency-ordered grouping that torch's splitter does (so an op that
does not depend on a PyTorch-executed node can join an earlier engine), merging engines smaller
than ``min_block_size`` (default 5) into the PyTorch block before them, and the names
``_run_on_acc_N`` / ``_run_on_gpu_N`` where N counts all blocks.

Converter coverage only by namespace: every ATen (and prims) op converts, and an op of any
other namespace, a custom op such as ``autotune::cache_attention``, has no converter, so it
runs in PyTorch. Not modelled: ATen ops without a converter, capability validators, the
global partitioner, resource partitioning, hierarchical partitioning.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
import torch.fx.passes.operator_support as ops
from torch.fx.passes.splitter_base import (
    FxNetAccFusionsFinder,
    FxNetAccNodesFinder,
    Subgraph,
    _SplitterBase,
    _SplitterSettingBase,
)
from torch.fx.passes.tools_common import CALLABLE_NODE_OPS

MIN_BLOCK_SIZE = 5  # real _defaults.MIN_BLOCK_SIZE


def qualified_name(target: Any) -> str:
    """How Torch-TRT names an op for ``torch_executed_ops``: ``torch.ops.aten.cos.default``
    (``ConverterRegistry.qualified_name_or_str``)."""
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target}"
    if callable(target) and hasattr(target, "__module__") and hasattr(target, "__name__"):
        return f"{target.__module__}.{target.__name__}"
    return str(target)


def _has_converter(target: Any) -> bool:
    """Torch-TRT's converters are registered for ATen ops (and Python operators such as
    getitem); a custom op has none unless its author registers one."""
    return not (isinstance(target, torch._ops.OpOverload)
                and target.namespace not in ("aten", "prims"))


class _Support(ops.OperatorSupportBase):
    def __init__(self, torch_executed_ops: Collection[Any]) -> None:
        super().__init__()
        self.torch_executed_ops = set(torch_executed_ops)
        self.unsupported: dict[str, int] = {}

    def is_node_supported(self, submodules: Any, node: torch.fx.Node) -> bool:
        name = qualified_name(node.target)
        convertible = node.op == "get_attr" or (
            node.op == "call_function" and _has_converter(node.target))
        if convertible and name not in self.torch_executed_ops \
                and node.target not in self.torch_executed_ops:
            return True
        if not node.is_impure():
            self.unsupported[name] = self.unsupported.get(name, 0) + 1
        return False


class _Partitioner(_SplitterBase):
    # Not _SplitterBase.__init__: like the real TRTPartitioner it runs no ShapeProp and allows
    # non-tensor values between blocks.
    def __init__(self, gm: torch.fx.GraphModule, support: _Support, min_block_size: int,
                 skip_fusion: bool) -> None:
        self.module = gm
        self.settings = _SplitterSettingBase(min_acc_module_size=min_block_size,
                                             allow_non_tensor=True, skip_fusion=skip_fusion)
        self.operator_support = support
        self.acc_nodes = FxNetAccNodesFinder(gm, support, True)()
        self.fusions = {} if skip_fusion else FxNetAccFusionsFinder(gm, set(self.acc_nodes))()
        if self.fusions and hasattr(self, "_merge_overlapping_fusions"):
            self._merge_overlapping_fusions()
        self.deps = self.find_deps()
        self.update_deps_for_fusions()
        self.non_acc_submodule_name = "_run_on_gpu_"
        self._node_submodule_map: dict[str, str] = {}
        self._return_tuple = False
        self.tags: list[str] = []

    def starter_nodes(self) -> tuple[set[torch.fx.Node], set[torch.fx.Node]]:
        # Every callable node is a starter; the dependency check decides when it is taken.
        acc = {n for n in self.acc_nodes if n.op in CALLABLE_NODE_OPS}
        other = {n for n in self.module.graph.nodes if n.op in CALLABLE_NODE_OPS and n not in acc}
        return other, acc

    def remove_small_acc_subgraphs(self, subgraphs: list[Subgraph]) -> list[Subgraph]:
        kept: list[Subgraph] = []
        for sub in subgraphs:
            if sub.is_acc and len(sub.nodes) < self.settings.min_acc_module_size:
                sub.is_acc = False  # too small to be worth an engine: runs in PyTorch
            if kept and not sub.is_acc and not kept[-1].is_acc:
                kept[-1].nodes.extend(sub.nodes)  # blocks alternate, so this is the one before
            else:
                kept.append(sub)
        return kept

    def partition(self) -> torch.fx.GraphModule:
        subgraphs = self.remove_small_acc_subgraphs(self.put_nodes_into_subgraphs())
        self.tag(subgraphs)
        return self.split(remove_tag=True)


def fast_partition(gm: torch.fx.GraphModule, min_block_size: int = MIN_BLOCK_SIZE,
                   torch_executed_ops: Collection[Any] = ()) -> torch.fx.GraphModule:
    """The GraphModule split into ``_run_on_acc_N`` / ``_run_on_gpu_N`` child GraphModules."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    support = _Support(torch_executed_ops)
    callable_nodes = [n for n in gm.graph.nodes if n.op in CALLABLE_NODE_OPS]
    supported = [n for n in callable_nodes if support.is_node_supported({}, n)]
    support.unsupported.clear()
    # Fusion is skipped when everything converts (real compile_module's skip_fusion).
    skip_fusion = len(supported) == len(callable_nodes)
    return _Partitioner(gm, support, min_block_size, skip_fusion).partition()
