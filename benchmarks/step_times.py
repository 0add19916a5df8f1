"""Are the native engine's decode steps alike over a whole generation? (issue 5's shortcut)

The shortcut times the first ``--decode-steps`` steps of a generation and extrapolates. This
script runs whole generations and reads the clock (after synchronizing) every ``--segment``
steps, so a drift along the generation (position-dependent work, a link or clock that slows
under sustained load) shows as segments that differ. Configurations: at the ``--limit``, the
largest batch streaming everything (``--runs`` generations back to back) and batch 1 with every
weight resident, without a limit.

    python benchmarks/step_times.py [--osl 256] [--segment 32] [--runs 2]
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

from limited import add_workload_args, largest, load_limited  # noqa: E402

from autotune.measure.timing import random_prompt  # noqa: E402


def segments(engine: Any, batch: int, isl: int, osl: int, segment: int) -> dict[str, Any]:
    """Milliseconds per step of each segment of one generation (after a short warm-up)."""
    prompt = random_prompt(batch, isl, engine.spec.vocab_size, 0, "cuda")
    engine.decode(engine.prefill(prompt, osl), 2)  # warm-up: captures the graph
    engine.synchronize()
    start = time.perf_counter()
    gen = engine.prefill(prompt, osl)
    engine.synchronize()
    clock, done, out = time.perf_counter(), 0, []
    prefill_ms = (clock - start) * 1e3
    while done < osl - 1:
        n = min(segment, osl - 1 - done)
        engine.decode(gen, n)
        engine.synchronize()
        now = time.perf_counter()
        out.append((now - clock) * 1e3 / n)
        clock, done = now, done + n
    return {"batch": batch, "budget": engine.device_budget, "prefill_ms": prefill_ms,
            "ms_per_step": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--segment", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    isl, osl = args.isl, args.osl
    engine, _, fits = load_limited(args)
    batch = largest(lambda b: fits(b, 0), 1, 256)
    engine.device_budget = 0
    rows = [segments(engine, batch, isl, osl, args.segment) for _ in range(args.runs)]
    torch.cuda.set_per_process_memory_fraction(1.0)
    engine.device_budget = engine.total_device_budget
    rows.append(segments(engine, 1, isl, osl, args.segment))
    engine.close()
    for r in rows:
        steps = r["ms_per_step"]
        print(f"b={r['batch']:>3} budget={r['budget'] / 1e9:5.2f}GB prefill {r['prefill_ms']:7.1f} "
              f"ms; ms/step per {args.segment}-step segment: "
              f"{' '.join(f'{x:.2f}' for x in steps)}; last/first {steps[-1] / steps[0]:.4f}",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
