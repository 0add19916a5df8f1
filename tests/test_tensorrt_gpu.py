"""The Torch-TensorRT engine against the real package, on a GPU (marked ``gpu``).

What the double cannot say: that the exported model converts and builds with weight streaming,
that a second load compiles nothing, that tokens follow transformers', and that the memory
plan (calibrated with NVML at load) predicts what NVML then sees. Skipped unless the real
``torch_tensorrt`` is installed beside a CUDA GPU (TensorRT-RTX from PyPI serves).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from autotune.engines import EngineConfig, load_engine
from autotune.engines._trt_build import import_torch_tensorrt
from autotune.measure.timing import measure, random_prompt
from autotune.models import build_hf_model, get_spec, weight_source

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("torch_tensorrt") is None or not torch.cuda.is_available():
        pytest.skip("the real torch_tensorrt is not installed here (or no GPU)")
    return tmp_path_factory.mktemp("trt")


def _config(cache_dir: Path, *options: tuple[str, Any], **kw: Any) -> EngineConfig:
    fields = {"model": "tiny-llama", "engine": "tensorrt", "dtype": "float32", "device": "cuda",
              "max_batch": 8, "max_seq_len": 48, **kw}
    return EngineConfig(**fields, options=(("trt_cache_dir", str(cache_dir)), *options))


def test_second_load_compiles_nothing_and_generates_the_same(cache_dir: Path) -> None:
    first = load_engine(_config(cache_dir))
    facts = first.describe()
    assert not facts["cache_hit"] and facts["compile_s"] > 0
    assert facts["versions"]["tensorrt_backend"] in ("tensorrt", "tensorrt_rtx")
    # The default (auto): attention in PyTorch where the Python runtime serves it (up to 2.12).
    import torch_tensorrt

    from autotune.engines._trt_build import parse_version

    old = parse_version(torch_tensorrt.__version__) < (2, 13)
    assert facts["attention"] == ("torch" if old else "tensorrt")
    prompt = random_prompt(2, 6, first.spec.vocab_size, 0, "cuda")
    a = first.prefill(prompt, 5)
    first.decode(a, 4)
    tokens = a.tokens.clone()
    first.close()
    second = load_engine(_config(cache_dir))
    assert second.describe()["cache_hit"] and second.describe()["compile_s"] == 0
    b = second.prefill(prompt, 5)
    second.decode(b, 4)
    assert torch.equal(tokens, b.tokens)
    second.close()


@pytest.mark.parametrize(("attention", "specialization"),
                         [("tensorrt", None), ("torch", None), ("torch", "none")])
def test_tokens_follow_transformers_and_do_not_depend_on_the_budget(
        cache_dir: Path, attention: str, specialization: str | None) -> None:
    # The 9-token prompt goes through in three calls of 4, 4 and 1 tokens. With
    # kernel_specialization (TensorRT-RTX only), the contexts autotune makes get it.
    options: tuple[tuple[str, Any], ...] = (("prefill_chunk", "4"), ("attention", attention))
    if specialization is not None:
        import_torch_tensorrt()  # which aliases "tensorrt" to the backend it runs on
        if getattr(sys.modules.get("tensorrt"), "_package_name", "") != "tensorrt_rtx":
            pytest.skip("kernel_specialization is TensorRT-RTX's")
        options += (("kernel_specialization", specialization),)
    engine = load_engine(_config(cache_dir, *options))
    spec = get_spec("tiny-llama")
    prompt = random_prompt(3, 9, spec.vocab_size, 1, "cuda")
    ref = build_hf_model(spec, "float32", "cuda", weight_source(spec, 0))
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            logits = ref(input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for budget in (engine.total_device_budget, 0, engine.total_device_budget // 2):
        engine.device_budget = budget
        gen = engine.prefill(prompt, 6)
        engine.decode(gen, 5)
        assert torch.equal(gen.tokens, seq[:, 9:]), f"budget {budget}"
    engine.close()


@pytest.mark.parametrize("attention", ["tensorrt", "torch"])
def test_memory_plan_predicts_nvml_within_5_percent(cache_dir: Path, attention: str) -> None:
    engine = load_engine(_config(cache_dir, ("attention", attention)))
    assert engine.calibration is not None
    parts = engine.describe()["memory_calibration"]["parts"]
    assert parts["batch"] > 0
    assert 0 <= parts["torch_live_after_freed"] <= parts["torch_reserved_after_freed"]
    assert parts["torch_reserved_after_freed"] < parts["nvml_after_freed"]
    total = engine.total_device_budget
    for batch, budget in ((1, 0), (8, 0), (8, total), (4, total // 2)):
        engine.device_budget = budget
        m = measure(engine, batch, 16, 8, repeats=1, warmup=1)
        plan = engine.memory_plan(batch, 16, 8, budget).total
        assert abs(plan - m.nvml_used_bytes) <= 0.05 * m.nvml_used_bytes, (batch, budget)
    engine.close()
