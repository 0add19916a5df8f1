"""What holds the tensorrt engine's device memory at budget 0 (issue 18's open question).

The seed's scenario (llama2-7b, attention=torch, max batch 35) holds about 3.8 GB at budget 0
once PyTorch's cache is freed, of which PyTorch's allocator accounts for 0.56 GB: the batch
the study can run is what is left beside it. This script loads the engine exactly as a study
does (``TensorRTEngine.load``: compile or cache, then the NVML calibration), then takes that
figure apart, printing each line as it is measured:

    stages      NVML for this process: CUDA and PyTorch initialised; Torch-TensorRT imported;
                the engine loaded; after the module is deleted (what TensorRT keeps)
    tensors     every live CUDA tensor PyTorch holds, grouped by where it is referenced from
                (module parameters and buffers, module attributes, unowned)
    engines     per TensorRT engine: the context memory it asks for, its streaming scratch,
                streamable bytes, the budget it applied
    shapes      NVML at budget 0 after a generation at each batch in turn, the cache freed:
                growth with each new shape is memory TensorRT keeps per shape (kernels
                compiled for it, for example)
    teardown    NVML as the shared buffer, each context, each engine and then the module are
                let go: what each holds, and what the process keeps once all is gone

    python benchmarks/trt_held.py --model llama2-7b --max-batch 35 --batches 1,8,19,35 \
        --json out.json

GPU only, with Torch-TensorRT installed. Nothing here is on a study's path.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict
from typing import Any

import torch

GB = 1e9
record: dict[str, Any] = {"stages": {}, "shapes": [], "engines": [], "tensors": {}}
DEVICE = "cuda:0"  # --device cpu: a dry run against tests/doubles (every figure 0)


def _nvml_used() -> int:
    from autotune import gpu

    used = gpu.process_used_bytes(DEVICE)
    if used is None:
        free, total = torch.cuda.mem_get_info(0)
        used = total - free
    return used


def _held() -> int:
    """NVML's figure, PyTorch's cache freed (0 on a CPU dry run)."""
    gc.collect()
    if DEVICE == "cpu":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return _nvml_used()


def stage(name: str) -> None:
    gc.collect()
    row = {"nvml": 0, "torch_allocated": 0, "torch_reserved": 0}
    if DEVICE != "cpu":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        row = {"nvml": _nvml_used(), "torch_allocated": torch.cuda.memory_allocated(0),
               "torch_reserved": torch.cuda.memory_reserved(0)}
    record["stages"][name] = row
    print(f"stage {name:28s} NVML {row['nvml'] / GB:6.3f} GB | PyTorch allocated "
          f"{row['torch_allocated'] / GB:6.3f} reserved {row['torch_reserved'] / GB:6.3f}",
          flush=True)


def _tensors_of(obj: Any, depth: int = 0) -> list[Any]:
    """CUDA tensors an attribute holds, through lists, tuples and dicts (two levels)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.device.type == torch.device(DEVICE).type else []
    if depth < 2 and isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors_of(x, depth + 1)]
    if depth < 2 and isinstance(obj, dict):
        return [t for x in obj.values() for t in _tensors_of(x, depth + 1)]
    return []


def account_tensors(engine: Any) -> None:
    """Groups every live CUDA tensor by its owner; each storage counted once."""
    seen: set[int] = set()
    groups: dict[str, int] = defaultdict(int)

    def add(where: str, t: Any) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            return
        seen.add(ptr)
        groups[where] += t.untyped_storage().nbytes()

    module = engine._module
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if p.device.type == torch.device(DEVICE).type:
            add(f"parameter/buffer {name.split('.')[0]}", p)
    for _name, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            for t in _tensors_of(value):
                kind = type(sub).__name__
                add(f"attribute {kind}.{attr}", t)
    for attr, value in vars(engine).items():
        for t in _tensors_of(value):
            add(f"engine.{attr}", t)
    for obj in gc.get_objects():
        try:
            if (isinstance(obj, torch.Tensor)
                    and obj.device.type == torch.device(DEVICE).type):
                add(f"unowned {tuple(obj.shape)} {obj.dtype}", obj)
        except Exception:  # some objects raise on isinstance's probes
            continue
    record["tensors"] = dict(groups)
    total = sum(groups.values())
    print(f"tensors: {total / GB:.3f} GB in {len(seen)} storages", flush=True)
    for where, size in sorted(groups.items(), key=lambda kv: -kv[1])[:40]:
        print(f"  {size / GB:8.4f} GB  {where}", flush=True)


