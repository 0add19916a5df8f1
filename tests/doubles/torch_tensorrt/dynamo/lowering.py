"""``torch_tensorrt.dynamo.lowering`` of the double: the decomposition table and lowering passes
that ``dynamo.compile`` runs before partitioning (real 2.11: ``dynamo/_compiler.py`` L374-384,
``lowering/_decompositions.py::get_decompositions``, ``lowering/_decomposition_groups.py``,
``lowering/passes/_aten_lowering_pass.py``).

Modelled, because they decide which ops the partitioner sees and so where engines split:

- the table: every CompositeImplicitAutograd ATen op is decomposed (as the real default, not
  ``enable_experimental_decompositions``), except Torch-TRT's disabled set (``linear``,
  ``matmul``, ``_softmax``, the upsamples), which stay whole; plus the part of Torch-TRT's
  enabled torch decompositions an LLM graph meets, plus a few of its own replacements (``rsqrt``
  -> ``reciprocal(sqrt)``, ``silu`` -> ``x * sigmoid(x)``, ``view`` -> ``_reshape_copy``,
  ``_unsafe_view`` -> ``reshape``, ``alias``/``lift_fresh_copy`` -> identity, ``reciprocal`` ->
  ``div(1, x)``), written here from what they compute;
- the passes: ``remove_detach`` and ``remove_assert_nodes`` (pre and post), dead-code removal.

Not modelled: the rest of the enabled list (losses, backward ops, pooling), the attention
decompositions (off by default), ``constant_fold``, ``repair_input_as_output``,
``fuse_prims_broadcast``, autocast and complex-number rewrites.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._decomp import get_decompositions as torch_decompositions
from torch._export.utils import _collect_all_valid_cia_ops_for_aten_namespace, _get_decomp_for_cia

aten = torch.ops.aten

# Kept whole by Torch-TRT (``torch_disabled_decompositions``): it has converters for them.
DISABLED = {
    aten._softmax.default, aten.linear.default, aten.matmul.default,
    aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
    aten.upsample_linear1d.vec, aten.upsample_bilinear2d.vec, aten.upsample_trilinear3d.vec,
    aten.upsample_bicubic2d.vec,
}
# The part of ``torch_enabled_decompositions`` a decoder-only LLM graph meets.
ENABLED_TORCH = [
    aten.arange.default, aten.arange.start, aten.detach, aten.empty_like, aten.expand_as,
    aten.fill, aten.full_like, aten.masked_fill, aten.new_full, aten.new_ones, aten.new_zeros,
    aten.ones, aten.ones_like, aten.rsub, aten.stack, aten.t, aten.transpose.int,
    aten.tril.default, aten.triu.default, aten.unbind, aten.var, aten.var_mean, aten.zeros,
    aten.zeros_like, aten.clamp_min, aten.clamp_max, aten.linalg_vector_norm, aten.repeat,
    aten.narrow, aten.std,
]


def _own_decompositions() -> dict[Any, Any]:
    """Torch-TRT's own replacements (``TORCH_TRT_DECOMPOSITIONS``), the LLM-relevant ones."""
    def rsqrt(x: torch.Tensor) -> torch.Tensor:
        return torch.reciprocal(torch.sqrt(x))

    def silu(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)

    def view(x: torch.Tensor, size: Any) -> torch.Tensor:
        return aten._reshape_copy.default(x, size)

    def unsafe_view(x: torch.Tensor, size: Any) -> torch.Tensor:
        return torch.reshape(x, size)

    def identity(x: torch.Tensor) -> torch.Tensor:
        return x

    def reciprocal(x: torch.Tensor) -> torch.Tensor:
        return torch.div(1, x)

    return {
        aten.rsqrt.default: rsqrt, aten.silu.default: silu, aten.view.default: view,
        aten._unsafe_view.default: unsafe_view, aten.alias.default: identity,
        aten.lift_fresh_copy.default: identity, aten.reciprocal.default: reciprocal,
    }


def get_decompositions() -> dict[Any, Any]:
    """The table ``compile`` hands to ``ExportedProgram.run_decompositions`` (default flags)."""
    table = {op: _get_decomp_for_cia(op) for op in _collect_all_valid_cia_ops_for_aten_namespace()
             if op not in DISABLED}
    return {**torch_decompositions(ENABLED_TORCH), **table, **_own_decompositions()}


_REMOVED = (aten._assert_scalar.default, aten._assert_tensor_metadata.default)


def lower(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The modelled passes, in place: detach and assertion nodes go, then dead code."""
    for node in list(gm.graph.nodes):
        if node.target is aten.detach.default:
            node.replace_all_uses_with(node.all_input_nodes[0])
            gm.graph.erase_node(node)
        elif node.target in _REMOVED:
            gm.graph.erase_node(node)
        elif node.op == "call_module" and node.target == "_guards_fn":
            # export's input-guard module (newer torch) is not an op. The double drops it; the
            # 2.11 source has no rule for it (not verified against the real package).
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
