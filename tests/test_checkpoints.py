"""Local checkpoints (``--weights DIR``): Llama 3 style ones (grouped-query attention, llama3 or
linear rotary scaling, tied embeddings) run as transformers runs them; what the native runtime
does not implement is refused by name.

Each checkpoint is written by transformers itself (``save_pretrained``, safetensors), tiny, with
weights of std 0.1 so that greedy tokens change from step to step; the reference is the same
model in transformers, float32 on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from reference import greedy

from autotune.engines import EngineConfig, load_engine
from autotune.errors import UserInputError
from autotune.models import get_spec
from autotune.streaming.llama import rope_frequencies

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _checkpoint(directory: Path, rope_scaling: dict[str, Any] | None, tied: bool,
                family: str = "llama", **extra: Any) -> Any:
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_class(
        hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=rope_scaling, tie_word_embeddings=tied, **extra)
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.mark.parametrize("rope_scaling, tied, family", [
    (LLAMA3_ROPE, False, "llama"),  # Llama 3.1
    (LLAMA3_ROPE, True, "llama"),  # Llama 3.2 1B/3B: lm_head is the embedding
    ({"rope_type": "linear", "factor": 4.0}, False, "llama"),
    (None, False, "llama"),
    (None, False, "mistral"),  # Mistral 7B v0.2/v0.3: Llama's layers, no sliding window
], ids=["llama3", "llama3-tied", "linear", "plain", "mistral"])
def test_checkpoint_runs_as_transformers_runs_it(tmp_path: Path, rope_scaling, tied,
                                                 family) -> None:
    model = _checkpoint(tmp_path, rope_scaling, tied, family,
                        **({"sliding_window": None} if family == "mistral" else {}))
    spec = get_spec("ckpt", tmp_path)
    assert spec.num_key_value_heads == 2 and spec.rope_theta == 500000.0
    # The rotary frequencies are transformers' own, scaling included.
    torch.testing.assert_close(rope_frequencies(spec, "cpu"), model.model.rotary_emb.inv_freq,
                               rtol=1e-6, atol=0)
    engine = load_engine(EngineConfig(model="ckpt", weights=str(tmp_path), dtype="float32",
                                      device="cpu", max_seq_len=64))
    try:
        prompt = torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(1))
        expected, _ = greedy(model, prompt, 40)
        assert len(set(expected[0].tolist())) > 5  # the tokens move: a slip would show
        for fraction in (0.0, 0.5, 1.0):  # streamed or resident, the same tokens
            engine.device_budget = int(fraction * engine.total_device_budget)
            gen = engine.prefill(prompt, 40)
            engine.decode(gen, 39)
            assert torch.equal(gen.tokens, expected), fraction
    finally:
        engine.close()


def test_scaling_changes_the_frequencies_it_should() -> None:
    spec = get_spec("llama3-8b")
    plain = rope_frequencies(spec.__class__(**{**spec.__dict__, "rope_scaling": ()}), "cpu")
    scaled = rope_frequencies(spec, "cpu")
    assert torch.equal(scaled[:10], plain[:10])  # high frequencies untouched
    torch.testing.assert_close(scaled[-5:], plain[-5:] / 8.0)  # low ones slowed by the factor
    assert ((scaled < plain) & (scaled > plain / 8.0)).any()  # and a band blended between


@pytest.mark.parametrize("change, words", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 64}, "head_dim=64"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
])
def test_what_the_runtime_does_not_implement_is_refused(tmp_path: Path, change, words) -> None:
    _checkpoint(tmp_path, None, False)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(UserInputError, match="not (supported|implemented)") as info:
        get_spec("ckpt", tmp_path)
    assert words in str(info.value)


def test_a_sliding_window_bounds_the_sequences(tmp_path: Path) -> None:
    """Within Mistral's window its attention is Llama's; longer sequences would differ, so
    they are refused (a run's --isl + --osl is checked against the model's positions)."""
    from autotune.tune.study import RunOptions

    _checkpoint(tmp_path, None, False, "mistral", sliding_window=48)
    assert get_spec("ckpt", tmp_path).max_position_embeddings == 48
    with pytest.raises(UserInputError, match="exceeds ckpt's 48 positions"):
        RunOptions(model="ckpt", weights=str(tmp_path), device="cpu", isl=40, osl=16)


def test_other_model_types_are_refused(tmp_path: Path) -> None:
    _checkpoint(tmp_path, None, False)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "model_type": "qwen2"}))
    with pytest.raises(UserInputError, match="model_type 'qwen2' is not supported"):
        get_spec("ckpt", tmp_path)


def test_cli_tunes_a_checkpoint_named_after_its_folder(tmp_path: Path, cli_env) -> None:
    """`autotune run --weights DIR` end to end: the native engine streams the checkpoint's own
    weights, and the study and its JSON are named after the folder, not a preset."""
    from test_cli import autotune

    from autotune.results import recommend

    directory = tmp_path / "My-Llama-3.2-Tiny"
    _checkpoint(directory, LLAMA3_ROPE, True)
    out = tmp_path / "rec.json"
    r = autotune("run", "--weights", str(directory), "--device", "cpu", "--trials", "2",
                 "--isl", "8", "--osl", "4", "--max-batch", "4", "--repeats", "1",
                 "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--out", str(out),
                 env=cli_env)
    assert r.returncode == 0, r.stderr
    assert "autotune: My-Llama-3.2-Tiny on cpu" in r.stderr
    rec = recommend.read(out)
    assert rec["workload"]["model"] == "My-Llama-3.2-Tiny"
    assert rec["workload"]["weights"] == str(directory)
    assert rec["study"]["name"].startswith("My-Llama-3.2-Tiny-native-float32")


def test_the_llama32_1b_preset_is_the_public_model() -> None:
    """1.24B parameters with the head tied to the embedding (the public figure), and random
    weights that honour the tie, as transformers' tied model does."""
    from autotune.models import weight_source

    spec = get_spec("llama3.2-1b")
    head = spec.vocab_size * spec.hidden_size
    assert spec.tie_word_embeddings and spec.distinct_params() == 1_235_814_400
    assert spec.num_params() == spec.distinct_params() + head  # engines hold the head too
    assert spec.hf_config().tie_word_embeddings and spec.head_dim == 64
    source = weight_source(spec)
    shape = (spec.vocab_size, spec.hidden_size)
    assert torch.equal(source.get("lm_head.weight", shape, torch.float16, "cpu"),
                       source.get("model.embed_tokens.weight", shape, torch.float16, "cpu"))


