"""Issue 22: a decode step's residual GEMMs, cuBLAS against the Triton kernel's tilings.

``x += y @ W.T`` for llama2-7b's output (4096 x 4096) and down (4096 x 11008) projections, at
``--rows`` rows (sequences): cuBLAS's in-place ``addmm_`` (today's path, split-K at batch 1)
against :func:`autotune.streaming.gemv.add_linear_` at each tiling of ``--block-n`` x
``--block-k`` x ``--warps`` x ``--stages``. Each variant is captured in a CUDA graph as in the
decode step, over ``--copies`` distinct weight matrices (more bytes than the L2 holds, so that
every call reads its weight from HBM), replayed ``--replays`` times between two CUDA events;
a call's time is the span over the calls. Reports microseconds a call and the weight read as a
fraction of the device-copy bandwidth measured in the same run, the best tiling per shape, and
its largest error against cuBLAS in float32.

    python benchmarks/gemv.py --json gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH comes first

from decode import memory_gb_s  # noqa: E402

from autotune.streaming import gemv  # noqa: E402

SHAPES = {"o": (4096, 4096), "down": (4096, 11008)}  # (N, K) of llama2-7b


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def time_call(call: Any, copies: list[torch.Tensor], replays: int) -> float:
    """Device seconds of one ``call(w)``, captured over every copy, replayed ``replays``
    times (after one replay that is not counted)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm: kernels built, cuBLAS's workspace set up
        for w in copies:
            call(w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in copies:
            call(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (replays * len(copies))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rows", default="1,8,16")
    p.add_argument("--block-n", default="16,32,64")
    p.add_argument("--block-k", default="64,128,256")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="3,4")
    p.add_argument("--copies", type=int, default=8, help="weight matrices a graph cycles over")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemv.py times CUDA graphs: it needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    bw = memory_gb_s("cuda")
    tilings = list(itertools.product(_ints(args.block_n), _ints(args.block_k),
                                     _ints(args.warps), _ints(args.stages)))
    out: dict[str, Any] = {"command": " ".join(sys.argv), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(), "memory_gb_s": bw,
                           "rows": []}
    print(f"B_mem {bw:.0f} GB/s; {len(tilings)} tilings", flush=True)
    gen = torch.Generator("cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        copies = [torch.randn(n, k, generator=gen, device="cuda", dtype=dtype) * 0.02
                  for _ in range(args.copies)]
        read_s = n * k * copies[0].element_size() / (bw * 1e9)  # the weight, once
        for m in _ints(args.rows):
            start = torch.randn(m, n, generator=gen, device="cuda", dtype=dtype)
            x = start.clone()  # the timed calls add into it, again and again
            y = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
            want = start.float() + y.float() @ copies[0].float().t()
            row: dict[str, Any] = {"shape": name, "n": n, "k": k, "m": m}
            row["cublas_us"] = time_call(lambda w, x=x, y=y: x.addmm_(y, w.t()), copies,
                                         args.replays) * 1e6
            row["cublas_bw_fraction"] = read_s / (row["cublas_us"] / 1e6)
            row["tilings"] = []
            for bn, bk, warps, stages in tilings:
                def call(w, bn=bn, bk=bk, warps=warps, stages=stages, x=x, y=y):
                    return gemv.add_linear_(x, y, w, block_n=bn, block_k=bk,
                                            num_warps=warps, num_stages=stages)
                try:
                    us = time_call(call, copies, args.replays) * 1e6
                except Exception as e:  # a tiling the compiler refuses costs only itself
                    row["tilings"].append({"tiling": [bn, bk, warps, stages],
                                           "error": f"{type(e).__name__}: {e}"[:200]})
                    continue
                row["tilings"].append({"tiling": [bn, bk, warps, stages], "us": us,
                                       "bw_fraction": read_s / (us / 1e6)})
            timed = [t for t in row["tilings"] if "us" in t]
            best = min(timed, key=lambda t: t["us"]) if timed else None
            if best is not None:  # its values, once more, from the starting residual
                got = gemv.add_linear_(start.clone(), y, copies[0],
                                       block_n=best["tiling"][0], block_k=best["tiling"][1],
                                       num_warps=best["tiling"][2],
                                       num_stages=best["tiling"][3])
                best["max_error"] = (got.float() - want).abs().max().item()
            row["best"] = best
            out["rows"].append(row)
            print(f"{name:>5} m={m:2d}: cuBLAS {row['cublas_us']:7.2f} us "
                  f"({row['cublas_bw_fraction']:.1%})  best Triton "
                  + (f"{best['us']:7.2f} us ({best['bw_fraction']:.1%}) tiling "
                     f"{best['tiling']} (x{row['cublas_us'] / best['us']:.3f}), max error "
                     f"{best['max_error']:.3g}" if best else "none ran"), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
