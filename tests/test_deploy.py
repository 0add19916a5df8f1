"""Serving a recommendation (autotune.deploy): a real study's JSON applied to engines and to a
Torch-TensorRT module (the double: TensorRT cannot be installed here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import ANALYTIC
from doubles import TRT_MODEL, install_torch_tensorrt, uninstall_torch_tensorrt

from autotune import deploy
from autotune.engines import EngineConfig, load_engine
from autotune.errors import UserInputError
from autotune.results import recommend
from autotune.storage import load_study, open_storage
from autotune.tune.study import RunOptions, run_study

# One xdist worker runs every test of the torch_tensorrt double (pyproject: --dist loadgroup):
# its exports of TRT_MODEL are kept within a process (tests/doubles), and made once, not once
# per worker.
pytestmark = pytest.mark.xdist_group("torch_tensorrt_double")


@pytest.fixture(scope="module")
def rec_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recommendation of a short study on the analytic test engine (8 units of 64 MiB)."""
    tmp = tmp_path_factory.mktemp("deploy")
    url = f"sqlite:///{tmp / 'study.db'}"
    run_study(RunOptions(model="tiny-llama", engine=ANALYTIC, device="cpu", trials=4, isl=8,
                         osl=4, max_batch=16, storage=url, dtype="float32", repeats=1,
                         early_stop=False, confirm=False))
    rec = recommend.build(load_study(open_storage(url, create=False), None))
    return recommend.write(rec, tmp / "rec.json")


def _engine(engine: str, **kw: Any) -> Any:
    fields = {"model": "tiny-llama", "engine": engine, "dtype": "float32", "device": "cpu",
              "max_batch": 4, "max_seq_len": 32, **kw}
    return load_engine(EngineConfig(**fields))


def test_the_tuned_build_gets_the_recommended_bytes(rec_path: Path) -> None:
    best = recommend.read(rec_path)["best"]
    engine = _engine(ANALYTIC)
    engine.device_budget = engine.total_device_budget  # serving starts elsewhere
    done = deploy.apply(rec_path, engine)
    assert done.batch == best["batch"]
    assert done.device_budget == best["device_budget_bytes"] == engine.device_budget
    assert done.budget_fraction == pytest.approx(best["budget_fraction"], abs=1e-4)
    assert done.notes == ()


def test_another_build_gets_the_recommended_fraction_and_a_note(rec_path: Path) -> None:
    rec = recommend.read(rec_path)
    engine = _engine("native")  # tiny-llama's own units: another total than the tuned engine's
    assert engine.total_device_budget != rec["total_device_budget"]
    done = deploy.apply(rec, engine)
    wanted = round(rec["best"]["budget_fraction"] * engine.total_device_budget)
    assert done.device_budget == engine.device_budget == engine.applied_budget(wanted)
    assert len(done.notes) == 1 and "applied the recommended fraction" in done.notes[0]


@pytest.fixture
def trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield install_torch_tensorrt(monkeypatch, "2.13.0")
    uninstall_torch_tensorrt()


def test_a_torch_tensorrt_module_keeps_the_budget(rec_path: Path, trt: Any,
                                                  tmp_path: Path) -> None:
    # The double's model at its seed: the export test_tensorrt_engine's tests share.
    engine = _engine("tensorrt", model=TRT_MODEL, seed=7,
                     options=(("trt_cache_dir", str(tmp_path)),))
    module = engine._module  # what a user serves: the compiled Torch-TensorRT module
    total = trt.runtime.weight_streaming(module).total_device_budget
    rec = recommend.read(rec_path)
    rec["best"]["budget_fraction"] = 0.3  # a fraction that the module's total makes whole
    rec["total_device_budget"] = total
    rec["best"]["device_budget_bytes"] = int(0.3 * total)
    done = deploy.apply(rec, module)
    assert done.total_device_budget == total and done.batch == rec["best"]["batch"]
    # A new handle reads the budget back: nothing restored it (as a `with` block's exit would).
    assert trt.runtime.weight_streaming(module).device_budget == done.device_budget
    assert abs(done.device_budget - int(0.3 * total)) <= len(
        trt.runtime.weight_streaming(module).rt_mods)  # per-engine int() split


