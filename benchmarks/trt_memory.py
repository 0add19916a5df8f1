"""Where a weight-streaming TensorRT engine's device memory goes (issue 18's probe).

The tensorrt engine's batch is capped by memory that TensorRT holds beyond the weights and the
KV cache: about one more cache of the largest batch the module is built for. This script
builds a few variants of the exported Llama with few layers of a real model's width and, for
each, reads what TensorRT says (the context's device memory for the profile, the streaming
scratch at budget 0, the layers whose names say they copy or reformat) and what the process
holds on the GPU at budget 0 after a decode-shaped and a prefill-shaped call of the largest
batch. Comparing the variants says which tensor the extra memory is:

    base       today's graph (per-layer cache inputs, keys transposed)
    kplain     keys stored like values, [B, KV, S, d], transposed inside the graph
    bmm        attention's batched matmuls left to PyTorch (torch_executed_ops: the graph
               has aten.matmul, not bmm, so this changes nothing; kept as measured)
    torch      the engine's --engine-option attention=torch: attention over the cache as a
               custom op PyTorch runs between engines, one engine per layer, their context
               memory as the engine arranges it
               (up to 2.12: the Python runtime's contexts, made again user-managed, all
               on one buffer; ``--variants shared`` at commit d73d2ce measured that by hand, see
               benchmarks/results/issue18)

    python benchmarks/trt_memory.py --model llama2-7b --layers 2,4 --max-batch 17,8 \
        --variants base,kplain,bmm --json out.json

GPU only, with Torch-TensorRT installed. Nothing here is on a study's path.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import time
import traceback
from typing import Any

import torch

from autotune.engines import _trt_build, _trt_model
from autotune.engines.base import EngineConfig
from autotune.engines.tensorrt import TensorRTEngine, set_module_budget, shares_context_memory
from autotune.models import get_spec, torch_dtype


class _KeysPlain(_trt_model.ExportLlama):
    """Keys stored as values are, ``[B, KV, S, d]``; the transpose happens in the graph."""

    def _attention(self, h, layer, cos, sin, causal, filled, past, positions):  # type: ignore[no-untyped-def]
        if past is not None:
            past = (past[0].transpose(-1, -2), past[1])
        return super()._attention(h, layer, cos, sin, causal, filled, past, positions)


def _inputs(original: Any, trt: Any, shapes: _trt_build.BuildShapes, spec: Any,
            dtype: str) -> list[Any]:
    found = original(shapes, trt, spec, dtype)
    kv, d, n = spec.num_key_value_heads, spec.head_dim, shapes.cache_len
    b = (shapes.min_batch, shapes.opt_batch, shapes.max_batch)
    for i in range(2, len(found), 2):  # keys: the first of each layer's pair
        found[i] = trt.Input(min_shape=(b[0], kv, n, d), opt_shape=(b[1], kv, n, d),
                             max_shape=(b[2], kv, n, d), dtype=torch_dtype(dtype))
    return found


def _engine_facts(blob: bytes) -> dict[str, Any]:
    """What TensorRT's own API says about one serialized engine."""
    import tensorrt

    facts: dict[str, Any] = {"serialized_bytes": len(blob)}
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(blob)
    for name in ("device_memory_size_v2", "device_memory_size", "streamable_weights_size"):
        try:
            facts[name] = int(getattr(engine, name))
        except Exception as e:
            facts[name] = f"{type(e).__name__}: {e}"
    try:
        facts["profile0_memory"] = int(engine.get_device_memory_size_for_profile_v2(0))
    except Exception as e:
        facts["profile0_memory"] = f"{type(e).__name__}: {e}"
    try:
        engine.weight_streaming_budget_v2 = 0
        facts["scratch_at_budget_0"] = int(engine.weight_streaming_scratch_memory_size)
        facts["device_memory_at_budget_0"] = int(engine.device_memory_size_v2)
    except Exception as e:
        facts["scratch_at_budget_0"] = f"{type(e).__name__}: {e}"
    try:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        facts["io_formats"] = {n: str(engine.get_tensor_format_desc(n)) for n in names[:6]}
    except Exception as e:
        facts["io_formats"] = f"{type(e).__name__}: {e}"
    try:
        text = engine.create_engine_inspector().get_engine_information(
            tensorrt.LayerInformationFormat.ONELINE)
        lines = [line for line in text.splitlines() if line.strip()]
        facts["layers"] = len(lines)
        facts["copies"] = [line[:300] for line in lines
                           if any(w in line.lower() for w in ("reformat", "copy", "shuffle"))][:40]
        facts["first_layers"] = [line[:300] for line in lines[:12]]
    except Exception as e:
        facts["layers"] = f"{type(e).__name__}: {e}"
    del engine, runtime
    return facts


