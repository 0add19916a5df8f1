"""8-bit weights (``--quantization``): the arithmetic, the native engine at every budget, the
bytes that move, precision as a study's third parameter, the accuracy record and the refusals.

The native engine runs tiny-llama in float32 on CPU with weights of std 0.1 (greedy tokens change
from step to step, so a wrong scale or a stale slot shows in the tokens); the study tests use the
analytic engine (tests/fakes.py), whose 8-bit units are half a 16-bit one.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import optuna
import pytest
import torch
from conftest import ANALYTIC
from fakes import UNIT, UNITS, AnalyticEngine
from test_native_engine import _generate
from test_native_engine import _load as load_native

import autotune.engines.native as native
from autotune import models
from autotune.engines import EngineConfig, load_engine
from autotune.errors import UserInputError
from autotune.measure.timing import random_prompt
from autotune.measure.trial import plan_configs
from autotune.precision import parse_precisions
from autotune.results import recommend
from autotune.storage import load_study, open_storage
from autotune.streaming import quant
from autotune.streaming.runtime import unit_layouts
from autotune.tune.precisions import PrecisionPriors
from autotune.tune.search import InProcessRunner, make_sampler, run_in_process, start_prior
from autotune.tune.study import RunOptions, run_study

PRECISIONS = ("none", "int8", "fp8")


def _load(quantization: tuple[str, ...] = PRECISIONS, weights: str | None = None,
          device: str = "cpu", **kw) -> native.NativeEngine:
    return load_native(device, quantization=quantization, weights=weights, **kw)


@pytest.fixture(scope="module")
def engine() -> native.NativeEngine:
    e = _load()
    yield e
    e.close()


# -- the arithmetic -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_round_trip_is_within_half_a_step_per_row(dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]).to(dtype)
    w[5] = 0.0  # an all-zero row: a scale that is not 0, and zeros back
    q, s = quant.quantize(w, "int8", dtype)
    assert q.dtype == torch.int8 and s.dtype == dtype and s.shape == (64,)
    assert int(q.abs().max()) <= 127 and bool((s > 0).all())
    back = quant.widen(q, s, dtype).float()
    assert quant.widen(q, s, dtype).dtype == dtype
    err = (back - w.float()).abs()
    step = s.float()[:, None]
    # Rounding to the nearest step, then the widened value rounded once more in ``dtype``.
    rounding = torch.finfo(dtype).eps * w.float().abs()
    assert bool((err <= step / 2 * (1 + 1e-3) + rounding).all())
    assert torch.equal(back[5], torch.zeros(96))
    # Each row uses its full range: its largest value becomes +-127.
    assert bool((q.abs().amax(dim=1)[w.float().abs().amax(dim=1) > 0] == 127).all())


def test_fp8_round_trip_keeps_three_mantissa_bits_per_row() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]
    q, s = quant.quantize(w, "fp8", torch.float32)
    assert q.dtype == torch.float8_e4m3fn
    back = quant.widen(q, s, torch.float32)
    err = (back - w).abs()
    # e4m3: relative error 2**-4 for normal values; subnormals (below 2**-6 of the scale
    # unit) are spaced 2**-9 apart.
    bound = torch.maximum(w.abs() * 2.0**-4, s[:, None] * 2.0**-10) * (1 + 1e-3)
    assert bool((err <= bound).all())
    assert float(err.max()) > 0  # it is a lossy format: the check above can fail


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp8_widening_is_the_cast_times_the_scale_in_one_matrix(dtype) -> None:
    """fp8 widens by a cast, then a multiply in place: the values of ``q.to(dtype) * s``,
    with one matrix allocated (two made fp8 run out of memory where its plan fitted)."""
    g = torch.Generator().manual_seed(2)
    q, s = quant.quantize(torch.randn(32, 48, generator=g), "fp8", dtype)
    wide = quant.widen(q, s, dtype)
    assert wide.dtype == dtype and torch.equal(wide, q.to(dtype) * s.unsqueeze(1))
    allocated = []
    with _Allocations(allocated):
        quant.widen(q, s, dtype)
    assert allocated == [(32, 48)], allocated


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shapes of the tensors that ops create (not views, not in-place results)."""

    def __init__(self, shapes: list) -> None:
        super().__init__()
        self.shapes = shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = func._schema.returns[0].alias_info is not None  # a view, or in place
        if isinstance(out, torch.Tensor) and not aliases:
            self.shapes.append(tuple(out.shape))
        return out


