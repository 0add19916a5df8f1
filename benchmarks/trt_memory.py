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
    bmm        attention's batched matmuls left to PyTorch (torch_executed_ops)
    pbmm       attention written as explicit 3-D torch.bmm, those left to PyTorch
    custom     attention over the cache as one custom op that TensorRT leaves to PyTorch
    customdyn  custom, with each engine's context memory allocated per call
               (dynamically_allocate_resources), so that engines do not each hold theirs

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
from autotune.engines import tensorrt as tensorrt_engine
from autotune.engines.base import EngineConfig
from autotune.engines.tensorrt import TensorRTEngine
from autotune.models import get_spec, torch_dtype


class _KeysPlain(_trt_model.ExportLlama):
    """Keys stored as values are, ``[B, KV, S, d]``; the transpose happens in the graph."""

    def _attention(self, h, layer, cos, sin, causal, filled, past):  # type: ignore[no-untyped-def]
        if past is not None:
            past = (past[0].transpose(-1, -2), past[1])
        return super()._attention(h, layer, cos, sin, causal, filled, past)


class _AttentionBmm(_trt_model.ExportLlama):
    """Attention's products as explicit 3-D ``torch.bmm`` calls, which ``torch_executed_ops``
    can leave to PyTorch, so that no TensorRT engine takes the cache as an input."""

    def _attention(self, h, layer, cos, sin, causal, filled, past):  # type: ignore[no-untyped-def]
        spec = self.spec
        b, t = h.shape[0], h.shape[1]
        nh, nkv, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        g = nh // nkv
        q = (h @ layer.q.t()).view(b, t, nh, d)
        k = (h @ layer.k.t()).view(b, t, nkv, d)
        v = (h @ layer.v.t()).view(b, t, nkv, d)
        q = q * cos + _trt_model._rotate_half(q) * sin
        k = k * cos + _trt_model._rotate_half(k) * sin
        q = q.view(b, t, nkv, g, d).permute(0, 2, 3, 1, 4).reshape(b * nkv, g * t, d)
        kt = k.permute(0, 2, 3, 1)  # [B, KV, d, T]
        v = v.permute(0, 2, 1, 3)  # [B, KV, T, d]
        scale = d ** -0.5
        minus_inf = torch.finfo(h.dtype).min
        scores = torch.bmm(q, kt.reshape(b * nkv, d, t)).view(b, nkv, g * t, t) * scale
        scores = scores.masked_fill(~causal.repeat(g, 1), minus_inf)
        if past is not None:
            past_kt, past_v = past
            s = past_v.shape[2]
            old = torch.bmm(q, past_kt.reshape(b * nkv, d, s)).view(b, nkv, g * t, s) * scale
            scores = torch.cat((old.masked_fill(~filled, minus_inf), scores), dim=-1)
        probs = scores.float().softmax(dim=-1).to(h.dtype)
        vs = v.reshape(b * nkv, t, d)
        if past is None:
            o = torch.bmm(probs.reshape(b * nkv, g * t, t), vs)
        else:
            o = (torch.bmm(probs[..., :s].reshape(b * nkv, g * t, s),
                           past_v.reshape(b * nkv, s, d))
                 + torch.bmm(probs[..., s:].reshape(b * nkv, g * t, t), vs))
        o = o.view(b, nkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, nh * d)
        return o @ layer.o.t(), kt, v


