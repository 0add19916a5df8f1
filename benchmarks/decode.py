"""Issue 14: decoding speed, older and newer layouts of the native engine side by side, one run.

Each variant is a set of engine options; every variant of a part is measured in the same
process, in turn for each batch, so that their figures compare (across runs they drift).

``resident`` (``--model``, default llama2-7b): nothing streamed, batches ``--batches``
(1, 8, 32); variants ``unfused`` (``fused=false``: one GEMM per matrix), ``fused``,
``compiled`` (``compile=true``: TorchInductor kernels in the decode step, issue 22) and
``autotuned`` (``compile=max-autotune``: its GEMMs too, the fastest it benchmarks), and the
Triton kernels' (``triton``, ``compiled-triton``: ``attention=triton``; ``-gemv``: with
``gemv=triton``; ``-gemv-all``: ``gemv=triton-all``; ``compiled-triton-rope``: ``compile=true``
with ``attention=triton-rope``; ``compiled-triton-halves``: gate-up as two cuBLAS GEMMs,
``gemv=cublas-halves``; ``all-triton``, ``compiled-all-triton``:
``attention=triton-rope`` and ``gemv=triton-all``, without and with ``compile``), and
``default``: the engine's defaults (since issue 22, ``compile=true attention=triton`` on a GPU
where it runs, with ``--quantization none``); every other variant is a difference from ``fused``, the
step before issue 22 (``compile=false attention=sdpa``). Reports
tok/s, ms per output token and the fraction of the HBM bound (every weight byte a step reads,
read once, at B_hbm measured by a device-to-device copy in the same run; the embedding table is
not counted, a step reads only its tokens' rows: issue 14's 3.23 ms counted it, 2% more for
llama2-7b), and the kernels of one
eager decode step (``torch.profiler``): the launch count bounds batch-1 speed once the weights
are read at full bandwidth; with ``--graph-profile``, of 8 replays of the decode graph too,
the device time a step and its share of the span the kernels cover (``graph``: the gaps
between kernels are the rest).

``streaming`` (``--stream-model``, default llama3-8b, at ``--memory-limit``, default 12GiB):
everything streamed (budget 0), at the largest batch whose memory plan fits the limit; variants
``embed-head-resident`` (``stream_embed_head=false``: the older layout, 2.1 GB of Llama 3
resident outside the budget), ``embed-head-in-budget``, ``in-budget-compiled`` and
``in-budget-default`` (issue 22: streaming must not lose). Reports tok/s and the fraction of the link's bound (streamed bytes per step /
pinned H2D bandwidth measured in the same run).

``--variants`` keeps some of them (names from either part). Each row's ``wall_s`` is its
whole measurement, warm-up included: at a variant's first batch, ``compiled`` compiles there.

Both report each variant's ratio to the first. Timed through :func:`autotune.measure.timing.measure`
(warm-up never counted, the device synchronized before every clock read); on a GPU, prefill +
``--decode-steps`` decode steps per run, the rest extrapolated (within 3% on the H100,
``benchmarks/shortcut.py``). On CPU (``--device cpu``, with ``tiny-llama``) it is a smoke check
of the same code: its figures mean nothing.

    python benchmarks/decode.py --json benchmarks/results/issue14/decode.json
    python benchmarks/decode.py --device cpu --model tiny-llama --stream-model tiny-llama \\
        --memory-limit 320MiB --isl 16 --osl 8 --batches 1,4 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH comes first

from autotune.engines import EngineConfig, load_engine  # noqa: E402
from autotune.jsonfile import write_atomic  # noqa: E402
from autotune.measure.timing import measure, measure_h2d_bandwidth, random_prompt  # noqa: E402
from autotune.measure.worker import plan_configs  # noqa: E402
from autotune.units import parse_bytes  # noqa: E402

# Every variant is a difference from the decode step before issue 22 (eager, SDPA over the
# whole static cache), whatever the engine's default; ``default`` is the engine's own (on a
# GPU where Triton runs, with --quantization none, compile=true attention=triton: native.faster_step).
TODAYS_STEP = {"compile": False, "attention": "sdpa"}
DEFAULT = {"compile": "auto", "attention": "auto"}
TRITON = {"attention": "triton"}
ALL_TRITON = {"compile": True, "attention": "triton-rope", "gemv": "triton-all"}
RESIDENT = {"unfused": {"fused": False}, "fused": {}, "compiled": {"compile": True},
            "autotuned": {"compile": "max-autotune"}, "triton": TRITON,
            "compiled-triton": {"compile": True, **TRITON},
            "compiled-triton-gemv": {"compile": True, **TRITON, "gemv": "triton"},
            "compiled-triton-rope": {"compile": True, "attention": "triton-rope"},
            "compiled-triton-rope-gemv": {"compile": True, "attention": "triton-rope",
                                          "gemv": "triton"},
            "compiled-triton-halves": {"compile": True, **TRITON, "gemv": "cublas-halves"},
            "compiled-triton-gemv-all": {"compile": True, **TRITON, "gemv": "triton-all"},
            "all-triton": {k: v for k, v in ALL_TRITON.items() if k != "compile"},
            "compiled-all-triton": ALL_TRITON, "default": DEFAULT}
STREAMING = {"embed-head-resident": {"stream_embed_head": False}, "embed-head-in-budget": {},
             "in-budget-compiled": {"compile": True},
             "in-budget-compiled-triton": {"compile": True, **TRITON},
             "in-budget-compiled-all-triton": ALL_TRITON, "in-budget-default": DEFAULT}


def memory_gb_s(device: str) -> float:
    """Device memory bandwidth (GB/s, read + write) of a 1 GiB copy (256 MiB on CPU)."""
    n = 2**30 if device != "cpu" else 2**28
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)  # first touch, not counted
    times = []
    for _ in range(5):
        if device == "cpu":
            start = time.perf_counter()
            b.copy_(a)
            times.append(time.perf_counter() - start)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()  # the copy is async: wait for it before reading the events
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n / statistics.median(times) / 1e9


def eager_step_kernels(engine: Any, batch: int, isl: int, osl: int) -> tuple[Counter, Counter]:
    """Per kernel name: its count and total device microseconds in one eager decode step."""
    from torch.profiler import ProfilerActivity, profile

    st = engine._static_for(batch, isl + osl)
    engine.prefill(random_prompt(batch, isl, engine.spec.vocab_size, 2, "cuda"), osl)
    engine.synchronize()
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


def graph_step_profile(engine: Any, batch: int, isl: int, osl: int,
                       steps: int = 8) -> dict[str, Any]:
    """What the device does during ``steps`` replays of the decode graph (issue 22: profile
    first): kernels and copies a step, their device time a step, and that time as a share of
    the span from the first one's start to the last one's end (the rest: gaps between
    kernels, which bound batch-1 speed once the weights are read at full bandwidth)."""
    from torch.profiler import ProfilerActivity, profile

    steps = min(steps, osl - 3)
    gen = engine.prefill(random_prompt(batch, isl, engine.spec.vocab_size, 3,
                                       engine.config.device), osl)
    engine.decode(gen, 2)  # the warm-up step, then the capture and its first replay
    engine.synchronize()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.decode(gen, steps)
        engine.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    if not events:  # this profiler sees no kernel inside a graph
        return {"kernels_per_step": 0}
    span_us = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    busy_us = sum(e.device_time for e in events)
    times: Counter = Counter()
    counts: Counter = Counter()
    for e in events:
        times[e.name] += e.device_time / steps
        counts[e.name] += 1 / steps
    return {"kernels_per_step": len(events) / steps, "device_ms_per_step": busy_us / steps / 1e3,
            "span_ms_per_step": span_us / steps / 1e3, "busy_fraction": busy_us / span_us,
            "costliest": [(k, counts[k], us) for k, us in times.most_common(10)]}


def kv_bytes_per_step(engine: Any, batch: int, isl: int, osl: int) -> float:
    """Keys and values a decode step must read: the filled positions' (pos + 1 at position
    pos), averaged over the osl - 1 steps of a generation (positions isl .. isl + osl - 2)."""
    spec = engine.spec
    per_position = (2 * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim
                    * torch.finfo(getattr(torch, engine.config.dtype)).bits // 8)
    return batch * per_position * (isl + osl / 2)


def _config(args: argparse.Namespace, model: str, options: dict[str, Any],
            limit: int | None = None) -> EngineConfig:
    return EngineConfig(model=model, dtype=args.dtype, device=args.device,
                        max_seq_len=args.isl + args.osl, gpu_memory_limit=limit,
                        quantization=(args.quantization,),
                        options=tuple({**TODAYS_STEP, **options}.items()))


def _measure(engine: Any, batch: int, args: argparse.Namespace) -> tuple[Any, float]:
    """The measurement, and its wall time (warm-up, and any compile in it, included)."""
    t0 = time.perf_counter()
    m = measure(engine, batch, args.isl, args.osl, repeats=args.repeats, warmup=1,
                decode_steps=args.decode_steps)
    return m, time.perf_counter() - t0


def _variants(table: dict[str, dict[str, Any]], args: argparse.Namespace
              ) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in table.items() if not args.variants or k in args.variants}


def _add(group: list[dict[str, Any]], variant: str, m: Any, **extra: Any) -> dict[str, Any]:
    """Appends one variant's figures to ``group``; its ratio is to the group's first."""
    row = {"variant": variant, "batch": m.batch, "tok_s": m.throughput_tok_s,
           "tpot_ms": m.tpot_s * 1e3, "ttft_ms": m.ttft_s * 1e3,
           "e2e_samples_s": m.e2e_samples_s, "estimated": m.estimated,
           "decode_steps_timed": m.decode_steps_timed,
           "streamed_bytes_per_step": m.streamed_bytes_per_step,
           "peak_reserved_bytes": m.peak_reserved_bytes, "tokens_sha256": m.tokens_sha256,
           **extra}
    row["ratio"] = m.throughput_tok_s / (group[0]["tok_s"] if group else m.throughput_tok_s)
    group.append(row)
    return row


def resident(args: argparse.Namespace) -> dict[str, Any]:
    """Nothing streamed: every variant loaded at once, measured in turn at each batch."""
    bw = memory_gb_s(args.device)
    engines = {}
    for name, options in _variants(RESIDENT, args).items():
        engines[name] = load_engine(_config(args, args.model, options))
        engines[name].device_budget = engines[name].total_device_budget
    first = next(iter(engines.values()))
    store = first._store  # bytes a step reads: all weights but the embedding table
    weights = first.total_device_budget + store.fixed_nbytes - store.sizes[store.embed.index]
    out: dict[str, Any] = {"model": args.model, "quantization": args.quantization,
                           "memory_gb_s": bw, "weight_bytes": weights,
                           "rows": []}
    print(f"[resident] {args.model} ({args.quantization}): B_mem {bw:.0f} GB/s; weights {weights / 1e9:.2f} GB; "
          f"step bound {weights / bw / 1e6:.3f} ms", flush=True)
    for batch in args.batches:
        group: list[dict[str, Any]] = []
        for name, engine in engines.items():
            m, wall = _measure(engine, batch, args)
            kv = kv_bytes_per_step(engine, batch, args.isl, args.osl)
            row = _add(group, name, m, bound_fraction=weights / (bw * 1e9) / m.tpot_s,
                       kv_bytes_per_step=kv,
                       kv_bound_fraction=(weights + kv) / (bw * 1e9) / m.tpot_s, wall_s=wall)
            if args.shortcut_check and not m.estimated:  # the trials' shortcut, same engine
                short = measure(engine, batch, args.isl, args.osl, repeats=args.repeats,
                                warmup=0, decode_steps=args.shortcut_check)
                row["shortcut"] = {"decode_steps": short.decode_steps_timed,
                                   "estimated": short.estimated, "tpot_ms": short.tpot_s * 1e3,
                                   "error": short.tpot_s / m.tpot_s - 1}
                row["shortcut"]["said"] = (
                    f"      shortcut ({short.decode_steps_timed} steps"
                    f"{'' if short.estimated else ', not taken'}): {short.tpot_s * 1e3:.3f} "
                    f"ms/token, {row['shortcut']['error']:+.2%} against every step timed")
            if args.device != "cpu":
                kernels, times = eager_step_kernels(engine, batch, args.isl, args.osl)
                row["kernels_per_step"] = sum(kernels.values())
                row["costliest"] = [(k, kernels[k], us) for k, us in times.most_common(8)]
            if args.graph_profile and args.device != "cpu":
                try:  # a figure beside the timed ones: its failure costs only itself
                    row["graph"] = graph_step_profile(engine, batch, args.isl, args.osl)
                except Exception as e:
                    row["graph"] = {"error": f"{type(e).__name__}: {e}"}
            args.save("resident", {**out, "rows": out["rows"] + group})
            print(f"  batch {batch:3d} {name:>10}: {m.throughput_tok_s:9.1f} tok/s "
                  f"(x{row['ratio']:.3f}), {m.tpot_s * 1e3:.3f} ms/token = "
                  f"{row['bound_fraction']:.1%} of the HBM bound "
                  f"({row['kv_bound_fraction']:.1%} with the filled KV), kernels/step "
                  f"{row.get('kernels_per_step', 'n/a (CPU)')}", flush=True)
            if "shortcut" in row:
                print(row["shortcut"].pop("said"), flush=True)
            graph = row.get("graph", {})
            if "busy_fraction" in graph:
                print(f"      graph replay: {graph['kernels_per_step']:.0f} kernels and copies "
                      f"a step, {graph['device_ms_per_step']:.3f} ms of device time in "
                      f"{graph['span_ms_per_step']:.3f} ms ({graph['busy_fraction']:.0%} busy)",
                      flush=True)
                for kernel, count, us in graph["costliest"]:
                    print(f"        {us:8.1f} us {count:5.1f}x {kernel[:90]}", flush=True)
            elif graph:
                print(f"      graph replay: {graph}", flush=True)
        out["rows"] += group
    for engine in engines.values():
        engine.close()
    return out


def largest_batch(engine: Any, args: argparse.Namespace) -> int:
    """The largest batch (up to --max-batch) whose memory plan at budget 0 fits the limit."""
    batches = list(range(1, args.max_batch + 1))
    reply = plan_configs(engine, [(b, 0) for b in batches], args.isl, args.osl)
    available = reply["available"]
    fits = [b for b, total in zip(batches, reply["totals"], strict=True)
            if available is None or total <= available]
    if not fits:
        raise SystemExit(f"--memory-limit {args.memory_limit}: not even batch 1 fits")
    return fits[-1]


def streaming(args: argparse.Namespace) -> dict[str, Any]:
    """Everything streamed at the largest batch that fits: one variant loaded at a time (two
    would not fit the limit together)."""
    limit = parse_bytes(args.memory_limit)
    link = measure_h2d_bandwidth(args.device) if args.device != "cpu" else None
    out: dict[str, Any] = {"model": args.stream_model, "memory_limit": limit,
                           "h2d_gb_s": link, "rows": []}
    print(f"[streaming] {args.stream_model} at {args.memory_limit}, budget 0: H2D "
          f"{link or float('nan'):.1f} GB/s", flush=True)
    for name, options in _variants(STREAMING, args).items():
        engine = load_engine(_config(args, args.stream_model, options, limit))
        engine.device_budget = 0
        batch, oom_at = largest_batch(engine, args), []
        while True:
            try:
                m, wall = _measure(engine, batch, args)
                break
            except torch.OutOfMemoryError:  # the plan was short: record it, go 5% lower
                if len(oom_at) == 3:
                    raise
                oom_at.append(batch)
                engine.device_budget = 0  # frees the cache and graphs of the failed batch
                batch = max(1, batch * 95 // 100)
        row = _add(out["rows"], name, m, wall_s=wall, planned_batch=(oom_at or [batch])[0],
                   oom_at=oom_at, total_device_budget=engine.total_device_budget,
                   describe=engine.describe())
        if link:
            row["link_fraction"] = m.streamed_bytes_per_step / (link * 1e9) / m.tpot_s
        args.save("streaming", out)
        print(f"  {name:>21}: batch {batch}, {m.throughput_tok_s:9.1f} tok/s "
              f"(x{row['ratio']:.3f}), {m.tpot_s * 1e3:.2f} ms/token, streamed "
              f"{m.streamed_bytes_per_step / 1e9:.2f} GB/step = "
              f"{row.get('link_fraction', float('nan')):.1%} of the link's bound", flush=True)
        engine.close()
        del engine
        if args.device != "cpu":
            torch.cuda.set_per_process_memory_fraction(1.0)  # the next load sets its own cap
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="resident,streaming")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--quantization", default="none", choices=("none", "int8", "fp8"),
                   help="weights stored 8-bit (the bound counts the bytes stored)")
    p.add_argument("--model", default="llama2-7b", help="the resident part's model")
    p.add_argument("--batches", default="1,8,32", help="the resident part's batches")
    p.add_argument("--stream-model", default="llama3-8b", help="the streaming part's model")
    p.add_argument("--memory-limit", default="12GiB", help="the streaming part's limit")
    p.add_argument("--max-batch", type=int, default=1024)
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--shortcut-check", type=int, default=0, metavar="STEPS",
                   help="the resident part also measures each row as a trial does, timing "
                        "STEPS decode steps (a window at the middle where steps grow), and "
                        "gives its error against the row's full measurement")
    p.add_argument("--graph-profile", action="store_true",
                   help="the resident part also profiles replays of the decode graph (opt-in: "
                        "profiling CUDA graphs has hung or crashed some torch/CUDA versions)")
    p.add_argument("--variants", default="",
                   help="comma-separated variants to keep (default: every one of each part)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(RESIDENT) - set(STREAMING)
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(sorted(unknown))}; expected some of "
                         f"{', '.join(dict.fromkeys([*RESIDENT, *STREAMING]))}")
    parts = {"resident": resident, "streaming": streaming}
    out: dict[str, Any] = {"command": " ".join(sys.argv), "torch": torch.__version__,
                           "device": (torch.cuda.get_device_name() if args.device != "cpu"
                                      else "cpu")}
    def save(part: str, figures: dict[str, Any]) -> None:
        """Writes what is measured so far, after every row: a run cut by a time limit (a
        gpu.sh step's) keeps its rows."""
        out[part] = figures
        if args.json:  # whole or not at all: a kill mid-write leaves the last whole one
            write_atomic(out, args.json, indent=1)

    args.save = save
    for part in args.parts.split(","):
        if part not in parts:
            raise SystemExit(f"--parts: expected resident and/or streaming; got {part!r}")
        save(part, parts[part](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