def test_the_precision_list_is_checked_by_name() -> None:
    assert parse_precisions("none,int8, FP8") == ("none", "int8", "fp8")
    assert parse_precisions(None) == ("none",)
    with pytest.raises(UserInputError, match="int4"):
        parse_precisions("int8,int4")
    with pytest.raises(UserInputError, match="twice"):
        parse_precisions("int8,int8")


def test_fp8_is_refused_below_compute_capability_8_9() -> None:
    with mock.patch.object(torch.cuda, "get_device_capability", lambda d: (8, 0)), \
            mock.patch.object(torch.cuda, "get_device_name", lambda d: "NVIDIA A100"):
        with pytest.raises(UserInputError, match="A100 has compute capability 8.0; fp8"):
            quant.check_supported("fp8", "cuda:0")
        quant.check_supported("int8", "cuda:0")  # int8 runs anywhere
    with mock.patch.object(torch.cuda, "get_device_capability", lambda d: (9, 0)):
        quant.check_supported("fp8", "cuda:0")
    quant.check_supported("fp8", "cpu")  # torch has the dtype: allowed on CPU (tests)


# -- the native engine --------------------------------------------------------------------


def test_tokens_are_identical_at_every_budget_of_each_precision(engine) -> None:
    prompt = random_prompt(2, 10, engine.spec.vocab_size, seed=4, device="cpu")
    by_precision = {}
    # Switching precision between generations, and back, changes nothing either.
    for precision in ("int8", "none", "fp8", "int8"):
        engine.precision = precision
        engine.device_budget = engine.total_device_budget
        unstreamed = _generate(engine, prompt, 16)
        for fraction in (0.0, 0.15, 0.5, 0.95, 0.0):
            engine.device_budget = int(fraction * engine.total_device_budget)
            assert torch.equal(_generate(engine, prompt, 16), unstreamed), (precision, fraction)
        by_precision.setdefault(precision, unstreamed)
        assert torch.equal(by_precision[precision], unstreamed)
    # ... and the precisions are really other weights: fp8 strays from 16-bit here.
    assert not torch.equal(by_precision["fp8"], by_precision["none"])


def test_streamed_bytes_are_the_8_bit_values_and_their_scales(engine) -> None:
    spec, size = engine.spec, 4  # float32
    for precision in ("int8", "fp8"):
        engine.precision = precision
        engine.device_budget = 0
        streamed = engine.streamed_bytes_per_step()
        # Every matrix but the (gathered) embedding at 1 byte a weight, a scale per row;
        # the norms in float32; each tensor padded to 256 bytes at most.
        matrices = [s for n, s in spec.all_shapes().items()
                    if len(s) == 2 and n != "model.embed_tokens.weight"]
        exact = sum(r * c + r * size for r, c in matrices)
        exact += 2 * spec.num_hidden_layers * spec.hidden_size * size
        tensors = len(matrices) * 2 + 2 * spec.num_hidden_layers
        assert exact <= streamed <= exact + 256 * tensors, (precision, streamed, exact)
        assert streamed == engine.streamed_bytes_at(0, precision)
        # The worker's plans count the same bytes, without switching precision.
        engine.precision = "none"
        reply = plan_configs(engine, [(2, 0)], 8, 8, precision=precision)
        assert reply["streamed"] == [streamed]
        engine.precision = precision
        # Resident, the same bytes are the memory plan's weights.
        full = engine.total_device_budget
        plan = engine.memory_plan(2, 8, 8, full)
        assert plan.resident_weights >= full and plan.streaming_scratch == 0
    engine.precision = "none"
    engine.device_budget = 0
    sixteen = engine.streamed_bytes_per_step()
    # float32 here: 8-bit is about a quarter (16-bit on a GPU: about half).
    assert 0.24 < engine.streamed_bytes_at(0, "int8") / sixteen < 0.3


