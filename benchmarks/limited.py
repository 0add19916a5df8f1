"""What the GPU benchmarks share: the workload flags, the native engine under a memory limit,
and the memory plan's verdict on what fits there (the study's own test: plan <= limit - the
worker's margin). Imported by the scripts beside it (their folder is on ``sys.path``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from autotune.engines import EngineConfig, load_engine
from autotune.engines.memory import DEFAULT_MARGIN
from autotune.units import parse_bytes


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=256)
    p.add_argument("--limit", default="8GiB")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the native engine (repeatable)")


def load_limited(args: argparse.Namespace) -> tuple[Any, int, Callable[[int, int], bool]]:
    """The native engine (fp16, CUDA) under ``--limit``; the limit in bytes; and
    ``fits(batch, budget)`` by its memory plan."""
    limit = parse_bytes(args.limit, what="--limit")
    isl, osl = args.isl, args.osl
    options = tuple(tuple(o.split("=", 1)) for o in args.engine_option)
    engine = load_engine(EngineConfig(model=args.model, dtype="float16", device="cuda",
                                      max_seq_len=isl + osl, gpu_memory_limit=limit,
                                      options=options))
    room = limit - DEFAULT_MARGIN

    def fits(batch: int, budget: int) -> bool:
        return engine.memory_plan(batch, isl, osl, budget).total <= room

    return engine, limit, fits


def largest(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest x in [lo, hi] with fits(x) (fits monotone decreasing); lo - 1 if none."""
    if not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo
