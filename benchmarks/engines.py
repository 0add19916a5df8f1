"""Issue 12: the native and the tensorrt engine side by side, in one run, at the same points.

For a memory limit (default 8 GiB, llama2-7b, isl 128, osl 256) it finds B_fit, the largest
budget with which batch 1 fits by the tensorrt engine's own (NVML-calibrated) memory plan, then
measures each engine at budgets 0/25/50/75/100% of B_fit x batch 1, 16 and the largest that
fits (by each engine's plan at that budget). Every figure comes with its bound: a decode step
cannot take less than max(streamed bytes / the pinned link, resident weights / HBM), both
bandwidths measured at the start of the run, so ``bound`` = measured TPOT bound / measured TPOT.
A point an engine's plan says will not fit is reported as such, not run.

    python benchmarks/engines.py [--model llama2-7b] [--limit 8GiB] [--json OUT.json]

The tensorrt engine needs Torch-TensorRT (the TensorRT-RTX build serves, see docs/tensorrt.md);
its module comes from the on-disk cache when an earlier run compiled it (``compile_s`` 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH comes first

from autotune.engines import EngineConfig, load_engine  # noqa: E402
from autotune.engines.memory import DEFAULT_MARGIN, trt_max_batch  # noqa: E402
from autotune.measure.timing import measure, measure_h2d_bandwidth  # noqa: E402
from autotune.models import get_spec  # noqa: E402
from autotune.units import parse_bytes  # noqa: E402
from benchmarks.decode import memory_gb_s  # noqa: E402

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def largest_batch(engine: Any, budget: int, isl: int, osl: int, limit: int, top: int) -> int:
    """The largest batch up to ``top`` whose plan fits ``limit`` (0: none)."""
    fits = [b for b in range(1, top + 1)
            if engine.memory_plan(b, isl, osl, budget).total <= limit - DEFAULT_MARGIN]
    return max(fits, default=0)


def run_engine(name: str, args: argparse.Namespace, limit: int, budgets: list[int] | None,
               h2d: float, hbm: float) -> tuple[list[dict[str, Any]], dict[str, Any], list[int]]:
    t0 = time.perf_counter()
    config = EngineConfig(model=args.model, engine=name, dtype="float16", device="cuda",
                          max_batch=args.max_batch, max_seq_len=args.isl + args.osl,
                          max_prompt_len=args.isl, gpu_memory_limit=limit)
    engine = load_engine(config)
    load_s = time.perf_counter() - t0
    total = engine.total_device_budget
    weights = engine.spec.weight_bytes("float16")
    if budgets is None:  # B_fit from this (the tensorrt) engine's plan at batch 1
        fit = max((b for b in range(0, total + 1, max(1, total // 1000))
                   if engine.memory_plan(1, args.isl, args.osl, b).total
                   <= limit - DEFAULT_MARGIN), default=0)
        budgets = [int(f * fit) for f in FRACTIONS]
    rows = []
    for budget in budgets:
        engine.device_budget = budget
        applied = engine.device_budget
        top = largest_batch(engine, applied, args.isl, args.osl, limit, args.max_batch)
        for batch in sorted({1, 16, top} - {0}):
            plan = engine.memory_plan(batch, args.isl, args.osl, applied).total
            row: dict[str, Any] = {"engine": name, "budget": applied,
                                   "budget_fraction_of_total": round(applied / total, 4),
                                   "batch": batch, "planned_gib": round(plan / 2**30, 3)}
            if plan > limit - DEFAULT_MARGIN:
                row["status"] = "does not fit"
            else:
                m = measure(engine, batch, args.isl, args.osl, repeats=args.repeats, warmup=1,
                            decode_steps=args.decode_steps)
                # What the engine itself moves a step (the native engine gathers embedding
                # rows from the host instead of copying the table: not total - budget).
                streamed = m.streamed_bytes_per_step
                bound_s = max(streamed / (h2d * 1e9), (weights - streamed) / (hbm * 1e9))
                row.update(status="ok", tok_s=round(m.throughput_tok_s, 2),
                           tpot_ms=round(m.tpot_s * 1e3, 3), ttft_ms=round(m.ttft_s * 1e3, 2),
                           bound=round(bound_s / m.tpot_s, 4),
                           stream_gb_s=round(m.stream_gb_s, 2),
                           nvml_gib=round((m.nvml_used_bytes or 0) / 2**30, 3),
                           peak_gib=round((m.peak_device_bytes or 0) / 2**30, 3),
                           over_limit=(m.peak_device_bytes or 0) > limit,
                           estimated=m.estimated)
            rows.append(row)
            print(json.dumps(row), flush=True)
    facts = {k: v for k, v in engine.describe().items()
             if k in ("versions", "compile_s", "cache_hit", "kv_cache", "built_for",
                      "memory_calibration", "budget_changes", "budget_change_s")}
    facts["load_s"] = round(load_s, 1)
    engine.close()
    del engine
    torch.cuda.empty_cache()
    return rows, facts, budgets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--limit", default="8GiB")
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=None,
                   help="default: as many sequences as their KV cache fits in --limit")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--engines", default="tensorrt,native")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    limit = parse_bytes(args.limit, what="--limit")
    if args.max_batch is None:
        args.max_batch = trt_max_batch(get_spec(args.model), "float16", args.isl + args.osl, limit)
    h2d, hbm = measure_h2d_bandwidth("cuda"), memory_gb_s("cuda")
    print(f"h2d {h2d:.1f} GB/s, hbm {hbm:.0f} GB/s", flush=True)
    out: dict[str, Any] = {"model": args.model, "limit": args.limit, "isl": args.isl,
                           "osl": args.osl, "h2d_gb_s": h2d, "hbm_gb_s": hbm,
                           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "rows": [], "engines": {}}
    budgets = None
    for name in args.engines.split(","):
        rows, facts, budgets = run_engine(name, args, limit, budgets, h2d, hbm)
        out["rows"] += rows
        out["engines"][name] = facts
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