def test_host_bytes_count_each_precision_loaded() -> None:
    spec = models.get_spec("tiny-llama")
    one = EngineConfig(model="tiny-llama", dtype="float16", device="cpu")
    both = EngineConfig(model="tiny-llama", dtype="float16", device="cpu",
                        quantization=("none", "int8"))
    eight = sum(u.nbytes for u in unit_layouts(spec, "float16", quantization="int8"))
    assert native.NativeEngine.host_bytes(one) == spec.weight_bytes("float16")
    assert native.NativeEngine.host_bytes(both) == spec.weight_bytes("float16") + eight
    assert 0.5 < eight / spec.weight_bytes("float16") < 0.75  # the embedding stays 16-bit


# -- accuracy -----------------------------------------------------------------------------


def test_the_accuracy_check_compares_with_16_bit(engine) -> None:
    engine.precision = "int8"
    engine.device_budget = engine.total_device_budget // 2
    before = engine.device_budget
    record = engine.accuracy(isl=10, osl=12, seed=0, batch=4)
    assert record["weights"] == "random" and record["steps"] == 12
    int8, fp8 = record["precisions"]["int8"], record["precisions"]["fp8"]
    assert int8["status"] == fp8["status"] == "ok"
    for r in (int8, fp8):
        assert 0.0 <= r["top1_agreement"] <= 1.0 and 0.0 <= r["generated_match"] <= 1.0
        assert r["logits_rel_error"] > 0
    # fp8 keeps 3 mantissa bits, int8 about 7: fp8 is the farther from 16-bit.
    assert int8["logits_rel_error"] < fp8["logits_rel_error"] < 0.5
    assert fp8["top1_agreement"] <= int8["top1_agreement"] and int8["top1_agreement"] > 0.7
    # The engine is left as it was: the precision and budget in use, and its tokens.
    assert engine.precision == "int8" and engine.device_budget == before
    prompt = random_prompt(1, 6, engine.spec.vocab_size, seed=2, device="cpu")
    _generate(engine, prompt, 4)


def test_the_accuracy_check_runs_on_a_checkpoint(tmp_path: Path) -> None:
    from test_checkpoints import _checkpoint

    _checkpoint(tmp_path / "ckpt", None, False)
    # Only int8 loaded: the 16-bit reference is built for the check, then freed.
    e = _load(("int8",), weights=str(tmp_path / "ckpt"))
    try:
        record = e.accuracy(isl=8, osl=8, seed=0, batch=2)
    finally:
        e.close()
    assert record["weights"] == "checkpoint"
    one = record["precisions"]["int8"]
    assert one["status"] == "ok" and 0 < one["logits_rel_error"] < 0.2


# -- precision as a study's axis ----------------------------------------------------------


def _options(storage_url: str, **kw) -> RunOptions:
    base = dict(model="tiny-llama", engine=ANALYTIC, device="cpu", trials=6, isl=8, osl=4,
                max_batch=64, storage=storage_url, dtype="float32", repeats=1,
                early_stop=False)
    base.update(kw)
    return RunOptions(**base)


def _study(storage_url: str) -> optuna.Study:
    return load_study(open_storage(storage_url, create=False), None)


