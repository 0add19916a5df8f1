"""Torch-TensorRT engine behaviour beyond the contract, against the torch_tensorrt double.

What only the TensorRT engine has: the install message, version gates and per-version compile
options, the on-disk cache, the cost of budget changes (context rebuilds), the read-back of a
rejected budget, the automatic budget applied at load, and numerics against transformers. A
few tests pin the double itself to the research note, since the engine's tests are only as
good as it is.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
from doubles import DOUBLES_DIR, TRT_MODEL, install_torch_tensorrt, uninstall_torch_tensorrt
from reference import greedy

from autotune.engines import EngineConfig, load_engine
from autotune.engines import tensorrt as tensorrt_engine
from autotune.engines.memory import prefill_activation_bytes
from autotune.engines.tensorrt import TensorRTEngine
from autotune.errors import EngineUnavailableError, UserInputError
from autotune.models import build_hf_model, get_spec, weight_source

# One xdist worker runs every test of the torch_tensorrt double (pyproject: --dist loadgroup):
# its exports of TRT_MODEL are kept within a process (tests/doubles), and made once, not once
# per worker.
pytestmark = pytest.mark.xdist_group("torch_tensorrt_double")

ROOT = Path(__file__).resolve().parents[1]
# The cache mask's comparison in PyTorch splits the graph into two engines around it.
SPLIT = ("torch_executed_ops", ("torch.ops.aten.lt.Tensor",))


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Any]:
    version = getattr(request, "param", "2.13.0")
    yield install_torch_tensorrt(monkeypatch, version)
    uninstall_torch_tensorrt()


def _config(cache: Path, *options: tuple[str, Any], **kw: Any) -> EngineConfig:
    # Seed 7, not EngineConfig's 0: the tests that compare tokens with transformers' check that
    # the seed reaches the weights, and the tests (and test_engine_contract's) of one dtype and
    # profile share one export of the model (tests/doubles).
    # Attention inside TensorRT unless a test says otherwise: these tests run many versions,
    # and auto (the default) resolves by the version (the attention tests below).
    fields = {"model": TRT_MODEL, "engine": "tensorrt", "dtype": "float32", "device": "cpu",
              "max_batch": 4, "max_seq_len": 32, "seed": 7, **kw}
    if not any(key == "attention" for key, _ in options):
        options = (("attention", "tensorrt"), *options)
    return EngineConfig(**fields, options=(("trt_cache_dir", str(cache)), *options))


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import fails like a missing one
    with pytest.raises(EngineUnavailableError) as info:
        load_engine(_config(Path("unused")))
    message = str(info.value)
    assert "pip install 'autotune[tensorrt]'" in message and "pypi.nvidia.com" in message
    assert "pip install 'autotune[tensorrt-rtx]'" in message
    assert "\n" not in message


def test_the_cli_prints_the_install_hint_with_its_brackets(cli_env: dict[str, str]) -> None:
    # rich would read "[tensorrt]" as markup and print "pip install 'autotune'".
    done = subprocess.run(
        [sys.executable, "-m", "autotune", "bench", "--model", "tiny-llama", "--device", "cpu",
         "--engine", "tensorrt", "--batch", "1", "--budget-fraction", "0"],
        env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'autotune[tensorrt-rtx]'" in done.stderr
    assert "pip install 'autotune[tensorrt]'" in done.stderr


def test_importing_autotune_never_imports_torch_tensorrt() -> None:
    # The double is importable in the child, so any import of it would be seen.
    code = ("import sys, autotune, autotune.engines, autotune.engines.tensorrt, "
            "autotune.engines.base; assert 'torch_tensorrt' not in sys.modules, 'imported'; "
            "import torch_tensorrt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DOUBLES_DIR), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("trt", ["2.5.0"], indirect=True)
def test_versions_without_weight_streaming_are_refused(trt: Any, tmp_path: Path) -> None:
    assert not hasattr(trt.runtime, "weight_streaming")
    with pytest.raises(EngineUnavailableError, match=r"needs torch_tensorrt >= 2\.6.*2\.5\.0"):
        load_engine(_config(tmp_path))


@pytest.mark.parametrize("trt", ["2.6.0", "2.10.0", "2.12.0", "2.13.0", "2.14.0a0"],
                         indirect=True)
def test_compile_options_follow_the_version(trt: Any, tmp_path: Path) -> None:
    engine = load_engine(_config(tmp_path))
    call = trt._state.COMPILE_CALLS[-1]
    assert call["enable_weight_streaming"] is True
    old = call["version"] < (2, 13)
    assert ("use_explicit_typing" in call) == old
    assert ("enabled_precisions" in call) == old
    if old:
        assert call["use_explicit_typing"] is True
        assert call["enabled_precisions"] == {torch.float32}
    tokens, positions, *cache = call["inputs"]
    # Tokens of one call: 1 (a decode step, where kernels are tuned) up to the longest prompt.
    assert tokens.shape == {"min_shape": (1, 1), "opt_shape": (4, 1), "max_shape": (4, 31)}
    assert positions.shape == {"min_shape": (1,), "opt_shape": (1,), "max_shape": (31,)}
    spec = engine.spec
    # Each layer's keys (transposed) and values, one input each: no slicing in the engine.
    kv, d = spec.num_key_value_heads, spec.head_dim
    assert len(cache) == 2 * spec.num_hidden_layers
    for i, tail in enumerate([(kv, d, 32), (kv, 32, d)] * spec.num_hidden_layers):
        assert cache[i].shape == {f"{k}_shape": (b, *tail)
                                  for k, b in (("min", 1), ("opt", 4), ("max", 4))}
    assert engine.describe()["built_for"]["batch"] == {"min": 1, "opt": 4, "max": 4}


@pytest.mark.parametrize("trt", ["2.8.0"], indirect=True)
def test_float16_study_on_old_versions_still_compiles_float16_layers(
    trt: Any, tmp_path: Path,
) -> None:
    engine = load_engine(_config(tmp_path, dtype="float16"))
    call = trt._state.COMPILE_CALLS[-1]
    assert call["enabled_precisions"] == {torch.float32}  # all 2.6-2.12 accept
    weights = [t for _, m in engine._module.named_children() if hasattr(m, "engine")
               for t in m.engine.graph.buffers() if t.dim() >= 2 and t.is_floating_point()]
    assert weights and all(t.dtype == torch.float16 for t in weights)  # strong typing


def test_second_load_reuses_the_cache(trt: Any, tmp_path: Path) -> None:
    first = load_engine(_config(tmp_path, SPLIT))
    assert first.describe()["torch_executed_ops"] == list(SPLIT[1])
    built = trt._state.COUNTERS["engines_built"]
    calls = len(trt._state.COMPILE_CALLS)
    # As --engine-option gives it: one string, the same build (a cache hit).
    second = load_engine(_config(tmp_path, ("torch_executed_ops", ",".join(SPLIT[1]))))
    assert not first.describe()["cache_hit"] and second.describe()["cache_hit"]
    assert trt._state.COUNTERS["engines_built"] == built and len(trt._state.COMPILE_CALLS) == calls
    # The rebuilt module still exposes its engines to weight_streaming (research note §1.1).
    assert second.total_device_budget == first.total_device_budget > 0
    assert second.describe()["engines"] == ["_run_on_acc_0", "_run_on_acc_2"]
    prompt = torch.randint(1, 500, (2, 6))
    a, b = first.prefill(prompt, 4), second.prefill(prompt, 4)
    first.decode(a, 3)
    second.decode(b, 3)
    assert torch.equal(a.tokens, b.tokens)


def test_cache_key_includes_versions_and_corrupt_files_are_misses(
    trt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    load_engine(_config(tmp_path))
    monkeypatch.setattr(trt, "__version__", "2.14.0")
    assert not load_engine(_config(tmp_path)).describe()["cache_hit"]
    for file in tmp_path.glob("*/module.pt"):
        file.write_bytes(b"not a cache file")
    assert not load_engine(_config(tmp_path)).describe()["cache_hit"]


def test_the_cache_holds_each_engine_as_its_raw_bytes(trt: Any, tmp_path: Path) -> None:
    """No base64, no second copy: each engine file is the serialized engine, and the module
    drops its own copy once the engine is set up (TensorRT holds the weights)."""
    engine = load_engine(_config(tmp_path, SPLIT))
    entry = Path(engine.describe()["cache_path"])
    children = dict(engine._module.named_children())
    for name in engine.describe()["engines"]:
        assert (entry / f"{name}.engine").read_bytes() == children[name].engine.serialized
        assert children[name].serialized_engine is None
    engines = sum(f.stat().st_size for f in entry.glob("*.engine"))
    assert (entry / "module.pt").stat().st_size < engines  # the skeleton is small beside them


@pytest.mark.parametrize("trt", ["2.12.0", "2.13.0", "2.14.0a0"], indirect=True)
def test_budget_changes_rebuild_every_context(trt: Any, tmp_path: Path) -> None:
    engine = load_engine(_config(tmp_path, SPLIT))
    mods = [m for n, m in engine._module.named_children() if "_run_on_acc" in n]
    prompt = torch.randint(1, 500, (2, 6))
    engine.prefill(prompt, 1)
    before = [m.engine.contexts_created for m in mods]
    resets = [m.engine.graph_resets for m in mods]
    engine.device_budget = engine.total_device_budget // 2
    engine.prefill(prompt, 1)  # a lazy (2.13) context is re-created on this forward
    assert [m.engine.contexts_created for m in mods] == [b + 1 for b in before]
    assert [m.engine.graph_resets for m in mods] == [r + 1 for r in resets]
    described = engine.describe()
    assert described["budget_changes"] == 1 and described["context_rebuilds"] == len(mods)
    engine.device_budget = engine.device_budget  # same budget: nothing is rebuilt
    assert [m.engine.contexts_created for m in mods] == [b + 1 for b in before]
    assert type(engine).budget_change_cost == "high"


def test_rejected_budget_is_read_back_and_warned(
    trt: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    engine = load_engine(_config(tmp_path))
    engine.prefill(torch.randint(1, 500, (1, 4)), 1)  # a live context (2.13: lazy)
    trt._state.FAULTS["keep_context_on_set"] = True  # pytorch/TensorRT#4333
    with caplog.at_level(logging.WARNING):
        engine.device_budget = 0
    assert engine.device_budget == engine.total_device_budget  # what TensorRT kept
    assert any("not the 0 requested" in r.getMessage() for r in caplog.records)


def test_automatic_budget_is_applied_at_load_and_recorded(trt: Any, tmp_path: Path) -> None:
    trt._state.FREE_DEVICE_MEMORY = 200_000  # less than each engine's streamable bytes
    engine = load_engine(_config(tmp_path, SPLIT, ("trt_cache", False)))
    engines = engine.describe()["engine_streamable_bytes"]
    expected = sum(min(s, 200_000) for s in engines)  # each engine counts the same free memory
    assert engine.describe()["automatic_budget_at_load"] == expected == engine.device_budget
    assert engine.get_automatic_weight_streaming_budget() == expected


def test_tokens_match_transformers_greedy(trt: Any, tmp_path: Path) -> None:
    engine = load_engine(_config(tmp_path, SPLIT, seed=7))
    engine.device_budget = engine.total_device_budget // 3
    prompt = torch.randint(1, 500, (3, 9), generator=torch.Generator().manual_seed(1))
    gen = engine.prefill(prompt, 8)
    engine.decode(gen, 7)
    spec = get_spec(TRT_MODEL)
    expected, _ = greedy(build_hf_model(spec, "float32", "cpu", weight_source(spec, 7)), prompt, 8)
    assert torch.equal(gen.tokens, expected)


def test_memory_plan_reserves_activations_for_the_max_shape(trt: Any, tmp_path: Path) -> None:
    engine = load_engine(_config(tmp_path))
    spec = engine.spec
    longest_call = engine.describe()["built_for"]["seq"]["max"]  # the longest prompt
    floor = prefill_activation_bytes(spec, "float32", 4, longest_call)
    one, four = engine.memory_plan(1, 4, 4, 0), engine.memory_plan(4, 4, 4, 0)
    assert one.activations >= floor and four.activations >= floor
    # The static cache and the prefill's new keys and values, per sequence.
    assert four.kv_cache == 4 * one.kv_cache == 4 * spec.kv_bytes_per_token("float32") * (32 + 4)
    assert one.streaming_scratch > 0
    assert engine.memory_plan(1, 4, 4, engine.total_device_budget).streaming_scratch == 0


# -- the double against the research note ---------------------------------------------------


def test_double_weight_streaming_rules(trt: Any, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    engine = load_engine(_config(tmp_path, SPLIT))
    module = engine._module
    names = [n for n, _ in module.named_children()]
    assert names == ["_run_on_acc_0", "_run_on_gpu_1", "_run_on_acc_2"]
    ws = trt.runtime.weight_streaming(module)
    sizes = ws.streamable_budget
    assert ws.total_device_budget == sum(sizes)  # _run_on_gpu_1 is not counted (§1.1)
    ws.device_budget = 1001  # int() of each proportional share (§1.2)
    assert ws.device_budget == sum(int(s / sum(sizes) * 1001) for s in sizes)
    with trt.runtime.weight_streaming(module) as inner:
        inner.device_budget = 0
    # __exit__ re-splits the construction-time sum, so truncation may lose a byte per engine.
    restored = trt.runtime.weight_streaming(module).device_budget
    assert 0 <= ws.device_budget - restored <= len(sizes) - 1
    with pytest.raises(RuntimeError, match="negative"):
        ws.device_budget = -1
    with caplog.at_level(logging.ERROR):
        ws.device_budget = ws.total_device_budget + 1
    assert ws.device_budget == ws.total_device_budget and caplog.records
    with pytest.raises(RuntimeError, match="enable_weight_streaming"):
        trt.runtime.weight_streaming(torch.nn.Linear(2, 2)).device_budget = 0


@pytest.mark.parametrize("trt", ["2.8.0", "2.11.0"], indirect=True)
def test_double_asserts_like_old_versions(trt: Any) -> None:
    ep = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    inputs = [trt.Input(shape=(2, 4))]
    if trt._state.version() < (2, 10):
        with pytest.raises(AssertionError, match="use_explicit_typing"):
            trt.dynamo.compile(ep, inputs=inputs, enable_weight_streaming=True)
    else:
        with pytest.warns(DeprecationWarning):
            trt.dynamo.compile(ep, inputs=inputs, enable_weight_streaming=True)
    with pytest.raises(AssertionError, match="enabled_precisions"):
        trt.dynamo.compile(ep, inputs=inputs, enable_weight_streaming=True,
                           use_explicit_typing=True, enabled_precisions={torch.half})


def test_without_kv_cache_the_tutorial_mode_gives_the_same_tokens(trt: Any,
                                                                  tmp_path: Path) -> None:
    cached = load_engine(_config(tmp_path))
    plain = load_engine(_config(tmp_path, ("kv_cache", "false")))  # as --engine-option gives it
    assert cached.uniform_decode_steps and not plain.uniform_decode_steps
    tokens, positions = trt._state.COMPILE_CALLS[-1]["inputs"]  # no cache input
    assert tokens.shape["max_shape"] == (4, 32) and positions.shape["max_shape"] == (32,)
    assert plain.memory_plan(2, 8, 8, 0).kv_cache == 0
    prompt = torch.randint(1, 500, (2, 7), generator=torch.Generator().manual_seed(3))
    a, b = cached.prefill(prompt, 9), plain.prefill(prompt, 9)
    cached.decode(a, 8)
    plain.decode(b, 8)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(UserInputError, match="kv_cache: expected true or false"):
        load_engine(_config(tmp_path, ("kv_cache", "maybe")))


def test_profile_serves_prompts_up_to_the_studys_isl_only(trt: Any, tmp_path: Path) -> None:
    # TensorRT reserves context memory for the longest call: a profile up to isl + osl - 1
    # tokens made llama2-7b need 10.5 GiB at batch 1 on the H200 (isl 128 is what runs).
    # (isl 3: the profile of the chunked test below, so the two share one export of the model.)
    load_engine(_config(tmp_path, max_prompt_len=3))
    tokens, positions, *_ = trt._state.COMPILE_CALLS[-1]["inputs"]
    assert tokens.shape["max_shape"] == (4, 3) and positions.shape["max_shape"] == (3,)


def test_prompts_go_through_in_chunks_with_the_same_tokens(trt: Any, tmp_path: Path) -> None:
    """No call is larger than batch x prefill_chunk tokens (TensorRT reserves activation
    memory for the largest call), and chunking changes no token."""
    engine = load_engine(_config(tmp_path, ("prefill_chunk", 3), max_prompt_len=16))
    tokens, positions, *_ = trt._state.COMPILE_CALLS[-1]["inputs"]
    assert tokens.shape["max_shape"] == (4, 3) and positions.shape["max_shape"] == (3,)
    assert "prompts in chunks of 3 tokens" in engine.describe()["summary"]
    spec = get_spec(TRT_MODEL)
    prompt = torch.randint(1, spec.vocab_size, (2, 10))
    gen = engine.prefill(prompt, 6)
    engine.decode(gen, 5)
    expected, _ = greedy(build_hf_model(spec, "float32", "cpu", weight_source(spec, 7)), prompt, 6)
    assert torch.equal(gen.tokens, expected)


@pytest.mark.parametrize(("trt", "resolved"), [("2.11.0", "torch"), ("2.12.0", "torch"),
                                              ("2.13.0", "tensorrt")], indirect=["trt"])
def test_attention_defaults_to_pytorch_where_the_contexts_share_one_buffer(
        trt: Any, resolved: str, tmp_path: Path) -> None:
    """auto, the default: attention in PyTorch up to 2.12 (the Python runtime's contexts on one
    buffer: batch 19 where attention in TensorRT fit 13, llama2-7b at 8 GiB), in TensorRT from
    2.13 (each per-call context would hold its own streaming scratch). The engine says what it
    resolved to, and which option gives it."""
    from autotune.engines._trt_build import resolve_attention

    config = EngineConfig(model=TRT_MODEL, engine="tensorrt", dtype="float32", device="cpu",
                          max_batch=4, max_seq_len=32, seed=7,
                          options=(("trt_cache_dir", str(tmp_path)),))
    facts = load_engine(config).describe()
    assert facts["attention"] == resolved
    assert resolve_attention("auto") == resolved
    assert TensorRTEngine.options_giving(facts) == {"attention": resolved}
    assert resolve_attention("tensorrt") == "tensorrt"  # a value given is kept


def test_attention_auto_reads_the_version_without_importing_torch_tensorrt(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuner (the CLI's default max batch, a resumed study's check) resolves auto from the
    installed distribution's version: importing Torch-TensorRT would load TensorRT into a
    process that never touches CUDA. Without one, or with an unreadable one, tensorrt (the
    load then says what is wrong)."""
    from importlib import metadata

    from autotune.engines._trt_build import resolve_attention

    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # not imported here
    installed = {"torch-tensorrt-rtx": "2.11.0"}
    monkeypatch.setattr(metadata, "packages_distributions",
                        lambda: {"torch_tensorrt": list(installed)})
    monkeypatch.setattr(metadata, "version", lambda dist: installed[dist])
    assert resolve_attention("auto") == "torch"
    installed["torch-tensorrt-rtx"] = "2.13.0"
    assert resolve_attention("auto") == "tensorrt"
    installed["torch-tensorrt-rtx"] = "nonsense"
    assert resolve_attention("auto") == "tensorrt"
    installed.clear()
    assert resolve_attention("auto") == "tensorrt"
    assert sys.modules["torch_tensorrt"] is None  # nothing imported it


