"""The engine contract, one suite run against every engine (like Optuna's storage tests).

``tensorrt`` runs against the torch_tensorrt test double (tests/doubles) at several versions,
and (marked ``gpu``) against the real Torch-TensorRT where it is installed with a GPU;
``native`` is the real native engine. On CPU, or that GPU, with tiny-llama in float32 (the
double: its two-layer ``TRT_MODEL``). An engine whose module is not importable yet is skipped
with the reason, never failed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from doubles import TRT_MODEL, install_torch_tensorrt, uninstall_torch_tensorrt

from autotune.engines import EngineConfig, load_engine
from autotune.errors import UserInputError
from autotune.measure.timing import random_prompt
from autotune.streaming import weight_streaming

# One xdist worker runs every test of the torch_tensorrt double (pyproject: --dist loadgroup):
# its exports of TRT_MODEL are kept within a process (tests/doubles), and made once, not once
# per worker.
pytestmark = pytest.mark.xdist_group("torch_tensorrt_double")


def _real_torch_tensorrt() -> bool:
    """The real package (not the double, which is importable only once installed) with a GPU."""
    return importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


# The double at several versions; the real Torch-TensorRT where it is installed (GPU machine).
PARAMS = ["tensorrt-2.6.0", "tensorrt-2.13.0", "tensorrt-2.14.0a0", "native",
          pytest.param("tensorrt-real", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module", params=PARAMS)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[Any]:
    name, _, version = request.param.partition("-")
    options: tuple[tuple[str, Any], ...] = ()
    device = "cpu"
    with pytest.MonkeyPatch.context() as mp:
        if version == "real":
            if not _real_torch_tensorrt():
                pytest.skip("the real torch_tensorrt is not installed here (or no GPU)")
            device = "cuda"
            options = (("trt_cache_dir", str(tmp_path_factory.mktemp("trt"))),
                       ("torch_executed_ops", ("torch.ops.aten.lt.Tensor",)))
        elif name == "tensorrt":
            install_torch_tensorrt(mp, version)
            # The cache mask's comparison in PyTorch splits the graph into two engines and
            # one PyTorch child.
            options = (("trt_cache_dir", str(tmp_path_factory.mktemp("trt"))),
                       ("torch_executed_ops", ("torch.ops.aten.lt.Tensor",)))
        else:
            try:
                importlib.import_module(f"autotune.engines.{name}")
            except ImportError as e:
                pytest.skip(f"engine {name!r} is not importable yet: {e}")
        # The double builds its tests' model at seed 7, test_tensorrt_engine's, so that the
        # export is shared.
        model = TRT_MODEL if name == "tensorrt" and version != "real" else "tiny-llama"
        config = EngineConfig(model=model, engine=name, dtype="float32", device=device,
                              max_batch=4, max_seq_len=32, seed=7, options=options)
        eng = load_engine(config)
        yield eng
        eng.close()
    if name == "tensorrt" and version != "real":
        uninstall_torch_tensorrt()  # the real package stays: its extension loads once


@pytest.fixture
def restore_budget(engine: Any) -> Iterator[None]:
    before = engine.device_budget
    yield
    engine.device_budget = before


def _generate(engine: Any, batch: int, isl: int, osl: int, seed: int = 0) -> torch.Tensor:
    prompt = random_prompt(batch, isl, engine.spec.vocab_size, seed, engine.config.device)
    gen = engine.prefill(prompt, osl)
    if osl > 1:
        engine.decode(gen, osl - 1)
    return gen.tokens


def test_budget_range(engine: Any) -> None:
    assert engine.total_device_budget > 0
    assert 0 <= engine.device_budget <= engine.total_device_budget


@pytest.mark.usefixtures("restore_budget")
def test_assigned_budget_reads_back_as_applied(engine: Any) -> None:
    total = engine.total_device_budget
    engine.device_budget = 0
    assert engine.device_budget == 0
    engine.device_budget = total
    assert engine.device_budget == total
    for fraction in (0.2, 0.5, 0.8):
        requested = int(fraction * total)
        engine.device_budget = requested
        applied = engine.device_budget
        assert 0 <= applied <= requested  # what was applied, never more than asked
        engine.device_budget = applied
        assert engine.device_budget == applied  # setting the applied value is stable


@pytest.mark.usefixtures("restore_budget")
def test_applied_budget_foretells_the_assignment(engine: Any) -> None:
    """Engines that round budgets say what a budget becomes before it is applied (the search
    uses it never to measure one configuration twice); the others apply what they are given."""
    foretell = getattr(engine, "applied_budget", None)
    if foretell is None:
        pytest.skip(f"{engine.name} declares no rounding")
    total = engine.total_device_budget
    for fraction in (0.0, 0.13, 0.37, 0.5, 0.61, 0.9, 1.0):
        requested = int(fraction * total)
        expected = foretell(requested)
        engine.device_budget = requested
        assert engine.device_budget == expected


@pytest.mark.usefixtures("restore_budget")
def test_budget_above_total_is_clamped_with_logged_error(
    engine: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    engine.device_budget = 0
    with caplog.at_level(logging.ERROR):
        engine.device_budget = engine.total_device_budget + 12345
    assert engine.device_budget == engine.total_device_budget
    assert any(r.levelno >= logging.ERROR for r in caplog.records)


@pytest.mark.usefixtures("restore_budget")
def test_negative_budget_is_an_error_and_changes_nothing(engine: Any) -> None:
    engine.device_budget = engine.total_device_budget
    with pytest.raises(UserInputError):
        engine.device_budget = -1
    assert engine.device_budget == engine.total_device_budget


def test_automatic_budget_within_range(engine: Any) -> None:
    auto = engine.get_automatic_weight_streaming_budget()
    assert isinstance(auto, int)
    assert 0 <= auto <= engine.total_device_budget


@pytest.mark.usefixtures("restore_budget")
def test_weight_streaming_context_restores_on_exit(engine: Any) -> None:
    engine.device_budget = engine.total_device_budget
    with weight_streaming(engine) as ws:
        assert ws.total_device_budget == engine.total_device_budget
        ws.device_budget = 0
        assert ws.device_budget == engine.device_budget == 0
    assert engine.device_budget == engine.total_device_budget


@pytest.mark.parametrize(("batch", "isl", "osl"), [(1, 5, 1), (3, 7, 6), (4, 16, 16)])
def test_generates_exactly_osl_tokens(engine: Any, batch: int, isl: int, osl: int) -> None:
    tokens = _generate(engine, batch, isl, osl)
    assert tuple(tokens.shape) == (batch, osl)
    assert tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < engine.spec.vocab_size


@pytest.mark.usefixtures("restore_budget")
def test_same_tokens_at_every_budget(engine: Any) -> None:
    total = engine.total_device_budget
    budgets = (total, 0, total // 3, total // 2, total)
    outputs = []
    for budget in budgets:
        engine.device_budget = budget
        outputs.append(_generate(engine, 3, 9, 8, seed=5))
    for budget, tokens in zip(budgets[1:], outputs[1:], strict=True):
        assert torch.equal(tokens, outputs[0]), f"budget {budget} of {total}"


def test_memory_plan_monotone_in_batch_and_budget(engine: Any) -> None:
    total = engine.total_device_budget
    by_batch = [engine.memory_plan(b, 8, 8, total // 2).total for b in (1, 2, 4)]
    assert by_batch == sorted(by_batch) and by_batch[0] < by_batch[-1]
    plans = [engine.memory_plan(2, 8, 8, b) for b in (0, total // 4, total // 2, total)]
    assert [p.total for p in plans] == sorted(p.total for p in plans)
    residents = [p.resident_weights for p in plans]
    assert residents == sorted(residents) and residents[0] < residents[-1]


def test_describe_is_json_serialisable(engine: Any) -> None:
    text = json.dumps(engine.describe())
    assert json.loads(text)
