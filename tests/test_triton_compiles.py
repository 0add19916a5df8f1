"""Issue 22: every Triton kernel compiles for the GPUs it is measured on (sm_90: H100, H200),
here, without a GPU (Triton compiles ahead of time on the host), keeps its registers (no spill
to local memory at the default tilings) and has its loop's loads pipelined (copied ahead into
shared memory, so that the weights stream while the previous tile is multiplied). A kernel that only the interpreter has run can
still fail the GPU's compiler (a dtype it cannot convert, a shape tl.dot refuses); device time
is too scarce to find that out there. ``benchmarks/triton_resources.py`` has the whole table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import triton_resources as tr  # noqa: E402

from autotune.streaming import gemv  # noqa: E402


def _cases() -> list:
    cases = []
    for dtype, weights in (("float16", "float16"), ("bfloat16", "int8"), ("float16", "fp8"),
                           ("float32", "float32")):
        default = (tr.gemv_cases(dtype, weights, gemv.RESIDUAL)[:1]  # each at its default
                   + tr.gemv_cases(dtype, weights, gemv.NORM)[1:])
        cases += [pytest.param(c, id=f"{c[0]}-{dtype}-{weights}") for c in default]
    for dtype, group, splits in (("bfloat16", 1, 5), ("float16", 4, 16), ("float32", 4, 1)):
        cases += [pytest.param(c, id=f"{c[0]}-{dtype}-group{group}-splits{splits}")
                  for c in tr.attention_cases(dtype, group, splits)
                  if c[0] != "decode_attention"]  # measured on the H200 already
    return cases


@pytest.mark.parametrize("case", _cases())
def test_compiles_for_hopper_without_spilling(case) -> None:
    name, fn, types, constexprs, warps, stages = case
    used = tr.resources(tr.compile_kernel(fn, types, constexprs, 90, warps, stages), warps)
    assert used["local_bytes"] == 0, used  # spilled registers: local memory on every access
    assert used["programs_per_sm"] >= 1, used
    if name != "combine":  # its loop reads a few hundred bytes: nothing to pipeline
        assert used["async_copies"] > 0, used  # loads copied ahead, not waited for each time
