"""Writes ``synthetic-llama2-7b-8GiB.json``: a SYNTHETIC landscape from a physical model.

Not a measurement. It stands in for recorded landscapes in the CPU tests until real ones are
recorded on the GPU (``benchmarks/landscapes/``, never this one). The model: llama2-7b fp16
(autotune's own unit layout: 12.95 GB streamable, 0.52 GB never streamed; KV cache 512 KiB per
token), the native engine's memory plan at an 8 GiB limit, a 53 GB/s link streaming at 94% of
it, decode compute 7 ms + 0.15 ms per sequence, prefill 10 ms + 0.04 ms per prompt token,
copy and compute overlapped with a soft maximum, and 1% seeded noise on the timings. The
calibration section is what the prior would have measured: the link at 53 GB/s and matmul
times (memory-bound 4.3 ms, 0.023 ms per row when compute-bound).

    .venv/bin/python tests/data/make_synthetic_landscape.py
"""

from __future__ import annotations

import random
from pathlib import Path

from autotune import landscape
from autotune.engines.memory import DEFAULT_MARGIN
from autotune.models import get_spec
from autotune.streaming import plan
from autotune.streaming.runtime import select_resident, unit_layouts
from autotune.tune.search import GRID_FRACTIONS, grid_batches

GiB = 2**30
MODEL, DTYPE, ISL, OSL, LIMIT, MAX_BATCH = "llama2-7b", "float16", 128, 256, 8 * GiB, 256
LINK_GB_S, STREAM_EFFICIENCY = 53.0, 0.94
OUT = Path(__file__).with_name("synthetic-llama2-7b-8GiB.json")


def soft_max(a: float, b: float, p: float = 8.0) -> float:
    """max(a, b), rounded near the crossover (copies and compute overlap imperfectly)."""
    return (a**p + b**p) ** (1 / p)


def gemm_s(rows: int) -> float:
    return max(4.3e-3, 0.023e-3 * rows) + 0.05e-3


def main() -> None:
    spec = get_spec(MODEL)
    sizes = [u.nbytes for u in unit_layouts(spec, DTYPE)]
    total = sum(sizes)
    fixed = (2 * spec.vocab_size * spec.hidden_size + spec.hidden_size) * 2  # embed, head, norm
    available = LIMIT - DEFAULT_MARGIN
    rng = random.Random(7)
    points = []
    for b in grid_batches(MAX_BATCH):
        for f in GRID_FRACTIONS:
            want = select_resident(sizes, int(round(f * total)))
            resident = plan.alloc_size(fixed) + sum(
                plan.alloc_size(s) for s, r in zip(sizes, want, strict=True) if r)
            streamed = sum(s for s, r in zip(sizes, want, strict=True) if not r)
            slot = max((s for s, r in zip(sizes, want, strict=True) if not r), default=0)
            scratch = 2 * plan.alloc_size(slot) if streamed else 0
            act = int((plan.prefill_bytes(spec, DTYPE, b, ISL)
                       + plan.decode_pool_bytes(spec, DTYPE, b)) * plan.FRAGMENTATION)
            peak = (resident + scratch + plan.kv_cache_alloc(spec, DTYPE, b, ISL + OSL) + act
                    + plan.DEFAULT_WORKSPACE)
            point = {"batch": b, "budget_fraction": f, "predicted_peak_bytes": peak}
            if peak > available:
                point["status"] = "infeasible"
            else:
                stream = streamed / (LINK_GB_S * 1e9 * STREAM_EFFICIENCY)
                tpot = soft_max(stream, 7e-3 + 0.15e-3 * b) * (1 + 0.01 * rng.gauss(0, 1))
                ttft = soft_max(stream, 10e-3 + 0.04e-3 * b * ISL) * (1 + 0.01 * rng.gauss(0, 1))
                e2e = ttft + (OSL - 1) * tpot
                point.update({
                    "status": "ok", "throughput_tok_s": round(b * OSL / e2e, 4),
                    "ttft_ms": round(ttft * 1e3, 4), "tpot_ms": round(tpot * 1e3, 4),
                    "peak_memory_bytes": int(peak * 0.99), "streamed_bytes_per_step": streamed,
                })
            points.append(point)
    rows = (1, 8, 32, 128, 512, 2048)
    data = {
        "schema_version": landscape.SCHEMA_VERSION, "kind": landscape.KIND,
        "synthetic": True,
        "description": "SYNTHETIC, from a physical model, not measured: see "
                       "tests/data/make_synthetic_landscape.py",
        "source": {"command": ".venv/bin/python tests/data/make_synthetic_landscape.py"},
        "workload": {"model": MODEL, "engine": "native", "dtype": DTYPE, "isl": ISL, "osl": OSL,
                     "gpu_memory_limit": LIMIT, "gpu": "synthetic H100 (53 GB/s link)",
                     "max_batch": MAX_BATCH},
        "environment": {"h2d_gb_s": LINK_GB_S, "synthetic": True},
        "calibration": {"h2d_gb_s": LINK_GB_S, "gemm_rows": list(rows),
                        "gemm_s": [round(gemm_s(r), 6) for r in rows]},
        "total_device_budget": total,
        "available_bytes": available,
        "batches": grid_batches(MAX_BATCH),
        "budget_fractions": list(GRID_FRACTIONS),
        "points": points,
    }
    landscape.write(data, OUT)
    print(f"wrote {OUT}: {sum(p['status'] == 'ok' for p in points)} of {len(points)} points fit")


if __name__ == "__main__":
    main()
