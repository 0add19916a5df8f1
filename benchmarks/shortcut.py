"""Issue 5: is the measurement shortcut within 3% of the full measurement?

A study's trial on the native engine times prefill + ``--decode-steps`` decode steps and
extrapolates the rest of the osl (every step replays the same graph over the whole static KV
cache, so every step costs the same). This script measures, in one process on the GPU, each
configuration both ways, one after the other on the same warm engine: the estimate (as a trial
does it: ``--repeats`` repeats of prefill + ``--decode-steps`` steps) and the full measurement
(every one of the osl - 1 steps), and prints throughput, TPOT and the estimate's error.

Configurations (llama2-7b fp16, isl 128, osl 256 by default): at the ``--limit`` (8 GiB), the
largest batch streaming everything, batch 16 at a quarter of the weights resident, batch 1 at
the largest budget that fits; then, without a limit, batch 1 and 16 with every weight resident.

    python benchmarks/shortcut.py [--osl 256] [--decode-steps 32] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH comes first

from limited import add_workload_args, largest, load_limited  # noqa: E402

from autotune.measure.timing import measure  # noqa: E402


def compare(engine: Any, label: str, batch: int, budget: int, args: Any) -> dict[str, Any]:
    engine.device_budget = budget
    isl, osl, k = args.isl, args.osl, args.decode_steps
    est = measure(engine, batch, isl, osl, repeats=args.repeats, warmup=1, decode_steps=k,
                  warmup_steps=k)
    full = measure(engine, batch, isl, osl, repeats=1, warmup=0)  # warm: the estimate ran
    error = est.throughput_tok_s / full.throughput_tok_s - 1
    row = {"label": label, "batch": batch, "budget": engine.device_budget,
           "budget_fraction": engine.device_budget / engine.total_device_budget,
           "estimate": est.as_dict(), "full": full.as_dict(), "error": error}
    print(f"{label:>22} b={batch:>3} budget={engine.device_budget / 1e9:5.2f}GB  "
          f"estimate {est.throughput_tok_s:8.2f} tok/s (tpot {est.tpot_s * 1e3:7.2f} ms, "
          f"{k} steps x{args.repeats})  full {full.throughput_tok_s:8.2f} tok/s "
          f"(tpot {full.tpot_s * 1e3:7.2f} ms, {osl - 1} steps)  error {100 * error:+.2f}%",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    engine, _, fits = load_limited(args)
    total = engine.total_device_budget
    rows = []
    top = largest(lambda b: fits(b, 0), 1, 256)
    rows.append(compare(engine, "stream all, max batch", top, 0, args))
    quarter = total // 4
    if fits(16, quarter):
        rows.append(compare(engine, "25% resident", 16, quarter, args))
    most = largest(lambda x: fits(1, x * 2**20), 0, total // 2**20) * 2**20
    rows.append(compare(engine, "batch 1, most resident", 1, most, args))
    torch.cuda.set_per_process_memory_fraction(1.0)
    for batch in (1, 16):
        rows.append(compare(engine, "all resident, no limit", batch, total, args))
    engine.close()
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {100 * worst:.2f}% over {len(rows)} configurations", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows,
                                               "gpu": torch.cuda.get_device_name(),
                                               "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