def test_a_study_measured_before_auto_resumes_only_with_attention_in_tensorrt(
        tmp_path: Path) -> None:
    """A study whose trials ran attention inside TensorRT (the default before auto) is not
    resumed where auto resolves to PyTorch: its message names the option that gives its own
    engines, and its bench line spells it out."""
    import optuna

    from autotune.results.recommend import _engine_options
    from autotune.tune.study import check_resolved

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'old.db'}", study_name="old",
                                direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=49.0))
    study.set_user_attr("engine", {"engine": "tensorrt", "attention": "tensorrt"})
    check_resolved(study, "tensorrt", {"attention": "tensorrt"})  # the same engines: goes on
    with pytest.raises(UserInputError, match=r"attention 'tensorrt' \(this run: 'torch'\); "
                                             r"resume it with --engine-option attention=tensorrt"):
        check_resolved(study, "tensorrt", {"attention": "torch"})
    attrs = {"engine": {"attention": "torch"}, "run_options": {"engine_options": []}}
    assert _engine_options({"engine": "tensorrt"}, attrs) == [["attention", "torch"]]


@pytest.mark.parametrize("trt", ["2.11.0"], indirect=True)
def test_a_study_from_before_auto_is_refused_on_its_attention_before_any_load(
        trt: Any, tmp_path: Path) -> None:
    """Resumed where auto resolves to PyTorch, a study whose engines ran attention in TensorRT
    is refused at once (no compile), on its attention, not on the default max batch that
    follows it (17 then, 35 now for llama2-7b at 8 GiB); typed out, it resumes."""
    import dataclasses

    import optuna

    from autotune.storage import close_storage
    from autotune.tune.study import RunOptions, create_or_load

    old = RunOptions(model=TRT_MODEL, engine="tensorrt", device="cpu", dtype="float32",
                     isl=8, osl=4, max_batch=17, storage=f"sqlite:///{tmp_path / 'old.db'}",
                     study_name="old")
    study, created = create_or_load(old, "cpu")
    assert created
    study.add_trial(optuna.trial.create_trial(value=49.0))
    study.set_user_attr("engine", {"engine": "tensorrt", "attention": "tensorrt"})
    close_storage(study._storage)
    with pytest.raises(UserInputError, match=r"attention 'tensorrt' \(this run: 'torch'\); "
                                             r"resume it with --engine-option attention=tensorrt"):
        create_or_load(dataclasses.replace(old, max_batch=35), "cpu")
    typed = dataclasses.replace(old, engine_options=(("attention", "tensorrt"),))
    study, created = create_or_load(typed, "cpu")
    assert not created and len(study.trials) == 1
    close_storage(study._storage)


