"""Issue 21: 8-bit weights beside 16-bit, one model at one memory limit, in one process.

The native engine loads every precision asked for (``--precisions``, default none,int8,fp8;
fp8 is left out, with a note, where the GPU lacks it), then for each precision sweeps the budget
fractions ``--fractions`` (default 0, 0.2, 0.4, 0.6, 0.8): at each, the largest batch whose
memory plan fits the limit (the memory the study would give it: ``--limit`` and free memory,
minus the margin), measured as a study's trial is (:func:`autotune.measure.trial.run_trial`:
warm-up, prefill + ``--decode-steps`` timed decode steps, the rest of ``--osl`` extrapolated on
a GPU, where CUDA graphs make every step alike). Per precision it reports the best tok/s, its
configuration, its fraction of the link's bound (streamed bytes per step / pinned H2D bandwidth
measured in the same run, over its time per output token) and its speed over 16-bit's best;
and, once, each 8-bit precision's accuracy against 16-bit (:meth:`NativeEngine.accuracy`).
The tokens of one precision must be the same at every budget: where two fractions ran the same
batch, their ``tokens_sha256`` are compared (``tokens_identical_across_budgets``).

    python benchmarks/quantized.py --model llama2-7b --limit 8GiB --json out/quant-7b.json
    python benchmarks/quantized.py --device cpu --dtype float32 --model tiny-llama \\
        --limit 300MiB --isl 8 --osl 4 --max-batch 8 --fractions 0,0.5 --json /tmp/q.json

On CPU it is a smoke check of the same code: its figures mean nothing (no link to stream over).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH comes first

from autotune.engines import EngineConfig, load_engine  # noqa: E402
from autotune.engines.memory import DEFAULT_MARGIN  # noqa: E402
from autotune.errors import UserInputError  # noqa: E402
from autotune.measure.roofline import bound_attrs  # noqa: E402
from autotune.measure.trial import TrialRequest, available_bytes, run_trial  # noqa: E402
from autotune.precision import parse_precisions  # noqa: E402
from autotune.units import GiB, parse_bytes  # noqa: E402


def largest_batch(engine: Any, isl: int, osl: int, budget: int, precision: str,
                  most: int, available: int | None) -> int:
    """The largest batch (1..most) whose memory plan fits ``available`` (0: none)."""
    def fits(b: int) -> bool:
        return available is None or engine.memory_plan(b, isl, osl, budget,
                                                       precision=precision).total <= available

    if not fits(1):
        return 0
    lo, hi = 1, most
    while lo < hi:  # plans grow with the batch
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def supported(precisions: tuple[str, ...], device: str) -> tuple[tuple[str, ...], list[str]]:
    from autotune.streaming import quant

    keep, notes = [], []
    for p in precisions:
        try:
            quant.check_supported(p, device)
            keep.append(p)
        except UserInputError as e:
            notes.append(f"{p} left out: {e}")
    return tuple(keep), notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--limit", default="8GiB", help="GPU memory limit (--gpu-memory-limit)")
    ap.add_argument("--precisions", default="none,int8,fp8")
    ap.add_argument("--fractions", default="0,0.2,0.4,0.6,0.8",
                    help="budget fractions swept per precision (of its own streamable bytes)")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=256)
    ap.add_argument("--decode-steps", type=int, default=16,
                    help="timed decode steps per run on a GPU (the rest extrapolated)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--accuracy-steps", type=int, default=16,
                    help="tokens the accuracy check generates (0: no check)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    limit = parse_bytes(args.limit, what="--limit")
    precisions, notes = supported(parse_precisions(args.precisions), args.device)
    fractions = [float(f) for f in args.fractions.split(",")]
    cuda = args.device.startswith("cuda")
    h2d = hbm = None
    if cuda:
        from autotune.measure.timing import measure_h2d_bandwidth, measure_hbm_bandwidth

        h2d, hbm = measure_h2d_bandwidth(args.device), measure_hbm_bandwidth(args.device)
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                          max_batch=args.max_batch, max_seq_len=args.isl + args.osl,
                          max_prompt_len=args.isl, gpu_memory_limit=limit,
                          quantization=precisions)
    t0 = time.perf_counter()
    engine = load_engine(config)
    load_s = time.perf_counter() - t0
    print(f"{args.model}: loaded {', '.join(precisions)} in {load_s:.1f} s; streamable bytes "
          + ", ".join(f"{p} {v / 1e9:.2f} GB" for p, v in engine.total_device_budgets.items())
          + (f"; link {h2d:.1f} GB/s" if h2d else ""), flush=True)
    for note in notes:
        print(note, flush=True)
    bandwidths = {k: v for k, v in (("h2d_gb_s", h2d), ("hbm_gb_s", hbm)) if v}
    result: dict[str, Any] = {
        "model": args.model, "limit_bytes": limit, "isl": args.isl, "osl": args.osl,
        "dtype": args.dtype, "device": args.device, "decode_steps": args.decode_steps,
        "h2d_gb_s": h2d, "hbm_gb_s": hbm, "load_s": round(load_s, 1), "notes": notes,
        "total_device_budgets": engine.total_device_budgets, "rows": [], "best": {},
    }
    try:
        if args.accuracy_steps > 0 and any(p != "none" for p in precisions):
            t0 = time.perf_counter()
            result["accuracy"] = engine.accuracy(args.isl, args.osl, seed=0, batch=4,
                                                 steps=args.accuracy_steps)
            result["accuracy"]["seconds"] = round(time.perf_counter() - t0, 1)
        for p in precisions:
            engine.precision = p
            total = engine.total_device_budget
            for f in fractions:
                budget = int(round(f * total))
                available = available_bytes(engine, DEFAULT_MARGIN)
                batch = largest_batch(engine, args.isl, args.osl, budget, p, args.max_batch,
                                      available)
                row: dict[str, Any] = {"precision": p, "budget_fraction": f, "batch": batch}
                if batch == 0:
                    row["status"] = "nothing fits"
                    result["rows"].append(row)
                    print(f"{p:>5} {100 * f:3.0f}%: nothing fits", flush=True)
                    continue
                steps = args.decode_steps if cuda else None
                for _ in range(3):  # out of memory beyond the plan: 10% fewer sequences
                    outcome = run_trial(engine, TrialRequest(
                        batch=batch, budget=budget, isl=args.isl, osl=args.osl,
                        repeats=args.repeats, warmup=1, decode_steps=steps,
                        warmup_steps=steps, precision=p))
                    if outcome.status != "oom" or batch == 1:
                        break
                    print(f"{p:>5} {100 * f:3.0f}% batch {batch:4d}: out of memory "
                          "(the plan said it fits); 10% fewer", flush=True)
                    row.setdefault("oom_batches", []).append(batch)
                    batch = max(1, batch * 9 // 10)
                row["batch"] = batch
                row.update(status=outcome.status, reason=outcome.reason,
                           applied_budget=outcome.applied_budget,
                           predicted_peak_bytes=(outcome.plan or {}).get("total"))
                m = outcome.measurement
                if m:
                    row.update(throughput_tok_s=round(m["throughput_tok_s"], 2),
                               tpot_ms=round(1e3 * m["tpot_s"], 3),
                               ttft_ms=round(1e3 * m["ttft_s"], 2),
                               streamed_bytes_per_step=m["streamed_bytes_per_step"],
                               stream_gb_s=round(m["stream_gb_s"], 2),
                               peak_device_bytes=m.get("peak_device_bytes")
                               or m.get("peak_reserved_bytes"),
                               tokens_sha256=m["tokens_sha256"])
                    row.update(bound_attrs(m, outcome.plan, outcome.applied_budget, bandwidths))
                result["rows"].append(row)
                shown = (f"{row['throughput_tok_s']:8.1f} tok/s, TPOT {row['tpot_ms']:.1f} ms, "
                         f"{row['streamed_bytes_per_step'] / 1e9:.2f} GB/step"
                         + (f", {100 * row['bound_fraction']:.0f}% of its {row['bound_by']} "
                            f"bound" if row.get("bound_fraction") else "")
                         if m else f"{outcome.status}: {outcome.reason}")
                print(f"{p:>5} {100 * f:3.0f}% batch {batch:4d}: {shown}", flush=True)
                _write(args.json, result)  # as it goes: a step killed at its limit keeps rows
        result["tokens_identical_across_budgets"] = {}
        for p in precisions:
            ok = [r for r in result["rows"] if r["precision"] == p and r.get("throughput_tok_s")]
            result["best"][p] = max(ok, key=lambda r: r["throughput_tok_s"]) if ok else None
            # Where budgets ran the same batch, their tokens must be the same (None: no batch
            # ran at two budgets).
            by_batch: dict[int, set[str]] = {}
            for r in ok:
                by_batch.setdefault(r["batch"], set()).add(r["tokens_sha256"])
            shared = [h for b, h in by_batch.items()
                      if sum(r["batch"] == b for r in ok) > 1]
            same = all(len(h) == 1 for h in shared) if shared else None
            result["tokens_identical_across_budgets"][p] = same
            if same is False:
                print(f"{p}: TOKENS DIFFER between budgets at one batch", flush=True)
        base = result["best"].get("none")
        print(f"\n{args.model} at {limit / GiB:g} GiB, isl {args.isl}, osl {args.osl}: "
              "best per precision")
        for p, best in result["best"].items():
            if best is None:
                print(f"  {p:>5}: nothing ran")
                continue
            if base:
                best["speedup_vs_none"] = round(best["throughput_tok_s"]
                                                / base["throughput_tok_s"], 3)
            acc = ((result.get("accuracy") or {}).get("precisions") or {}).get(p) or {}
            print(f"  {p:>5}: {best['throughput_tok_s']:8.1f} tok/s (batch {best['batch']}, "
                  f"{100 * best['budget_fraction']:.0f}% resident)"
                  + (f", {100 * best['bound_fraction']:.1f}% of the {best['bound_by']} bound"
                     if best.get("bound_fraction") else "")
                  + (f", x{best['speedup_vs_none']:.2f} vs 16-bit" if base else "")
                  + (f", top-1 agreement {100 * acc['top1_agreement']:.1f}%, logits error "
                     f"{acc['logits_rel_error']:.3g}" if "top1_agreement" in acc else ""))
    finally:
        engine.close()
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.json is not None:
        _write(args.json, result)
        print(f"written to {args.json}")
    return 0


def _write(path: Path | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
