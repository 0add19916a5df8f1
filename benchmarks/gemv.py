"""Issue 22: a decode step's small-batch GEMMs, cuBLAS against the Triton kernels' tilings.

``residual``: ``x += y @ W.T`` for llama2-7b's output (4096 x 4096) and down (4096 x 11008)
projections, at ``--rows`` rows (sequences): cuBLAS's in-place ``addmm_`` (today's path,
split-K at batch 1) against :func:`autotune.streaming.gemv.add_linear_`. ``norm``: q-k-v
(12288 x 4096) and gate-up with SwiGLU (22016 x 4096) after an RMSNorm: the eager kernels and
cuBLAS's GEMM alone against :func:`autotune.streaming.gemv.norm_linear_tiled`. Each Triton
kernel at each tiling of ``--block-n`` x ``--block-k`` x ``--warps`` x ``--stages``. Each variant is captured in a CUDA graph as in the
decode step, over ``--copies`` distinct weight matrices (more bytes than the L2 holds, so that
every call reads its weight from HBM), replayed ``--replays`` times between two CUDA events;
a call's time is the span over the calls. Reports microseconds a call and the weight read as a
fraction of the device-copy bandwidth measured in the same run, the best tiling per shape, and
its largest error against cuBLAS's (the eager path's) result.

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
NORM_SHAPES = {"qkv": (3 * 4096, 4096), "gate_up": (2 * 11008, 4096)}  # fed by an RMSNorm


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


def _tilings(args: argparse.Namespace) -> list[tuple[int, ...]]:
    return list(itertools.product(_ints(args.block_n), _ints(args.block_k), _ints(args.warps),
                                  _ints(args.stages)))


def _sweep(row: dict[str, Any], tilings: list[tuple[int, ...]], kernel: Any,
           copies: list[torch.Tensor], replays: int, read_s: float) -> None:
    """Times ``kernel(w, *tiling)`` at each tiling into ``row["tilings"]``; ``row["best"]``."""
    row["tilings"] = []
    for tiling in tilings:
        try:
            us = time_call(lambda w, t=tiling: kernel(w, *t), copies, replays) * 1e6
        except Exception as e:  # a tiling the compiler refuses costs only itself
            row["tilings"].append({"tiling": list(tiling),
                                   "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        row["tilings"].append({"tiling": list(tiling), "us": us,
                               "bw_fraction": read_s / (us / 1e6)})
    timed = [t for t in row["tilings"] if "us" in t]
    row["best"] = min(timed, key=lambda t: t["us"]) if timed else None


def _say(row: dict[str, Any], baseline: str) -> None:
    best = row["best"]
    print(f"{row['shape']:>7} m={row['m']:2d}: {baseline} {row[baseline + '_us']:7.2f} us "
          f"({row[baseline + '_bw_fraction']:.1%})  best Triton "
          + (f"{best['us']:7.2f} us ({best['bw_fraction']:.1%}) tiling {best['tiling']} "
             f"(x{row[baseline + '_us'] / best['us']:.3f}), max error {best['max_error']:.3g}"
             if best else "none ran"), flush=True)


def residual_rows(args: argparse.Namespace, bw: float, dtype: torch.dtype,
                  gen: torch.Generator, rows: list[dict[str, Any]], save: Any) -> None:
    """``x += y @ W.T``: cuBLAS's in-place ``addmm_`` against :func:`gemv.add_linear_`; each
    row appended to ``rows``, then ``save()`` (a run cut by its time limit keeps them)."""
    for name, (n, k) in SHAPES.items():
        copies = [torch.randn(n, k, generator=gen, device="cuda", dtype=dtype) * 0.02
                  for _ in range(args.copies)]
        read_s = n * k * copies[0].element_size() / (bw * 1e9)  # the weight, once
        for m in _ints(args.rows):
            start = torch.randn(m, n, generator=gen, device="cuda", dtype=dtype)
            x = start.clone()  # the timed calls add into it, again and again
            y = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
            row: dict[str, Any] = {"shape": name, "n": n, "k": k, "m": m}
            row["cublas_us"] = time_call(lambda w, x=x, y=y: x.addmm_(y, w.t()), copies,
                                         args.replays) * 1e6
            row["cublas_bw_fraction"] = read_s / (row["cublas_us"] / 1e6)
            _sweep(row, _tilings(args), lambda w, bn, bk, warps, stages, x=x, y=y:
                   gemv.add_linear_(x, y, w, block_n=bn, block_k=bk, num_warps=warps,
                                    num_stages=stages), copies, args.replays, read_s)
            if row["best"] is not None:  # its values, once more, from the starting residual
                bn, bk, warps, stages = row["best"]["tiling"]
                got = gemv.add_linear_(start.clone(), y, copies[0], block_n=bn, block_k=bk,
                                       num_warps=warps, num_stages=stages)
                want = start.float() + y.float() @ copies[0].float().t()
                row["best"]["max_error"] = (got.float() - want).abs().max().item()
            rows.append(row)
            save()
            _say(row, "cublas")


def norm_rows(args: argparse.Namespace, bw: float, dtype: torch.dtype,
              gen: torch.Generator, rows: list[dict[str, Any]], save: Any) -> None:
    """``rms_norm(x) @ W.T`` (q-k-v) and its SwiGLU (gate-up): the eager kernels (RMSNorm,
    cuBLAS's GEMM, and silu and mul) and cuBLAS's GEMM alone (the least the compiled step's
    own norm and SwiGLU kernels can add to) against :func:`gemv.norm_linear_tiled`."""
    import torch.nn.functional as F

    for name, (n, k) in NORM_SHAPES.items():
        swiglu = name == "gate_up"
        copies = [torch.randn(n, k, generator=gen, device="cuda", dtype=dtype) * 0.02
                  for _ in range(args.copies)]
        read_s = n * k * copies[0].element_size() / (bw * 1e9)
        g = torch.rand(k, generator=gen, device="cuda", dtype=dtype) + 0.5
        for m in _ints(args.rows):
            x = torch.randn(m, k, generator=gen, device="cuda", dtype=dtype)
            h = F.rms_norm(x, (k,), g, 1e-5)

            def eager(w, x=x, g=g, k=k, swiglu=swiglu):
                y = F.linear(F.rms_norm(x, (k,), g, 1e-5), w)
                if swiglu:
                    gate, up = y.chunk(2, dim=-1)
                    return F.silu(gate).mul_(up)
                return y

            row: dict[str, Any] = {"shape": name, "n": n, "k": k, "m": m, "swiglu": swiglu}
            baselines = {"eager": eager, "gemm": lambda w, h=h: F.linear(h, w)}
            if swiglu:  # gate's rows and up's in two GEMMs of half the width each: cuBLAS
                # read the whole 22016 rows at 85% on the H100, q-k-v's 12288 at 92%
                baselines["gemm_halves"] = lambda w, h=h: [F.linear(h, part)
                                                           for part in w.chunk(2)]
            for baseline, call in baselines.items():
                row[f"{baseline}_us"] = time_call(call, copies, args.replays) * 1e6
                row[f"{baseline}_bw_fraction"] = read_s / (row[f"{baseline}_us"] / 1e6)
            if swiglu:
                print(f"{name:>7} m={m:2d}: one GEMM {row['gemm_us']:7.2f} us "
                      f"({row['gemm_bw_fraction']:.1%}), two halves {row['gemm_halves_us']:7.2f}"
                      f" us ({row['gemm_halves_bw_fraction']:.1%})", flush=True)
            _sweep(row, _tilings(args), lambda w, bn, bk, warps, stages, x=x, g=g, s=swiglu:
                   gemv.norm_linear_tiled(x, g, w, None, 1e-5, s, block_n=bn, block_k=bk,
                                          num_warps=warps, num_stages=stages),
                   copies, args.replays, read_s)
            if row["best"] is not None:
                bn, bk, warps, stages = row["best"]["tiling"]
                got = gemv.norm_linear_tiled(x, g, copies[0], None, 1e-5, swiglu, block_n=bn,
                                             block_k=bk, num_warps=warps, num_stages=stages)
                row["best"]["max_error"] = (got.float() - eager(copies[0]).float()).abs().max(
                    ).item()
            rows.append(row)
            save()
            _say(row, "gemm")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--kernels", default="residual,norm",
                   help="residual (output, down) and/or norm (q-k-v, gate-up)")
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
    out: dict[str, Any] = {"command": " ".join(sys.argv), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(), "memory_gb_s": bw,
                           "rows": []}
    print(f"B_mem {bw:.0f} GB/s; {len(_tilings(args))} tilings", flush=True)
    gen = torch.Generator("cuda").manual_seed(0)
    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    kernels = args.kernels.split(",")
    if "residual" in kernels:
        residual_rows(args, bw, dtype, gen, out["rows"], save)
    if "norm" in kernels:
        norm_rows(args, bw, dtype, gen, out["rows"], save)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