@torch.library.custom_op("autotune_probe::cache_attention", mutates_args=())
def _cache_attention(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, past_kt: torch.Tensor,
                     past_v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Attention of the new tokens over the cache and themselves, as the graph's own
    (``_trt_model.ExportLlama._attention``): q ``[B, KV, G*T, d]`` group-major, kt
    ``[B, KV, d, T]``, v ``[B, KV, T, d]``, past ``[B, KV, d, S]`` / ``[B, KV, S, d]``."""
    t, s = positions.shape[0], past_v.shape[2]
    g = q.shape[2] // t
    scale = q.shape[-1] ** -0.5
    minus_inf = torch.finfo(q.dtype).min
    causal = positions[None, :] <= positions[:, None]
    filled = torch.arange(s, device=q.device)[None, :] < positions[:1, None]
    scores = ((q @ kt) * scale).masked_fill(~causal.repeat(g, 1), minus_inf)
    old = ((q @ past_kt) * scale).masked_fill(~filled, minus_inf)
    probs = torch.cat((old, scores), dim=-1).float().softmax(dim=-1).to(q.dtype)
    return probs[..., :s] @ past_v + probs[..., s:] @ v


@_cache_attention.register_fake
def _(q, kt, v, past_kt, past_v, positions):  # type: ignore[no-untyped-def]
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


class _CustomAttention(_trt_model.ExportLlama):
    """Attention over the cache as one op without a TensorRT converter: Torch-TensorRT runs it
    in PyTorch, so the engines (one per stretch between attentions) never see the cache."""

    def forward(self, tokens, positions, *cache):  # type: ignore[no-untyped-def]
        self._positions = positions
        return super().forward(tokens, positions, *cache)

    def _attention(self, h, layer, cos, sin, causal, filled, past):  # type: ignore[no-untyped-def]
        if past is None:
            return super()._attention(h, layer, cos, sin, causal, filled, past)
        spec = self.spec
        b, t = h.shape[0], h.shape[1]
        nh, nkv, d = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        g = nh // nkv
        q = (h @ layer.q.t()).view(b, t, nh, d)
        k = (h @ layer.k.t()).view(b, t, nkv, d)
        v = (h @ layer.v.t()).view(b, t, nkv, d)
        q = q * cos + _trt_model._rotate_half(q) * sin
        k = k * cos + _trt_model._rotate_half(k) * sin
        q = q.view(b, t, nkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, nkv, g * t, d)
        kt = k.permute(0, 2, 3, 1)  # [B, KV, d, T]
        v = v.permute(0, 2, 1, 3)  # [B, KV, T, d]
        o = torch.ops.autotune_probe.cache_attention(q, kt, v, past[0], past[1], self._positions)
        o = o.view(b, nkv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, nh * d)
        return o @ layer.o.t(), kt, v


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
          chunk: int | None) -> dict[str, Any]:
    import torch_tensorrt

    spec = dataclasses.replace(get_spec(model), num_hidden_layers=layers)
    options: tuple[tuple[str, Any], ...] = ()
    if chunk:
        options += (("prefill_chunk", chunk),)
    config = EngineConfig(model=model, engine="tensorrt", dtype="float16", device="cuda:0",
                          max_batch=max_batch, max_seq_len=isl + osl, options=options)
    shapes = _trt_build.BuildShapes.from_config(config, kv_cache=True)
    keys_plain = variant == "kplain"
    torch_ops = ["torch.ops.aten.bmm.default"] if variant in ("bmm", "pbmm") else []
    version = _trt_build.parse_version(torch_tensorrt.__version__)
    original_model, original_inputs = _trt_model.ExportLlama, _trt_build.BuildShapes.inputs
    original_options = tensorrt_engine.compile_options
    if variant.endswith("dyn"):  # context memory allocated per call, not held per engine
        if "dynamically_allocate_resources" not in inspect.signature(
                torch_tensorrt.dynamo.compile).parameters:
            raise RuntimeError("this Torch-TensorRT has no dynamically_allocate_resources")
        tensorrt_engine.compile_options = lambda v, d: {  # type: ignore[assignment]
            **original_options(v, d), "dynamically_allocate_resources": True}
    torch.cuda.empty_cache()
    base = _used()
    start = time.perf_counter()
    try:
        if variant == "pbmm":
            _trt_model.ExportLlama = _AttentionBmm  # type: ignore[misc]
        if variant in ("custom", "customdyn"):
            _trt_model.ExportLlama = _CustomAttention  # type: ignore[misc]
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
            tensorrt_engine.compile_options = original_options  # type: ignore[assignment]
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
            "kv_cache_bytes_max_batch": 2 * layers * max_batch * spec.num_key_value_heads
            * spec.head_dim * shapes.cache_len * 2,
        }
        ws = torch_tensorrt.runtime.weight_streaming(module)
        result["total_streamable"] = int(ws.total_device_budget)
        ws.device_budget = 0
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
        result["streamed_gb_s_decode"] = result["total_streamable"] / result["decode_s"] / 1e9
        del cache, module, ws
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
                                args.chunk or None)
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