def test_a_wrapped_or_per_call_module_is_served_as_torch_tensorrt_serves_it(
        rec_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A CUDA-graphs wrapper is taken, as weight_streaming takes it; attention=torch's
    Python-runtime module on 2.11 keeps its contexts user-managed on one buffer after the
    budget, the buffer held by the module, not the engine (Torch-TensorRT's own setter would
    make every context static again: benchmarks/results/issue18)."""
    trt = install_torch_tensorrt(monkeypatch, "2.11.0")
    try:
        engine = _engine("tensorrt", model=TRT_MODEL, seed=7, max_prompt_len=16,
                         options=(("trt_cache_dir", str(tmp_path)), ("attention", "torch")))
        module = engine._module
        mods = [m for n, m in module.named_children() if "_run_on_acc" in n]
        assert mods and all(hasattr(m, "context") for m in mods)
        done = deploy.apply(rec_path, module)
        assert not any(m.context.static for m in mods)
        (address, size), = {m.context.memory for m in mods}
        assert all(vars(m)["_autotune_context_memory"].data_ptr() == address for m in mods)
        assert trt._state.STATIC_CONTEXTS["alive"] == 0
        assert trt.runtime.weight_streaming(module).device_budget == done.device_budget
        from torch_tensorrt.dynamo.runtime._CudaGraphsTorchTensorRTModule import (
            CudaGraphsTorchTensorRTModule,
        )

        wrapped = CudaGraphsTorchTensorRTModule(module)
        assert deploy.apply(rec_path, wrapped).device_budget == done.device_budget
        assert wrapped.is_weight_streaming_set  # its whole-module graph records again
        engine.close()  # the buffer goes with the engine; the modules let go of it
        assert not any("_autotune_context_memory" in vars(m) for m in mods)
    finally:
        uninstall_torch_tensorrt()


def test_a_users_per_call_module_keeps_per_call_memory(rec_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's own 2.11 module of per-call context memory (C++ runtime): Torch-TensorRT's
    setter would make every context static; deploy.apply hands each back, one at a time."""
    from test_trt_double import _compile

    trt = install_torch_tensorrt(monkeypatch, "2.11.0")
    try:
        gm, _, args, kwargs = _compile(trt, dynamically_allocate_resources=True)
        mods = [m for n, m in gm.named_children() if "_run_on_acc" in n]
        trt._state.STATIC_CONTEXTS["peak"] = 0
        deploy.apply(rec_path, gm)
        gm(*args, **kwargs)
        assert {m.engine.context for m in mods} == {"user_managed"}
        assert sum(m.engine.refused_workspaces for m in mods) == 0
        assert trt._state.STATIC_CONTEXTS["peak"] == 1
    finally:
        uninstall_torch_tensorrt()


def test_a_model_without_streamable_weights_is_refused(rec_path: Path) -> None:
    unstreamed = SimpleNamespace(device_budget=0, total_device_budget=0)
    with pytest.raises(UserInputError, match="enable_weight_streaming=True"):
        deploy.apply(rec_path, unstreamed)
    # Not a streaming model at all: said as such, not as a missing torch_tensorrt.
    for model in (torch.nn.Linear(4, 4), None):
        with pytest.raises(UserInputError, match=f"a {type(model).__name__} has no "
                                                 "weight-streaming budget"):
            deploy.apply(rec_path, model)


def test_a_recommendation_of_another_model_or_replayed_says_so(rec_path: Path) -> None:
    rec = recommend.read(rec_path)
    rec["workload"] = {**rec["workload"], "model": "llama2-7b", "engine": "landscape"}
    done = deploy.apply(rec, _engine(ANALYTIC))
    assert "this is tiny-llama; the recommendation was tuned for llama2-7b" in done.notes
    assert any("replayed from a recorded landscape" in n for n in done.notes)


@pytest.mark.parametrize(("key", "value"), [
    ("batch", 3.9), ("batch", 0), ("batch", -8), ("batch", "8"), ("batch", True),
    ("device_budget_bytes", -1), ("device_budget_bytes", 1.5), ("device_budget_bytes", None),
    ("budget_fraction", 2.0), ("budget_fraction", "half"), ("throughput_tok_s", [1]),
    ("batch", 10**30), ("device_budget_bytes", 1000 * 512 * 2**20),  # 1000x the total
])
def test_a_hand_edited_recommendation_is_refused_by_its_schema(rec_path: Path, key: str,
                                                               value: Any) -> None:
    """A batch of 3.9 is not served as 3, nor a negative one at all; a value of the wrong
    type is the file's fault (SchemaError), not a raw ValueError or TypeError."""
    from autotune.errors import SchemaError

    rec = recommend.read(rec_path)
    rec["best"][key] = value
    engine = _engine(ANALYTIC)
    with pytest.raises(SchemaError, match=f"best {key}: expected"):
        deploy.apply(rec, engine)
    rec["best"] = "not an object"
    with pytest.raises(SchemaError, match="best is a JSON object"):
        deploy.apply(rec, engine)


def test_the_recommendation_says_which_autotune_wrote_it_and_when(rec_path: Path) -> None:
    import datetime

    from autotune import __version__

    rec = recommend.read(rec_path)
    assert rec["autotune_version"] == __version__
    written = datetime.datetime.fromisoformat(rec["created_utc"])
    age = datetime.datetime.now(datetime.timezone.utc) - written
    assert datetime.timedelta(0) <= age < datetime.timedelta(hours=1)


@pytest.mark.parametrize("content", [
    "a SQLite file", "latin-1", "deep", "schema_version true"])
def test_any_bad_file_is_a_schema_error(rec_path: Path, tmp_path: Path, content: str) -> None:
    """Issue 19: a database or a latin-1 file gave UnicodeDecodeError, a 100,000-deep list
    RecursionError, and `"schema_version": true` was read as version 1."""
    import json
    import sqlite3

    from autotune.errors import SchemaError

    bad = tmp_path / "bad.json"
    if content == "a SQLite file":
        with sqlite3.connect(bad) as conn:
            conn.execute("CREATE TABLE t (x BLOB)")
            conn.execute("INSERT INTO t VALUES (?)", (bytes(range(256)),))
    elif content == "latin-1":
        bad.write_bytes('{"kind": "café"}'.encode("latin-1"))
    elif content == "deep":
        bad.write_text("[" * 100_000 + "]" * 100_000)
    else:
        bad.write_text(json.dumps({**recommend.read(rec_path), "schema_version": True}))
    for read in (recommend.read, lambda path: deploy.apply(path, _engine(ANALYTIC))):
        with pytest.raises(SchemaError, match="bad.json|schema_version True"):
            read(bad)