def describe_engines(engine: Any) -> None:
    names = ("device_memory_size_v2", "weight_streaming_scratch_memory_size",
             "streamable_weights_size", "weight_streaming_budget_v2",
             "minimum_weight_streaming_budget", "num_layers", "num_io_tensors")
    for name, mod in engine._ws.rt_mods:
        row: dict[str, Any] = {"name": name}
        for attr in names:
            try:
                row[attr] = int(getattr(mod.engine, attr))
            except Exception as e:
                row[attr] = f"{type(e).__name__}"
        record["engines"].append(row)
    keys = [k for k in names if any(isinstance(r.get(k), int) for r in record["engines"])]
    for key in keys:
        values = [r[key] for r in record["engines"] if isinstance(r.get(key), int)]
        print(f"engines: {key}: sum {sum(values) / GB:.4f} GB, max {max(values) / GB:.4f} GB, "
              f"{len(values)} engines", flush=True)
    for r in record["engines"][:3] + record["engines"][-2:]:
        print(f"  {r}", flush=True)


def sweep_shapes(engine: Any, batches: list[int], isl: int) -> None:
    from autotune.engines.base import random_prompt

    engine.device_budget = 0
    for batch in batches:
        prompt = random_prompt(batch, isl, engine.spec.vocab_size, 0, DEVICE)
        gen = engine.prefill(prompt, 4)
        engine.decode(gen, 3)
        engine.synchronize()
        del gen, prompt
        engine._cache, engine._cache_args = None, []
        stage(f"budget 0 after batch {batch}")
        record["shapes"].append({"batch": batch, **record["stages"][f"budget 0 after batch {batch}"]})


def tear_down(engine: Any) -> None:
    """Lets go of the contexts, then the engines, then the rest, measuring after each: what
    each part of TensorRT holds, and what the process keeps once all is gone."""
    from autotune.engines.tensorrt import _drop_shared_memory

    ws = engine._ws
    _drop_shared_memory(ws)
    stage("shared buffer dropped")
    for part in ("context", "engine"):  # one at a time: what each holds, by NVML
        freed = []
        for _, mod in ws.rt_mods:
            before = _held()
            setattr(mod, part, None)
            freed.append(before - _held())
        record[f"freed_per_{part}"] = freed
        print(f"{part}s: each freed {', '.join(f'{b / 1e6:.1f}' for b in freed[:6])} ... MB; "
              f"{sum(freed) / GB:.3f} GB in all", flush=True)
        stage(f"{part}s dropped")
    engine.close()
    del engine, ws
    stage("module deleted")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--max-batch", type=int, default=35)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=256)
    parser.add_argument("--batches", default="1,8,19,35")
    parser.add_argument("--kernel-specialization", default=None)
    parser.add_argument("--skip-calibration", action="store_true",
                        help="load without the NVML calibration at four budgets (~45 s for 7B)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device

    torch.zeros(1, device=DEVICE)
    stage("cuda and torch initialised")
    from autotune.engines._trt_build import import_torch_tensorrt

    import_torch_tensorrt()
    torch.zeros(1, device=DEVICE).sum().item()
    stage("torch_tensorrt imported")

    from autotune.engines.base import EngineConfig
    from autotune.engines.tensorrt import TensorRTEngine

    options: tuple[tuple[str, Any], ...] = (("attention", "torch"),)
    if args.kernel_specialization:
        options += (("kernel_specialization", args.kernel_specialization),)
    config = EngineConfig(model=args.model, engine="tensorrt", dtype=args.dtype, device=DEVICE,
                          max_batch=args.max_batch, max_seq_len=args.isl + args.osl,
                          max_prompt_len=args.isl, options=options)
    if args.skip_calibration:  # its figures are in every study's record already
        TensorRTEngine.calibrate_memory = lambda self: None  # type: ignore[method-assign,assignment,return-value]
    start = time.perf_counter()
    engine = TensorRTEngine.load(config)
    record["load_s"] = time.perf_counter() - start
    facts = engine.describe()
    record["memory_calibration"] = facts.get("memory_calibration")
    record["cache_hit"] = facts.get("cache_hit")
    print(f"loaded in {record['load_s']:.1f} s (cache hit: {record['cache_hit']}); "
          f"calibration {json.dumps(record['memory_calibration'])}", flush=True)
    engine.device_budget = 0
    stage("loaded, budget 0")
    describe_engines(engine)
    account_tensors(engine)
    sweep_shapes(engine, [int(b) for b in args.batches.split(",")], args.isl)
    account_tensors(engine)
    tear_down(engine)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)


if __name__ == "__main__":
    main()
