"""Issue 3, target 3: decoding speed with nothing streamed (budget = total, no memory limit).

Loads the native engine with every unit resident, measures greedy generation at batch 1
(``--batches``) through :func:`autotune.measure.measure` with CUDA graphs, and reports tok/s,
ms per output token and the fraction of the HBM bound (every weight byte read once per step,
at B_hbm measured by a device-to-device copy in the same run). Then it counts the kernels of one
eager decode step with ``torch.profiler`` and lists the costliest: the launch count is what
bounds batch-1 speed once the weights are read at full bandwidth.

    python benchmarks/decode.py [--osl 256] [--repeats 5] [--json OUT.json]

To compare two versions of the engine in one run, call it once per checkout with
``PYTHONPATH`` pointing at each (the figures of one run compare; across runs they drift).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH comes first

from autotune.engines import EngineConfig, load_engine  # noqa: E402
from autotune.measure import measure, random_prompt  # noqa: E402


def hbm_gb_s() -> float:
    n = 2**30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n / sorted(times)[2] / 1e9  # read + write


def eager_step_kernels(engine: Any, batch: int, isl: int, osl: int) -> tuple[Counter, Counter]:
    """Per kernel name: its count and its total device microseconds in one eager decode step."""
    st = engine._static_for(batch, isl + osl)
    gen = engine.prefill(random_prompt(batch, isl, engine.spec.vocab_size, 2, "cuda"), osl)
    del gen
    engine.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine._step(st, capturing=False)
        engine.synchronize()
    kernels: Counter = Counter()
    times: Counter = Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels[e.name] += 1
            times[e.name] += e.device_time
    return kernels, times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=256)
    p.add_argument("--batches", default="1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    bw = hbm_gb_s()
    config = EngineConfig(model=args.model, dtype="float16", device="cuda",
                          max_seq_len=args.isl + args.osl)
    engine = load_engine(config)
    engine.device_budget = engine.total_device_budget
    weights = engine.total_device_budget + engine._store.fixed_nbytes
    out: dict[str, Any] = {"hbm_gb_s": bw, "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name(), "rows": []}
    print(f"B_hbm {bw:.0f} GB/s; weights {weights / 1e9:.2f} GB; "
          f"step bound {weights / bw / 1e6:.2f} ms", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        m = measure(engine, batch, args.isl, args.osl, repeats=args.repeats, warmup=1)
        frac = weights / (bw * 1e9) / m.tpot_s
        kernels, times = eager_step_kernels(engine, batch, args.isl, args.osl)
        row = {"batch": batch, "tok_s": m.throughput_tok_s, "tpot_ms": m.tpot_s * 1e3,
               "ttft_ms": m.ttft_s * 1e3, "hbm_fraction": frac,
               "e2e_samples_s": m.e2e_samples_s, "kernels_per_step": sum(kernels.values()),
               "kernels": dict(kernels)}
        out["rows"].append(row)
        print(f"batch {batch}: {m.throughput_tok_s:.1f} tok/s, {m.tpot_s * 1e3:.3f} ms/token "
              f"({frac:.1%} of the HBM bound), ttft {m.ttft_s * 1e3:.1f} ms, "
              f"e2e samples {[round(x, 4) for x in m.e2e_samples_s]}", flush=True)
        print(f"  {sum(kernels.values())} kernels per eager decode step; costliest:")
        for name, us in times.most_common(8):
            print(f"  {kernels[name]:4d} x {us / kernels[name]:7.1f} us  {name[:90]}")
    engine.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