def test_a_study_runs_the_default_attention_in_its_workers(cli_env: dict[str, str],
                                                           tmp_path: Path) -> None:
    """End to end, through the CLI and its worker processes (the double on their path, its
    version from their environment): on 2.11 auto runs attention in PyTorch and the
    recommendation's bench line spells it out; resumed where the workers resolve auto
    otherwise (2.13), the study is refused once its worker has loaded, naming the option that
    gives its own engines, and keeps its trials."""
    import json

    env = dict(cli_env, AUTOTUNE_TEST_TRT_VERSION="2.11.0",
               PYTHONPATH=os.pathsep.join([str(DOUBLES_DIR), cli_env["PYTHONPATH"]]))
    storage = f"sqlite:///{tmp_path / 'trt.db'}"
    run = [sys.executable, "-m", "autotune", "run", "--model", "tiny-llama", "--engine",
           "tensorrt", "--device", "cpu", "--isl", "8", "--osl", "4", "--storage", storage,
           "--study", "trt", "--out", str(tmp_path / "rec.json")]
    first = subprocess.run([*run, "--trials", "2"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["reproduce"].endswith("--engine-option attention=torch"), rec["reproduce"]
    again = subprocess.run([*run, "--trials", "3"], capture_output=True, text=True, timeout=300,
                           env=dict(env, AUTOTUNE_TEST_TRT_VERSION="2.13.0"))
    assert again.returncode != 0
    assert ("attention 'torch' (this run: 'tensorrt'); resume it with --engine-option "
            "attention=torch") in again.stderr, again.stderr
    import optuna

    assert len(optuna.load_study(study_name="trt", storage=storage).trials) == 2


def test_attention_in_pytorch_keeps_the_cache_out_of_every_engine(trt: Any,
                                                                  tmp_path: Path) -> None:
    """attention=torch: the custom op has no converter, so it runs in PyTorch between the
    engines (embedding to layer 0's projections, one per layer after it); no engine takes a
    cache tensor, and the tokens are transformers' greedy ones, as by default (at the default
    profile: the export the other tests share)."""
    spec = get_spec(TRT_MODEL)
    engine = load_engine(_config(tmp_path, ("attention", "torch"), max_prompt_len=16))
    default = load_engine(_config(tmp_path))
    assert engine.describe()["attention"] == "torch"
    between = f"attention in PyTorch between {spec.num_hidden_layers + 1} engines"
    assert between in engine.describe()["summary"]
    assert len(engine.describe()["engines"]) == spec.num_hidden_layers + 1
    assert len(default.describe()["engines"]) == 1
    inputs = {n: list(getattr(engine._module, n).input_binding_names)
              for n in engine.describe()["engines"]}
    assert not [n for names in inputs.values() for n in names
                if re.fullmatch(r"cache_\d+", n)], inputs
    # Nor a size (Torch-TensorRT's shape inputs, sym_size_int_N, read back to the host).
    assert not [n for names in inputs.values() for n in names if "sym_size" in n], inputs
    # Each layer's new keys and values leave the graph from the PyTorch stretch that made them:
    # no engine takes every layer's to stack them (a second copy of a prefill call's, held at
    # once).
    output = next(n for n in engine._module.graph.nodes if n.op == "output")
    new_kv = output.args[0][1:]
    assert len(new_kv) == 2 * spec.num_hidden_layers
    makers = {str(n.args[0].target) for n in new_kv if n.target is operator.getitem}
    assert len(makers) == spec.num_hidden_layers, makers
    assert len(list(tmp_path.glob("*"))) == 2  # each layout its own cache entry
    prompt = torch.randint(1, spec.vocab_size, (2, 10))
    expected, _ = greedy(build_hf_model(spec, "float32", "cpu", weight_source(spec, 7)), prompt, 6)
    for e in (engine, default):
        gen = e.prefill(prompt, 6)
        e.decode(gen, 5)
        assert torch.equal(gen.tokens, expected)
    with pytest.raises(UserInputError, match="attention: expected one of auto, tensorrt, torch"):
        load_engine(_config(tmp_path, ("attention", "cuda")))


def test_attention_in_pytorch_hands_the_next_engine_no_derived_dimension(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the attention op gives the engine after it has dimensions that are each an
    integer or one of export's own symbols (batch, call length), never an expression of them
    such as G * T: Torch-TensorRT gives such an input a profile from its symbolic range, which
    starts at T = 2, and on the GPU a decode step (T = 1) of a grouped-query model (G = 2) did
    not fit it (benchmarks/results/issue18, 2026-12-06)."""
    import sympy

    from autotune.engines._trt_build import BuildShapes, export_model

    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # export needs no Torch-TensorRT
    spec = get_spec("tiny-llama")
    assert spec.num_attention_heads > spec.num_key_value_heads  # grouped: G = 2
    config = EngineConfig(model="tiny-llama", engine="tensorrt", dtype="float32", device="cpu",
                          max_batch=4, max_seq_len=32, max_prompt_len=16,
                          options=(("attention", "torch"),))
    ep = export_model(spec, config, BuildShapes.from_config(config, kv_cache=True))
    outputs = [n.meta["val"] for n in ep.graph.nodes
               if n.op == "call_function" and "cache_attention" in str(n.target)]
    assert len(outputs) == spec.num_hidden_layers
    for out in outputs:
        for dim in out.shape:
            expr = dim.node.expr if isinstance(dim, torch.SymInt) else sympy.Integer(dim)
            assert expr.is_Integer or expr.is_Symbol, (tuple(out.shape), expr)


@pytest.mark.parametrize("trt", ["2.13.0"], indirect=True)
def test_attention_in_pytorch_keeps_context_memory_per_call_across_budgets(
    trt: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """attention=torch from 2.13 (no Python runtime there) builds its engines with
    dynamically_allocate_resources, which 2.13 keeps across budget changes: no static
    context ever, no refused hand-over."""
    engine = load_engine(_config(tmp_path, ("attention", "torch"), max_prompt_len=16))
    mods = [m for n, m in engine._module.named_children() if "_run_on_acc" in n]
    assert len(mods) > 2 and all(m.dynamically_allocate_resources for m in mods)
    trt._state.STATIC_CONTEXTS["peak"] = 0
    prompt = torch.randint(1, 500, (2, 6))
    total = engine.total_device_budget
    with caplog.at_level(logging.ERROR, logger="torch_tensorrt"):
        for budget in (0, total // 2, total, total // 3):
            engine.device_budget = budget
            assert engine.device_budget == engine.applied_budget(budget)
            engine.decode(engine.prefill(prompt, 2), 1)
            assert {m.engine.context for m in mods} == {"user_managed"}
    assert not [r for r in caplog.records if "cannot set buffer" in r.getMessage()]
    assert sum(m.engine.refused_workspaces for m in mods) == 0
    assert trt._state.STATIC_CONTEXTS["peak"] == 0
    assert trt._state.STATIC_CONTEXTS["alive"] == 0


def test_a_context_made_user_managed_through_a_runtime_config_leaves_it_static() -> None:
    """2.12 on TensorRT-RTX makes contexts through the module's runtime config (its runtime
    cache with it): the user-managed one is made through it too, and the config goes back to
    static for the module's own re-creations."""
    from autotune.engines.tensorrt import _remake_user_managed

    strategies = SimpleNamespace(STATIC="static", USER_MANAGED="user_managed")
    made, strategy = [], ["static"]
    config = SimpleNamespace(set_execution_context_allocation_strategy=strategy.append)
    engine = SimpleNamespace(create_execution_context=lambda c: made.append((c, strategy[-1])))
    mod = SimpleNamespace(engine=engine, context="old", runtime_config=config,
                          runtime_states=SimpleNamespace(context_changed=False))
    with mock.patch("autotune.engines.tensorrt._allocation_strategies", lambda e: strategies):
        _remake_user_managed(mod)
    assert made == [(config, "user_managed")] and strategy[-1] == "static"
    assert mod.runtime_states.context_changed


@pytest.mark.parametrize("trt", ["2.11.0", "2.12.0"], indirect=True)
def test_attention_in_pytorch_shares_one_context_buffer_across_budgets(
    trt: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """attention=torch up to 2.12 takes the Python runtime: every engine's context is made
    again user-managed and all run on one buffer of the largest device_memory_size_v2 (the
    streaming scratch included). 2.11's per-call memory left TensorRT-RTX allocating each
    context's scratch itself: 33 x 281 MB for llama2-7b (benchmarks/results/issue18). A
    budget change makes each context static again; one at a time is alive, none after. The
    module cached with its runtime loads the same way. No engine takes a size as a shape
    input: the double, as 2.11's runtime, would read it from a host copy already freed."""
    engine = load_engine(_config(tmp_path, ("attention", "torch"), max_prompt_len=16))
    call = trt._state.COMPILE_CALLS[-1]
    assert call["use_python_runtime"] is True and "dynamically_allocate_resources" not in call

    def shared_size(e: Any) -> int:
        mods = [m for n, m in e._module.named_children() if "_run_on_acc" in n]
        assert len(mods) > 2
        assert all(isinstance(m, trt.dynamo.runtime.PythonTorchTensorRTModule) for m in mods)
        assert not any(m.context.static for m in mods)
        (address, size), = {m.context.memory for m in mods}  # one buffer for all
        assert size == max(m.engine.device_memory_size_v2 for m in mods)
        return size

    assert trt._state.STATIC_CONTEXTS["alive"] == 0
    assert engine.describe()["shared_context_memory"] == shared_size(engine)
    trt._state.STATIC_CONTEXTS["peak"] = 0
    prompt = torch.randint(1, 500, (2, 6))
    total = engine.total_device_budget
    sizes, tokens = [], []
    with caplog.at_level(logging.ERROR, logger="torch_tensorrt"):
        for budget in (0, total // 2, total, total // 3):
            engine.device_budget = budget
            assert engine.device_budget == engine.applied_budget(budget)
            sizes.append(shared_size(engine))
            gen = engine.prefill(prompt, 3)
            engine.decode(gen, 2)
            tokens.append(gen.tokens.clone())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert all(torch.equal(t, tokens[0]) for t in tokens)
    assert sizes[0] > sizes[1] > sizes[2]  # the scratch grows with what a budget streams
    assert trt._state.STATIC_CONTEXTS["peak"] == 1
    assert trt._state.STATIC_CONTEXTS["alive"] == 0
    mods = [m for n, m in engine._module.named_children() if "_run_on_acc" in n]
    engine.close()
    assert not any("_autotune_context_memory" in vars(m) for m in mods)
    again = load_engine(_config(tmp_path, ("attention", "torch"), max_prompt_len=16))
    assert again.describe()["cache_hit"]
    shared_size(again)
    gen = again.prefill(prompt, 3)
    again.decode(gen, 2)
    assert torch.equal(gen.tokens, tokens[0])


@pytest.mark.parametrize("version", ["2.11.0", "2.12.0"])
def test_kernel_specialization_reaches_every_context_on_tensorrt_rtx(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, version: str) -> None:
    """kernel_specialization=none: TensorRT-RTX's strategy for new shapes, set on every context
    that autotune makes (at load and after a budget change), through a runtime config of its
    own (2.11) or the module's (2.12, whose own re-creations keep lazy); the tokens do not
    change. Elsewhere the option is refused with one line."""
    trt = install_torch_tensorrt(monkeypatch, version, package="tensorrt_rtx")
    try:
        import tensorrt

        strategy = tensorrt.DynamicShapesKernelSpecializationStrategy
        if version == "2.12.0":  # Torch-TensorRT 2.12 on TensorRT-RTX: a runtime config each
            modules = trt.dynamo.runtime.PythonTorchTensorRTModule
            original = modules.setup_engine

            def with_config(self: Any) -> None:
                original(self)
                self.runtime_config = self.engine.create_runtime_config()

            monkeypatch.setattr(modules, "setup_engine", with_config)
        engine = load_engine(_config(tmp_path, ("attention", "torch"),
                                     ("kernel_specialization", "NONE"), max_prompt_len=16))
        plain = load_engine(_config(tmp_path, ("attention", "torch"), max_prompt_len=16))

        def specializations(e: Any) -> set[Any]:
            mods = [m for n, m in e._module.named_children() if "_run_on_acc" in n]
            assert mods and not any(m.context.static for m in mods)  # user-managed, still
            return {m.context.specialization for m in mods}

        assert specializations(engine) == {strategy.NONE}
        assert specializations(plain) == {None}  # TensorRT-RTX's own default
        assert engine.describe()["kernel_specialization"] == "none"
        prompt = torch.randint(1, 500, (2, 6))
        tokens = []
        for e in (plain, engine):
            e.device_budget = e.total_device_budget // 2
            gen = e.prefill(prompt, 3)
            e.decode(gen, 2)
            tokens.append(gen.tokens)
        assert specializations(engine) == {strategy.NONE}
        assert torch.equal(tokens[0], tokens[1])
        if version == "2.12.0":
            configs = {m.runtime_config.dynamic_shapes_kernel_specialization_strategy
                       for n, m in engine._module.named_children() if "_run_on_acc" in n}
            assert configs == {strategy.LAZY}
        with pytest.raises(UserInputError, match="kernel_specialization: applies where"):
            load_engine(_config(tmp_path, ("kernel_specialization", "eager")))
        with pytest.raises(UserInputError, match="expected lazy, eager or none; got 'soon'"):
            TensorRTEngine.check_config(_config(tmp_path, ("attention", "torch"),
                                                ("kernel_specialization", "soon")))
        mods = [m for _, m in engine._ws.rt_mods]
        kept = [m in tensorrt_engine._OWN_CONFIGS for m in mods]
        assert all(kept) if version == "2.11.0" else not any(kept)  # 2.12: the module's own
        engine.close()  # each context goes before the runtime config it was made from
        assert not any(m in tensorrt_engine._OWN_CONFIGS for m in mods)
    finally:
        uninstall_torch_tensorrt()


@pytest.mark.parametrize("trt", ["2.11.0", "2.13.0"], indirect=True)
def test_kernel_specialization_is_refused_on_data_center_tensorrt(trt: Any,
                                                                   tmp_path: Path) -> None:
    """Data-center TensorRT has no kernel specialization; from 2.13 autotune makes no context."""
    with pytest.raises(UserInputError, match=r"on tensorrt \d"):
        load_engine(_config(tmp_path, ("attention", "torch"), ("kernel_specialization", "none")))


def test_by_default_one_call_holds_at_most_1024_tokens(trt: Any, tmp_path: Path) -> None:
    load_engine(_config(tmp_path, max_batch=200, max_prompt_len=16))
    tokens, *_ = trt._state.COMPILE_CALLS[-1]["inputs"]
    assert tokens.shape["max_shape"] == (200, 1024 // 200)


def test_a_plan_that_fell_short_learns_from_the_measured_peak(trt: Any, tmp_path: Path) -> None:
    engine = load_engine(_config(tmp_path))
    before = engine.memory_plan(2, 8, 8, 0).total
    engine.learn_peak(before, before + 1000)  # NVML saw 1000 bytes more than planned
    assert engine.memory_plan(2, 8, 8, 0).total == before + 1000
    engine.learn_peak(before + 1000, before)  # a plan that erred high changes nothing
    assert engine.memory_plan(2, 8, 8, 0).total == before + 1000
    assert engine.describe()["plan_correction_bytes"] == 1000


def test_the_librarys_notes_go_to_the_debug_log(
    trt: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A full budget makes Torch-TensorRT warn "Weight streaming is disabled": a note on a
    choice autotune made, at debug level; its errors keep their level."""
    engine = load_engine(_config(tmp_path))
    with caplog.at_level(logging.WARNING):
        engine.device_budget = engine.total_device_budget
        logging.getLogger("torch_tensorrt.runtime._weight_streaming").error("kept")
    assert [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name.startswith("torch_tensorrt")] == [("ERROR", "kept")]
    engine.device_budget = 0
    with caplog.at_level(logging.DEBUG):
        engine.device_budget = engine.total_device_budget
    assert ("DEBUG", "Weight streaming is disabled") in {
        (r.levelname, r.getMessage()) for r in caplog.records}


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failed_load(
    trt: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING):
        engine = load_engine(_config(blocked))
    assert engine.total_device_budget > 0
    assert any("could not write the TensorRT cache" in r.getMessage() for r in caplog.records)


def test_a_fresh_process_loads_attention_torch_from_the_cache(tmp_path: Path) -> None:
    """The cached graph calls autotune's own ops (autotune::key_heads, ...): a worker that
    has not compiled must register them before unpickling it, or every load compiles again
    (seen on the H100, 2026-12-05: 220 s a load)."""
    code = (
        "import sys\n"
        "from autotune.engines import EngineConfig, load_engine\n"
        "config = EngineConfig(model='tiny-llama', engine='tensorrt', dtype='float32',\n"
        "    device='cpu', max_batch=2, max_seq_len=32, max_prompt_len=16, seed=7,\n"
        "    options=(('trt_cache_dir', sys.argv[1]), ('attention', 'torch')))\n"
        "print('cache_hit', load_engine(config).describe()['cache_hit'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DOUBLES_DIR), str(ROOT)])}
    hits = []
    for _ in range(2):  # the first compiles and writes the entry; the second only loads
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "unreadable" not in done.stderr, done.stderr
        hits.append(done.stdout.split()[-1])
    assert hits == ["False", "True"]