def test_precision_is_a_third_parameter_and_the_json_shows_each(storage_url: str) -> None:
    # Random search: both precisions are tried (the autotune sampler may rightly skip 16-bit,
    # whose bounds cannot beat 8-bit's best: see the in-process test below).
    run_study(_options(storage_url, quantization=("none", "int8"), sampler="random",
                       gpu_memory_limit=2**30 + 256 * 2**20))
    study = _study(storage_url)
    trials = study.get_trials()
    assert all(set(t.params) == {"batch", "budget_fraction", "precision"} for t in trials)
    assert {t.params["precision"] for t in trials} == {"none", "int8"}
    assert all(t.user_attrs["precision"] == t.params["precision"] for t in trials)
    for t in trials:  # each trial's budget is a fraction of its own precision's bytes
        unit = UNIT if t.params["precision"] == "none" else UNIT // 2
        assert t.user_attrs["budget_bytes"] == round(t.params["budget_fraction"] * UNITS * unit)
    attrs = study.user_attrs
    assert attrs["workload"]["quantization"] == ["none", "int8"]
    assert attrs["total_device_budgets"] == {"none": UNITS * UNIT, "int8": UNITS * UNIT // 2}
    assert "int8" in study.study_name
    # The analytic engine has no accuracy check: the study says so, it does not fail.
    assert attrs["accuracy"]["precisions"]["int8"]["status"] == "not measured"
    rec = recommend.build(study)
    assert set(rec["by_precision"]) == {"none", "int8"}
    for p, row in rec["by_precision"].items():
        mine = [t.value for t in trials if t.params["precision"] == p and t.value]
        assert row["best"]["throughput_tok_s"] == max(mine)
        assert row["best"]["precision"] == p
    assert rec["best"]["throughput_tok_s"] == max(t.value for t in trials)
    assert {c["precision"] for c in rec["pareto_front"]} <= {"none", "int8"}
    if rec["best"]["precision"] == "int8":
        assert "--quantization int8" in rec["reproduce"]
    recommend.validate(rec)
    from autotune.results.report import _precision_table

    html = "\n".join(_precision_table(rec["by_precision"]))
    assert "<td>int8</td>" in html and "<td>none</td>" in html
    # The landscape: each precision's budget as a share of its own bytes, its own marker.
    from autotune.results.report import figure_landscape, points

    pts = points(study)
    for t in trials:
        p = next(p for p in pts if p.number == t.number)
        assert p.precision == t.params["precision"]
        applied = t.user_attrs.get("budget_applied_bytes", t.user_attrs["budget_bytes"])
        own = attrs["total_device_budgets"][p.precision]
        assert abs(p.budget_pct - 100 * applied / own) < 1e-9
    fig = figure_landscape(pts, rec)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "16-bit weights (colour: throughput)" in labels
    assert "int8 weights (colour: throughput)" in labels


def test_a_default_study_has_the_parameters_it_always_had(storage_url: str) -> None:
    run_study(_options(storage_url, trials=2))
    study = _study(storage_url)
    assert all(set(t.params) == {"batch", "budget_fraction"} for t in study.get_trials())
    assert "accuracy" not in study.user_attrs and "by_precision" not in recommend.build(study)


def test_resuming_with_another_precision_set_is_refused(storage_url: str) -> None:
    run_study(_options(storage_url, trials=1, quantization=("none", "int8"), study_name="s"))
    with pytest.raises(UserInputError, match="--quantization none,int8 .this run: none;"):
        run_study(_options(storage_url, trials=2, study_name="s"))
    with pytest.raises(UserInputError, match="this run: none,int8,fp8"):
        run_study(_options(storage_url, trials=2, study_name="s",
                           quantization=("none", "int8", "fp8")))
    # A study from before precision was an axis measured 16-bit: resumed as such, it goes
    # on; with 8-bit weights it is refused.
    run_study(_options(storage_url, trials=1, study_name="old"))
    study = optuna.load_study(study_name="old", storage=open_storage(storage_url))
    workload = dict(study.user_attrs["workload"])
    del workload["quantization"]
    study.set_user_attr("workload", workload)
    assert run_study(_options(storage_url, trials=2, study_name="old")).ran == 1
    with pytest.raises(UserInputError, match="--quantization none .this run: int8"):
        run_study(_options(storage_url, trials=3, study_name="old", quantization=("int8",)))


def test_the_prior_searches_across_precisions_to_the_optimum(tmp_path: Path) -> None:
    """In process: one prior per precision; 8-bit streams half the bytes, so at these sizes
    it is the faster, and the search must find the best configuration of all three."""
    config = EngineConfig(model="tiny-llama", engine=ANALYTIC, device="cpu", max_batch=64,
                          dtype="float32", quantization=PRECISIONS,
                          gpu_memory_limit=2**30 + 256 * 2**20,
                          options=(("clock", "modelled"),))
    engine = AnalyticEngine(config)  # timed on the modelled clock: the best 16-bit
    try:  # configuration is 1.2% below the 8-bit optimum, within a loaded machine's noise
        _search_across_precisions(config, engine)
    finally:
        engine.close()  # gives the real clock back to measure()


def _search_across_precisions(config: EngineConfig, engine: AnalyticEngine) -> None:
    runner = InProcessRunner(engine)
    study = optuna.create_study(direction="maximize",
                                sampler=make_sampler("autotune", 0, 64, PRECISIONS))
    totals = engine.total_device_budgets
    from autotune.tune.prior import Limits

    prior = start_prior(study, runner, total=totals["none"], isl=8, osl=4, max_batch=64,
                        limits=Limits(), h2d_gb_s=None, totals=totals)
    assert isinstance(prior, PrecisionPriors) and set(prior.priors) == set(PRECISIONS)
    # The 8-bit grids stream half the bytes at every fraction.
    assert prior.priors["int8"].total * 2 == prior.priors["none"].total
    run_in_process(study, runner, trials=40, max_batch=64, isl=8, osl=4, total=totals["none"],
                   prior=prior, early_stop=True, totals=totals)
    done = [t for t in study.get_trials() if t.value]
    assert len(study.trials) < 40  # it converged: every precision's search is over
    best = max(done, key=lambda t: t.value)
    # The analytic engine's own optimum, at every batch x unit budget x precision that fits.
    from fakes import KV_PER_SEQ, LINK_BYTES_PER_S, NON_STREAMABLE, PER_SEQ_S, STEP_S, MiB

    def step(batch: int, streamed: int) -> float:
        return max(streamed / LINK_BYTES_PER_S, STEP_S + PER_SEQ_S * batch)

    available = config.gpu_memory_limit - 256 * 2**20
    modelled: dict[tuple[int, int, str], float] = {}
    for p in PRECISIONS:
        unit = UNIT if p == "none" else UNIT // 2
        for units in range(UNITS + 1):
            for batch in range(1, 65):
                peak = (NON_STREAMABLE + units * unit + (2 * unit if units < UNITS else 0)
                        + batch * (KV_PER_SEQ + MiB))
                if peak <= available:
                    modelled[batch, units, p] = batch / step(batch, (UNITS - units) * unit)
    optimum = max(modelled.values())
    a = best.user_attrs
    unit = UNIT if a["precision"] == "none" else UNIT // 2
    chosen = modelled[a["batch"], a["budget_applied_bytes"] // unit, a["precision"]]
    # The configuration it chose, by the engine's own model: the best that fits.
    assert chosen == pytest.approx(optimum, rel=1e-9), (best.params, chosen, optimum)
    assert best.params["precision"] != "none"
    assert "precisions" in study.user_attrs["prior"]


# -- refusals -----------------------------------------------------------------------------


def test_tensorrt_refuses_8_bit_weights_in_one_line(storage_url: str) -> None:
    with pytest.raises(UserInputError, match="tensorrt engine streams 16-bit weights only") as e:
        RunOptions(model="tiny-llama", engine="tensorrt", device="cpu", storage=storage_url,
                   quantization=("none", "int8"))
    assert "not yet measured" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserInputError, match="tensorrt engine"):
        load_engine(EngineConfig(model="tiny-llama", engine="tensorrt", device="cpu",
                                 quantization=("fp8",)))


@pytest.mark.parametrize("args, words", [
    (("--quantization", "int4"), "--quantization: expected none, int8, fp8"),
    (("--quantization", "int8", "--engine", "tensorrt"), "tensorrt engine streams 16-bit"),
])
def test_bad_quantization_is_one_error_line_and_exit_2(tmp_path: Path, autotune_here, args,
                                                       words) -> None:
    r = autotune_here("run", "--model", "tiny-llama", "--device", "cpu", "--storage",
                      f"sqlite:///{tmp_path}/s.db", *args, cwd=tmp_path)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


def test_a_precision_the_engine_did_not_load_is_the_trials_error(engine) -> None:
    from autotune.measure.trial import TrialRequest, run_trial

    one = _load(("int8",))
    try:
        outcome = run_trial(one, TrialRequest(batch=1, budget=0, isl=4, osl=2, repeats=1,
                                              warmup=0, precision="fp8"))
    finally:
        one.close()
    assert outcome.status == "error" and "loaded int8" in outcome.reason


def test_the_quantized_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    """benchmarks/quantized.py's smoke check: every precision swept, the best of each, the
    accuracy record, the same tokens at every budget of one precision."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import quantized

    out = tmp_path / "q.json"
    assert quantized.main(["--device", "cpu", "--dtype", "float32", "--model", "tiny-llama",
                           "--limit", "300MiB", "--isl", "8", "--osl", "4", "--max-batch", "6",
                           "--fractions", "0,0.5", "--accuracy-steps", "4",
                           "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert set(figures["best"]) == set(PRECISIONS)
    assert [r["batch"] for r in figures["rows"]] == [6] * 6  # --max-batch: all fit
    assert figures["tokens_identical_across_budgets"] == {p: True for p in PRECISIONS}
    streamed = {r["precision"]: r["streamed_bytes_per_step"] for r in figures["rows"]
                if r["budget_fraction"] == 0}
    assert streamed["int8"] == streamed["fp8"] < streamed["none"] / 3  # float32: a quarter
    assert figures["accuracy"]["precisions"]["int8"]["status"] == "ok"
    assert figures["best"]["int8"]["speedup_vs_none"] > 0


# -- GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_graphs_equal_eager_at_every_budget_of_each_precision(dtype) -> None:
    """On the GPU the widening runs inside the captured decode graph: graphs and eager give
    the same tokens at every budget of each precision (fp8 where the GPU has it)."""
    from conftest import has_cuda

    if not has_cuda():
        pytest.skip("needs a CUDA GPU")
    cap = torch.cuda.get_device_capability()
    precisions = ("int8", "fp8") if cap >= (8, 9) else ("int8",)
    eager = _load(precisions, device="cuda", dtype=dtype, cuda_graphs=False)
    graphs = _load(precisions, device="cuda", dtype=dtype)
    try:
        assert graphs.describe()["cuda_graphs"] is True
        prompt = random_prompt(3, 12, eager.spec.vocab_size, seed=1, device="cuda")
        for p in precisions:
            eager.precision = graphs.precision = p
            eager.device_budget = eager.total_device_budget
            reference = _generate(eager, prompt, 20)
            for fraction in (0.0, 0.3, 1.0, 0.6):
                for e in (eager, graphs):
                    e.device_budget = int(fraction * e.total_device_budget)
                    assert torch.equal(_generate(e, prompt, 20), reference), (p, fraction)
                    assert torch.equal(_generate(e, prompt, 20), reference), (p, fraction)
    finally:
        eager.close()
        graphs.close()
