"""Issue 3's benchmark: the native engine's weight streaming against the physical bound.

In one process: measures pinned host-to-device bandwidth (B_h2d), device memory bandwidth
(B_hbm) and fp16 matmul throughput first; then, for llama2-7b fp16 (random weights) at a GPU
memory limit, runs budgets of 0/25/50/75% of what fits at batch 1, each at batch 1, 16 and the
largest batch the memory plan fits, through :func:`autotune.measure.timing.measure`; then batch 1 with
nothing streamed and no limit; then, if accelerate is importable, its ``device_map`` offload at
the same limit. Per configuration it prints tok/s, the bound, the fraction of the bound, the
GB/s achieved on the link and predicted vs measured peak memory, and writes everything (raw
samples included) to ``--out`` as JSON after each configuration.

The bound of a decode step that streams S bytes and reads R resident bytes is
max(S / B_h2d, R / B_hbm, flops / F); throughput's bound adds the prefill's bound.

    python benchmarks/streaming.py --out benchmarks/results/streaming.json [--osl 256]

Estimates, where a full run costs minutes: ``--decode-steps N`` times the native engine as a
trial does (prefill + N steps, the rest extrapolated; every step replays the same graph), and
``--accelerate-decode-steps N`` does the same for accelerate, whose steps only grow with its
cache, so that its extrapolated figure can only flatter it. Rows say when they are estimated.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from limited import add_workload_args, largest, load_limited

from autotune.measure.timing import measure, random_prompt
from autotune.units import GiB


def _timed(fn, repeats: int = 5) -> float:
    """Median seconds of ``fn`` (synchronized before each clock read)."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def hardware() -> dict[str, float]:
    n = GiB
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(7)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d = n / _timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9
    other = torch.empty_like(dev)
    hbm = 2 * n / _timed(lambda: other.copy_(dev)) / 1e9  # read + write
    a = torch.randn(8192, 8192, dtype=torch.float16, device="cuda")
    flops = 2 * 8192**3 / _timed(lambda: a @ a) / 1e12
    return {"h2d_gb_s": h2d, "hbm_gb_s": hbm, "fp16_tflop_s": flops}


def bounds(engine, hw: dict[str, float], batch: int, isl: int, osl: int) -> dict[str, float]:
    """Lower bounds (seconds) of a decode step and of the prefill, and the tok/s bound."""
    spec, store = engine.spec, engine._store
    streamed = engine.streamed_bytes_per_step()
    resident = engine.device_budget + store.fixed_nbytes
    kv_read = spec.kv_bytes_per_token(engine.config.dtype) * batch * (isl + osl // 2)
    params = spec.num_params()
    step = max(streamed / (hw["h2d_gb_s"] * 1e9), (resident + kv_read) / (hw["hbm_gb_s"] * 1e9),
               2 * params * batch / (hw["fp16_tflop_s"] * 1e12))
    prefill = max(streamed / (hw["h2d_gb_s"] * 1e9), resident / (hw["hbm_gb_s"] * 1e9),
                  2 * params * batch * isl / (hw["fp16_tflop_s"] * 1e12))
    return {"step_s": step, "prefill_s": prefill,
            "tok_s": batch * osl / (prefill + (osl - 1) * step)}


def run_config(engine, hw, batch, isl, osl, args) -> dict[str, Any]:
    plan = engine.memory_plan(batch, isl, osl, engine.device_budget)
    row: dict[str, Any] = {"batch": batch, "budget": engine.device_budget,
                           "budget_fraction": engine.device_budget / engine.total_device_budget,
                           "plan": plan.as_dict(), **bounds(engine, hw, batch, isl, osl)}
    try:
        if args.warmup == 0:
            # A short warm-up, separate and never counted: prefill, then 2 decode steps (one
            # eager, one captured and replayed), so the timed runs replay the graph.
            gen = engine.prefill(random_prompt(batch, isl, engine.spec.vocab_size, 1, "cuda"), osl)
            engine.decode(gen, min(2, osl - 1))
            engine.synchronize()
        k = args.decode_steps  # None: every step; else the trials' shortcut (estimated)
        m = measure(engine, batch, isl, osl, repeats=args.repeats, warmup=args.warmup,
                    decode_steps=k, warmup_steps=k)
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        gc.collect()
        torch.cuda.empty_cache()
        return row
    row.update(m.as_dict())
    row["decode_fraction_of_bound"] = row["step_s"] / m.tpot_s if m.tpot_s else None
    row["fraction_of_bound"] = m.throughput_tok_s / row["tok_s"]
    row["predicted_over_reserved"] = plan.total / m.peak_reserved_bytes
    row["predicted_over_allocated"] = plan.total / m.peak_allocated_bytes
    return row


def print_row(label: str, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{label:>10} b={r['batch']:>3} budget={r['budget'] / 1e9:6.2f}GB  {r['error']}")
        return
    print(f"{label:>10} b={r['batch']:>3} budget={r['budget'] / 1e9:6.2f}GB "
          f"tok/s={r['throughput_tok_s']:8.2f} bound={r['tok_s']:8.2f} "
          f"frac={r['fraction_of_bound']:.3f} decode_frac={r['decode_fraction_of_bound']:.3f} "
          f"link={r['stream_gb_s']:5.1f}GB/s tpot={r['tpot_s'] * 1e3:7.2f}ms "
          f"peak_pred={r['plan']['total'] / GiB:5.2f} reserved={r['peak_reserved_bytes'] / GiB:5.2f} "
          f"alloc={r['peak_allocated_bytes'] / GiB:5.2f} GiB"
          + (f" (est. from {r['decode_steps_timed']} steps)" if r["estimated"] else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--fractions", default="0,0.25,0.5,0.75")
    p.add_argument("--batches", default="1,16,max")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1,
                   help="full warm-up generations; 0: a 2-step warm-up instead")
    p.add_argument("--accelerate-osl", type=int, default=None,
                   help="osl of the accelerate runs (default: --osl, an equal comparison)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="native: time prefill + this many decode steps and extrapolate the "
                        "rest, as a trial does (shown within 3%%: benchmarks/shortcut.py); "
                        "default: every step")
    p.add_argument("--accelerate-decode-steps", type=int, default=None,
                   help="accelerate: time prefill + this many decode steps and extrapolate the "
                        "rest at their mean (its cache grows, so later steps cost no less: an "
                        "estimate that can only favour accelerate); default: every step")
    p.add_argument("--no-accelerate", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"args": vars(args), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(), "rows": []}

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    result["hardware"] = hw = hardware()
    torch.cuda.empty_cache()  # the probes' buffers are gone: peaks below are the engine's
    print(f"B_h2d {hw['h2d_gb_s']:.1f} GB/s, B_hbm {hw['hbm_gb_s']:.0f} GB/s, "
          f"fp16 {hw['fp16_tflop_s']:.0f} TFLOP/s", flush=True)
    start = time.perf_counter()
    engine, limit, fits = load_limited(args)
    result["load_s"] = time.perf_counter() - start
    result["engine"] = engine.describe()
    print(f"loaded in {result['load_s']:.1f} s: {engine.describe()}", flush=True)
    isl, osl, total = args.isl, args.osl, engine.total_device_budget
    top = largest(lambda b: fits(1, b), 0, total)
    for fraction in (float(f) for f in args.fractions.split(",")):
        start = time.perf_counter()
        engine.device_budget = int(fraction * top)
        switch_s = time.perf_counter() - start
        budget = engine.device_budget
        for b in args.batches.split(","):
            batch = largest(lambda x, y=budget: fits(x, y), 1, 256) if b == "max" else int(b)
            if batch < 1 or not fits(batch, budget):
                continue
            row = run_config(engine, hw, batch, isl, osl, args)
            row.update(limit=limit, budget_switch_s=switch_s, label=f"{fraction:.0%} fit")
            result["rows"].append(row)
            print_row(row["label"], row)
            save()

    # Nothing streamed, no memory limit.
    torch.cuda.set_per_process_memory_fraction(1.0)
    start = time.perf_counter()
    engine.device_budget = total
    switch_s = time.perf_counter() - start
    row = run_config(engine, hw, 1, isl, osl, argparse.Namespace(
        **{**vars(args), "repeats": max(3, args.repeats)}))  # seconds each: repeat it
    row.update(limit=None, budget_switch_s=switch_s, label="resident")
    result["rows"].append(row)
    print_row("resident", row)
    save()
    limited = [r["batch"] for r in result["rows"] if r.get("limit") and "error" not in r]
    batches = sorted({b for b in limited if b in (1, 16)} | {max(limited, default=1)})
    engine.close()
    gc.collect()
    torch.cuda.empty_cache()

    if not args.no_accelerate:
        result["accelerate"] = []
        for batch in batches:
            row = run_accelerate(args.model, limit, batch, isl, args.accelerate_osl or osl,
                                 args.accelerate_decode_steps)
            result["accelerate"].append(row)
            print(f"accelerate b={batch:>3}: {row}", flush=True)
            save()
        for row in result["accelerate"]:  # native's best at the same limit and batch
            ours = max((r["throughput_tok_s"] for r in result["rows"] if r.get("limit")
                        and r["batch"] == row["batch"] and "error" not in r), default=None)
            if ours and row.get("throughput_tok_s") and row["osl"] == osl:
                row["native_over_accelerate"] = ours / row["throughput_tok_s"]
                est = " (est.)" if row.get("estimated") else ""
                print(f"batch {row['batch']:>3} at osl {osl}: native {ours:.2f} tok/s, "
                      f"accelerate {row['throughput_tok_s']:.2f}{est}: "
                      f"{row['native_over_accelerate']:.2f}x", flush=True)
        save()
    save()
    return 0


class _Offloaded:
    """A transformers model under accelerate's hooks, shaped enough like an Engine for
    :func:`autotune.measure.timing.measure` (greedy, DynamicCache, exactly osl tokens)."""

    def __init__(self, model, spec, offloaded: int) -> None:
        from autotune.engines import EngineConfig

        self.model, self.spec, self._offloaded = model, spec, offloaded
        self.config = EngineConfig(model=spec.name, device="cuda")
        self.device_budget, self.total_device_budget = 0, offloaded

    def prefill(self, prompt, osl):
        from autotune.engines import Generation

        with torch.inference_mode():
            out = self.model(input_ids=prompt, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        return Generation(prompt.shape[0], prompt.shape[1], osl, tok, out.past_key_values)

    def decode(self, gen, steps: int) -> None:
        with torch.inference_mode():
            for _ in range(steps):
                out = self.model(input_ids=gen.tokens[:, -1:], past_key_values=gen.state,
                                 use_cache=True)
                gen.state = out.past_key_values
                gen.tokens = torch.cat([gen.tokens, out.logits[:, -1:].argmax(-1)], dim=1)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def streamed_bytes_per_step(self) -> int:
        return self._offloaded


def run_accelerate(model_name: str, limit: int, batch: int, isl: int, osl: int,
                   decode_steps: int | None = None) -> dict:
    """accelerate's big-model offload (device_map from max_memory) at the same memory limit:
    the GPU gets the limit minus this batch's KV cache and activations, the rest stays on the
    CPU and is copied in by accelerate's hooks on every forward. ``decode_steps``: time prefill
    + that many steps and extrapolate the other osl - 1 - decode_steps at their mean."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaForCausalLM

    from autotune.engines.memory import kv_cache_bytes, prefill_activation_bytes
    from autotune.models import RandomWeights, get_spec

    spec = get_spec(model_name)
    gc.collect()  # nothing of an earlier model may hold device memory now
    torch.cuda.empty_cache()
    with init_empty_weights():
        model = LlamaForCausalLM(spec.hf_config()).to(torch.float16)
    reserve = (kv_cache_bytes(spec, "float16", batch, isl + osl)
               + prefill_activation_bytes(spec, "float16", batch, isl) + GiB // 2)
    max_memory = {0: max(limit - reserve, GiB), "cpu": 200 * GiB}
    device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=torch.float16,
                                       no_split_module_classes=["LlamaDecoderLayer"])
    offloaded = 0
    source = RandomWeights(0)
    for name, shape in spec.all_shapes().items():
        prefix = max((k for k in device_map if name.startswith(k + ".") or k == ""), key=len)
        where = device_map[prefix]
        value = source.get(name, shape, torch.float16, "cuda")
        if where == "cpu":
            value = value.cpu()
            offloaded += value.numel() * 2
        set_module_tensor_to_device(model, name, where, value=value)
    model = dispatch_model(model.eval(), device_map=device_map)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(limit / total)
    row: dict[str, Any] = {"batch": batch, "osl": osl, "offloaded_bytes": offloaded}
    engine = _Offloaded(model, spec, offloaded)
    try:
        # A short warm-up (prefill + 1 step), separate and never counted: a full one would
        # cost another whole generation at ~1 s per step.
        engine.decode(engine.prefill(random_prompt(batch, isl, spec.vocab_size, 1, "cuda"), 2), 1)
        steps = osl - 1 if decode_steps is None else min(decode_steps, osl - 1)
        m = measure(engine, batch, isl, steps + 1, repeats=1, warmup=0)
        e2e = m.ttft_s + (osl - 1) * m.tpot_s  # exact when every step was timed
        row.update(throughput_tok_s=batch * osl / e2e, e2e_s=e2e, tpot_s=m.tpot_s,
                   ttft_s=m.ttft_s, stream_gb_s=m.stream_gb_s,
                   peak_reserved_bytes=m.peak_reserved_bytes, decode_steps_timed=steps,
                   estimated=steps < osl - 1)
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
    del model, engine  # both hold the model; its hooks make cycles: collect before the next
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return row


if __name__ == "__main__":
    sys.exit(main())