def test_the_tensorrt_default_batch_leaves_room_for_its_context() -> None:
    """TensorRT held about one more KV cache of the largest batch a build serves (H200):
    llama2-7b at 8 GiB, isl 128 + osl 256, is built for 17 sequences, not the 42 whose
    caches alone would fit (that build needed 9.32 GiB at batch 1)."""
    from autotune.engines.memory import trt_max_batch

    assert trt_max_batch(get_spec("llama2-7b"), "float16", 384, 8 * 2**30) == 17
    assert trt_max_batch(get_spec("llama2-7b"), "float16", 384, 2**30) == 1  # never below 1
    # attention=torch: no engine holds a copy of the cache, each sequence costs its cache once
    assert trt_max_batch(get_spec("llama2-7b"), "float16", 384, 8 * 2**30, False) == 35


_CONFIG = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 512, "max_position_embeddings": 256}


@pytest.mark.parametrize(("config", "match"), [
    ([1, 2], "config.json is a JSON list; a Hugging Face config is an object"),
    ("café".encode("latin-1"), "config.json is not valid JSON \\(UnicodeDecodeError"),
    ({"num_attention_heads": 0}, "num_attention_heads: expected a whole number, 1 or more; got 0"),
    ({"hidden_size": "64"}, "hidden_size: expected a whole number, 1 or more; got '64'"),
    ({"num_hidden_layers": 0}, "num_hidden_layers: expected a whole number"),
    ({"vocab_size": 0}, "vocab_size: expected a whole number"),
    ({"num_key_value_heads": True}, "num_key_value_heads: expected a whole number"),
    ({"rms_norm_eps": -1}, "rms_norm_eps: expected a number above 0"),
    ({"rope_theta": float("nan")}, "rope_theta: expected a number above 0"),
    ({"head_dim": 0}, "head_dim: expected a whole number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "4"}}, "rope_scaling factor: expected"),
    ({"rope_scaling": "linear"}, "rope_scaling: expected a JSON object"),
], ids=["list", "latin-1", "heads-0", "hidden-str", "layers-0", "vocab-0", "kv-bool", "eps",
        "theta-nan", "head-dim-0", "factor-str", "scaling-str"])
def test_every_config_field_is_checked_by_name(tmp_path: Path, config: Any, match: str) -> None:
    """Issue 19: these gave AttributeError, UnicodeDecodeError, ZeroDivisionError, `max() arg
    is an empty sequence`, `range() arg 3 must not be zero` or a misleading head_dim."""
    if isinstance(config, dict):
        config = json.dumps({**_CONFIG, **config})
    elif not isinstance(config, bytes):
        config = json.dumps(config)
    (tmp_path / "config.json").write_bytes(config if isinstance(config, bytes)
                                           else config.encode())
    with pytest.raises(UserInputError, match=match):
        get_spec("auto", tmp_path)


def test_a_symlink_loop_is_said_as_such(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(UserInputError, match="cannot be followed"):
        get_spec("auto", tmp_path / "loop")


def test_a_checkpoint_is_not_labelled_as_a_preset_it_is_not(tmp_path: Path) -> None:
    """Issue 19: --model llama2-7b --weights <a 2-layer checkpoint> labelled everything
    llama2-7b, and the reproduce line would bench the real 7B; it also lacked --weights."""
    from autotune.results.recommend import _bench_command

    (tmp_path / "config.json").write_text(json.dumps(_CONFIG))
    with pytest.raises(UserInputError, match="--model llama2-7b is a preset .32 layers.*"
                       "is 2 layers.*leave --model out"):
        get_spec("llama2-7b", tmp_path)
    assert get_spec("good", tmp_path).num_hidden_layers == 2  # a name of its own is fine
    folder = tmp_path / "my ckpt"
    line = _bench_command({"model": "good", "engine": "native", "dtype": "float32", "isl": 8,
                           "osl": 4, "weights": str(folder), "gpu": "cpu"},
                          {"batch": 2, "device_budget_bytes": 0})
    assert "--model good" in line and f"--weights '{folder}'" in line