def _used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def probe(model: str, layers: int, max_batch: int, variant: str, isl: int, osl: int,
          chunk: int | None, specialization: str | None = None) -> dict[str, Any]:
    import torch_tensorrt

    spec = dataclasses.replace(get_spec(model), num_hidden_layers=layers)
    options: tuple[tuple[str, Any], ...] = ()
    if chunk:
        options += (("prefill_chunk", chunk),)
    # The variants other than torch are today's graph with attention inside TensorRT.
    options += (("attention", "torch" if variant == "torch" else "tensorrt"),)
    config = EngineConfig(model=model, engine="tensorrt", dtype="float16", device="cuda:0",
                          max_batch=max_batch, max_seq_len=isl + osl, options=options)
    shapes = _trt_build.BuildShapes.from_config(config, kv_cache=True)
    keys_plain = variant == "kplain"
    torch_ops = ["torch.ops.aten.bmm.default"] if variant == "bmm" else []
    version = _trt_build.parse_version(torch_tensorrt.__version__)
    original_model, original_inputs = _trt_model.ExportLlama, _trt_build.BuildShapes.inputs
    torch.cuda.empty_cache()
    base = _used()
    start = time.perf_counter()
    try:
        if keys_plain:
            _trt_model.ExportLlama = _KeysPlain  # type: ignore[misc]
            _trt_build.BuildShapes.inputs = (  # type: ignore[method-assign]
                lambda self, trt, s, d: _inputs(original_inputs, trt, self, s, d))
            # export_model builds its example cache with cache_tensors: keys like values.
            original_cache = _trt_build.cache_tensors

            def plain(spec_: Any, dtype: str, batch: int, length: int, device: Any) -> Any:
                _, values = original_cache(spec_, dtype, batch, length, device)
                return values.clone(), values

            _trt_build.cache_tensors = plain  # type: ignore[assignment]
        try:
            module = TensorRTEngine._compile(torch_tensorrt, version, spec, config, shapes,
                                             torch_ops)
        finally:
            _trt_model.ExportLlama = original_model  # type: ignore[misc]
            _trt_build.BuildShapes.inputs = original_inputs  # type: ignore[method-assign]
            if keys_plain:
                _trt_build.cache_tensors = original_cache  # type: ignore[assignment]
        compile_s = time.perf_counter() - start
        children = [n for n, _ in module.named_children() if "_run_on_acc" in n]
        engines = {n: _engine_facts(getattr(module, n).serialized_engine)
                   for n in children}
        for n in children:
            getattr(module, n).serialized_engine = None
        module = module.to("cuda:0")
        gc.collect()
        torch.cuda.empty_cache()
        result: dict[str, Any] = {
            "model": model, "layers": layers, "max_batch": max_batch, "variant": variant,
            "shapes": shapes.as_dict(), "compile_s": round(compile_s, 1), "engines": engines,
            "dynamic_context_memory": "dynamically_allocate_resources" in inspect.signature(
                torch_tensorrt.dynamo.compile).parameters and variant == "torch"
            and not shares_context_memory(torch_tensorrt, "torch"),
            "shares_context_memory": variant == "torch"
            and shares_context_memory(torch_tensorrt, "torch"),
            "kv_cache_bytes_max_batch": 2 * layers * max_batch * spec.num_key_value_heads
            * spec.head_dim * shapes.cache_len * 2,
        }
        ws = torch_tensorrt.runtime.weight_streaming(module)
        result["total_streamable"] = int(ws.total_device_budget)
        # As the engine sets it; where the contexts share one buffer, it is kept alive here.
        context_memory = set_module_budget(torch_tensorrt, ws, 0, "cuda:0", specialization)
        result["kernel_specialization"] = (specialization if variant == "torch"
                                           and shares_context_memory(torch_tensorrt,
                                                                     "torch") else None)
        result["shared_context_memory"] = (None if context_memory is None
                                           else context_memory.numel())
        result["per_call_context_memory"] = [
            bool(getattr(m, "dynamically_allocate_resources", False)) for _, m in ws.rt_mods]
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        result["used_after_load_budget0"] = _used() - base
        kv, d, n = spec.num_key_value_heads, spec.head_dim, shapes.cache_len
        b = max_batch
        cache = []
        for _ in range(layers):
            cache.append(torch.zeros((b, kv, n, d) if keys_plain else (b, kv, d, n),
                                     dtype=torch.float16, device="cuda:0"))
            cache.append(torch.zeros((b, kv, n, d), dtype=torch.float16, device="cuda:0"))
        result["cache_bytes"] = sum(t.numel() * 2 for t in cache)
        for label, t in (("decode", 1), ("prefill", shapes.max_seq)):
            tokens = torch.randint(1, spec.vocab_size, (b, t), device="cuda:0")
            positions = torch.arange(t, device="cuda:0") + 3
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                out = module(tokens, positions, *cache)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(3):
                    out = module(tokens, positions, *cache)
                torch.cuda.synchronize()
            result[f"{label}_s"] = (time.perf_counter() - t0) / 3
            del out
            result[f"used_after_{label}"] = _used() - base
            result[f"torch_peak_{label}"] = int(torch.cuda.max_memory_allocated())
            # Without PyTorch's cached blocks: what TensorRT itself keeps between calls.
            gc.collect()
            torch.cuda.empty_cache()
            result[f"used_after_{label}_freed"] = _used() - base
            result[f"torch_reserved_after_{label}_freed"] = int(torch.cuda.memory_reserved())
        result["streamed_gb_s_decode"] = result["total_streamable"] / result["decode_s"] / 1e9
        del cache, module, ws, context_memory
        return result
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--layers", default="2,4")
    parser.add_argument("--max-batch", default="17")
    parser.add_argument("--variants", default="base,kplain,bmm")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=0, help="prefill_chunk (0: the default)")
    parser.add_argument("--kernel-specialization", default=None,
                        choices=("lazy", "eager", "none"),
                        help="TensorRT-RTX's, for the torch variant's contexts (default: its own)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for variant in args.variants.split(","):
        for layers in map(int, args.layers.split(",")):
            for max_batch in map(int, args.max_batch.split(",")):
                label = f"{variant} layers={layers} max_batch={max_batch}"
                print(f"== {label}", flush=True)
                try:
                    row = probe(args.model, layers, max_batch, variant, args.isl, args.osl,
                                args.chunk or None, args.kernel_specialization)
                except Exception as e:
                    traceback.print_exc()
                    row = {"variant": variant, "layers": layers, "max_batch": max_batch,
                           "error": f"{type(e).__name__}: {e}"}
                print(json.dumps(row, indent=1), flush=True)
                rows.append(row)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
