"""Issue 22: what the Triton kernels compile to for a GPU, compiled here, without the GPU.

Triton compiles ahead of time for a named architecture on the host (ptxas and cuobjdump ship
in its wheel). For each kernel of :mod:`autotune.streaming` (the GEMV kernels of ``gemv``, with
16-bit or 8-bit weights and SwiGLU or not; the attention kernels of ``attention``) at each
activation dtype and tiling, this reports what the cubin holds: registers a thread, shared
memory and local memory (spills) a program, and how many programs an SM holds at once by those
(Hopper: 64 Ki registers, 228 KiB of shared memory, 2048 threads and 32 programs an SM). It is
not a timing: it says which tilings compile, which spill, and how full an SM can be, so that
the GPU's sweep (``benchmarks/gemv.py``) is spent on the tilings that can win.

    python benchmarks/triton_resources.py --json benchmarks/results/issue22/resources.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH comes first

from autotune.streaming import attention, gemv  # noqa: E402

TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int8": "i8",
         "fp8": "fp8e4nv"}
HOPPER = {"registers": 65536, "shared": 228 * 1024, "threads": 2048, "programs": 32}


UNALIGNED = ("m", "kv_heads", "splits")  # a batch's rows, KV heads, splits: any number


def compile_kernel(fn: Any, types: dict[str, str], constexprs: dict[str, Any], arch: int,
                   num_warps: int = 4, num_stages: int = 3) -> Any:
    """``fn`` (a ``triton.jit`` function) compiled for ``sm_<arch>``: every argument not in
    ``constexprs`` typed by ``types`` (Triton's names: ``*fp16``, ``i32``, ``fp32``).

    Pointers and integers other than ``UNALIGNED`` are declared multiples of 16, as Triton's
    launcher finds them at run time (torch's allocations, llama's dimensions and strides):
    without that, no load can be proven 16-byte aligned, and Triton neither vectorizes them
    nor pipelines them through shared memory (an unaligned compile of its own matmul
    tutorial shows one buffer, where the GPU's has ``num_stages``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {a: "constexpr" if a in constexprs else types[a] for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if a not in constexprs and a not in UNALIGNED
               and (types[a].startswith("*") or types[a].startswith("i"))}
    source = ASTSource(fn, signature, attrs=aligned,
                       constexprs={(fn.arg_names.index(a),): v for a, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resources(compiled: Any, num_warps: int) -> dict[str, int]:
    """Registers a thread, shared and local (spilled) bytes a program, the programs an SM
    holds at once (Hopper's limits), from the cubin; and how many loads Triton's pipeliner
    copies ahead asynchronously (0: each loop iteration waits for its own loads)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    usage = {k.lower(): int(v) for k, v in re.findall(r"(REG|SHARED|LOCAL):(\d+)", text)}
    shared = max(usage["shared"], compiled.metadata.shared)  # dynamic shared: Triton's own
    threads = 32 * num_warps
    per_sm = min(HOPPER["registers"] // max(1, usage["reg"] * threads),
                 HOPPER["shared"] // shared if shared else HOPPER["programs"],
                 HOPPER["threads"] // threads, HOPPER["programs"])
    return {"registers": usage["reg"], "shared_bytes": shared, "local_bytes": usage["local"],
            "programs_per_sm": per_sm,  # and the loads copied ahead into shared memory:
            "async_copies": compiled.asm["ttgir"].count("ttg.async_copy_global_to_local")}


def gemv_cases(dtype: str, weights: str, tiling: tuple[int, int, int, int]
               ) -> list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]]:
    """The GEMV kernels at one activation dtype, weight storage (``dtype``, int8, fp8) and
    tiling (block_n, block_k, warps, stages): (name, kernel, types, constexprs, warps,
    stages)."""
    block_n, block_k, warps, stages = tiling
    act, w = "*" + TYPES[dtype], "*" + TYPES[weights]
    scaled = weights in ("int8", "fp8")
    common = {"ROWS": gemv.MAX_ROWS, "BLOCK_N": block_n, "BLOCK_K": block_k,
              "PRECISION": "ieee" if dtype == "float32" else "tf32", "SCALED": scaled}
    ints = dict.fromkeys(("m", "n", "k", "x_sm", "y_sm", "w_sn", "out_sm", "up_offset"), "i32")
    add = {"x_ptr": act, "y_ptr": act, "w_ptr": w, "scale_ptr": act, **ints}
    norm = {"x_ptr": act, "g_ptr": act, "w_ptr": w, "scale_ptr": act, "out_ptr": act,
            "eps": "fp32", **ints}
    return [("add_linear", gemv._kernel(), add, common, warps, stages),
            ("norm_linear", gemv._norm_kernel(), norm, {**common, "SWIGLU": False}, warps,
             stages),
            ("norm_swiglu", gemv._norm_kernel(), norm, {**common, "SWIGLU": True}, warps,
             stages)]


def attention_cases(dtype: str, group: int, splits: int, head_dim: int = 128
                    ) -> list[tuple[str, Any, dict[str, str], dict[str, Any], int, int]]:
    """The attention kernels for ``group`` query heads a KV head (1: llama2-7b, 4: llama3-8b)
    and ``splits`` programs a (sequence, KV head) (the combine kernel where more than one)."""
    act = "*" + TYPES[dtype]
    strides = dict.fromkeys(("qkv_sb", "q_sb", "q_sh", "k_sb", "k_sh", "k_sl", "v_sb", "v_sh",
                             "v_sl", "o_sb", "o_sh", "heads", "kv_heads", "splits"), "i32")
    pointers = dict.fromkeys(("qkv_ptr", "q_ptr", "k_ptr", "v_ptr", "o_ptr", "cos_ptr",
                              "sin_ptr"), act)
    types = {**pointers, **strides, "part_ptr": "*fp32", "pos_ptr": "*i64", "scale": "fp32"}
    shape = {"GROUP": group, "GROUP_PAD": max(16, 1 << (group - 1).bit_length()),
             "HEAD_DIM": head_dim}
    precision = "ieee" if dtype == "float32" else "tf32"
    rope, combine = attention._rope_kernels()
    cases = [("decode_attention", attention._kernel(), types,
              {**shape, "BLOCK": attention.BLOCK_N, "PRECISION": precision}, 4, 3),
             ("rope_attention", rope, types,
              {**shape, "BLOCK": attention.BLOCK_N, "SPLIT": splits > 1,
               "PRECISION": precision}, 4, 3)]
    if splits > 1:
        cases.append(("combine", combine, types, shape, 4, 3))
    return cases


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="sm_<arch> (90: H100, H200)")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--block-n", default="16,32,64")
    p.add_argument("--block-k", default="64,128,256")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="3,4")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said
    rows: list[dict[str, Any]] = []

    def run(case: tuple, **labels: Any) -> None:
        name, fn, types, constexprs, warps, stages = case
        row = {"kernel": name, **labels, "warps": warps, "stages": stages}
        try:
            row.update(resources(compile_kernel(fn, types, constexprs, args.arch, warps,
                                                stages), warps))
        except Exception as e:  # a case the compiler refuses is a row, not the end
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        said = (f"regs {row['registers']:3d}, shared {row['shared_bytes']:6d} B, local "
                f"{row['local_bytes']:4d} B, {row['programs_per_sm']:2d} programs/SM, "
                f"{row['async_copies']} async copies"
                if "error" not in row else row["error"])
        print(f"{name:>16} {labels}: {said}", flush=True)

    tilings = list(itertools.product(_ints(args.block_n), _ints(args.block_k),
                                     _ints(args.warps), _ints(args.stages)))
    for dtype in args.dtypes.split(","):
        for weights in (dtype, "int8", "fp8"):
            for tiling in tilings:
                for case in gemv_cases(dtype, weights, tiling):
                    run(case, dtype=dtype, weights=weights, block_n=tiling[0],
                        block_k=tiling[1])
        for group, splits in ((1, 1), (1, 5), (4, 1), (4, 16)):
            for case in attention_cases(dtype, group, splits):
                run(case, dtype=dtype, group=group, splits=splits)
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "command": " ".join(sys.argv),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
