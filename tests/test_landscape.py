"""Landscapes: the file format, interpolation, the out-of-memory rule, the landscape engine,
export from a grid study, and latency limits as constraints through the real study loop."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from autotune import landscape
from autotune.engines import EngineConfig, engine_class
from autotune.engines.landscape import LandscapeEngine
from autotune.errors import SchemaError, UserInputError
from autotune.results import recommend
from autotune.results.landscape import from_study
from autotune.storage import load_study, open_storage
from autotune.tune.prior import Limits
from autotune.tune.search import (
    GRID_FRACTIONS,
    InProcessRunner,
    grid_batches,
    grid_size,
    make_sampler,
    run_in_process,
)
from autotune.tune.study import RunOptions, run_study

DATA = Path(__file__).parent / "data"
SYNTHETIC = DATA / "synthetic-llama2-7b-8GiB.json"
GiB = 2**30


def _point(batch: int, fraction: float, status: str, tput: float = 0.0, tpot: float = 0.0,
           peak: int = 0) -> dict:
    p = {"batch": batch, "budget_fraction": fraction, "status": status,
         "predicted_peak_bytes": peak}
    if status == "ok":
        p.update(throughput_tok_s=tput, ttft_ms=2 * tpot, tpot_ms=tpot, peak_memory_bytes=peak,
                 streamed_bytes_per_step=int(1000 * (1 - fraction)))
    return p


def _tiny(points: list[dict], batches=(1, 4), fractions=(0.0, 1.0)) -> dict:
    return {"schema_version": 1, "kind": landscape.KIND, "synthetic": True,
            "workload": {"model": "tiny-llama", "dtype": "float32", "isl": 8, "osl": 4},
            "total_device_budget": 1000, "available_bytes": 100, "batches": list(batches),
            "budget_fractions": list(fractions), "points": points}


def test_grid_is_powers_of_two_and_midpoints() -> None:
    assert grid_batches(256) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert grid_batches(40) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40]
    assert GRID_FRACTIONS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert grid_size(256) == 16 * 11


def test_bilinear_in_log2_batch_and_fraction() -> None:
    land = landscape.Landscape(_tiny([
        _point(1, 0.0, "ok", 10, 100, 10), _point(1, 1.0, "ok", 30, 50, 30),
        _point(4, 0.0, "ok", 20, 120, 20), _point(4, 1.0, "ok", 60, 60, 60)]))
    assert land.at(1, 0.0).throughput_tok_s == 10  # grid points are exact
    mid = land.at(2, 0.5)  # log2 2 is halfway between log2 1 and log2 4
    assert mid.status == "ok"
    assert mid.throughput_tok_s == pytest.approx((10 + 30 + 20 + 60) / 4)
    assert mid.tpot_ms == pytest.approx((100 + 50 + 120 + 60) / 4)
    edge = land.at(1, 0.25)
    assert edge.throughput_tok_s == pytest.approx(0.75 * 10 + 0.25 * 30)
    assert land.at(2, 0.0).throughput_tok_s == pytest.approx(15)  # not 10 + 10 / 3 (linear)
    with pytest.raises(UserInputError, match="covers 1..4"):
        land.at(5, 0.0)


def test_out_of_memory_wherever_a_neighbour_beyond_is() -> None:
    land = landscape.Landscape(_tiny([
        _point(1, 0.0, "ok", 10, 100, 10), _point(1, 1.0, "oom", peak=90),
        _point(4, 0.0, "ok", 20, 120, 20), _point(4, 1.0, "infeasible", peak=200)]))
    assert land.at(4, 0.0).status == "ok"  # on the grid line: the beyond corners weigh 0
    assert land.at(2, 0.0).status == "ok"
    assert land.at(1, 0.01).status == "oom"  # a measured OOM beyond: a surprise, run
    # The recording's plan said the corner beyond does not fit: the replayed plan says so too.
    p = land.at(3, 0.5)
    assert p.status == "infeasible" and p.predicted_peak_bytes >= 200
    assert land.best().batch == 4


def test_file_checks(tmp_path: Path) -> None:
    good = json.loads(SYNTHETIC.read_text())
    assert good["synthetic"] is True and "SYNTHETIC" in good["description"]
    for mutate, match in [
        (lambda d: d.update(schema_version=2), "schema_version 2"),
        (lambda d: d.update(kind="x"), "not an autotune landscape"),
        (lambda d: d["points"].pop(), "one point per grid node"),
        (lambda d: d["points"][0].update(status="maybe"), "status must be"),
        (lambda d: d.pop("batches"), "lacks batches"),
    ]:
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(SchemaError, match=match):
            landscape.validate(bad)
    (tmp_path / "t.json").write_text(json.dumps(good)[:500])
    with pytest.raises(SchemaError, match="not valid JSON"):
        landscape.read(tmp_path / "t.json")


def _engine(path: Path = SYNTHETIC, **kw) -> LandscapeEngine:
    config = EngineConfig(model="llama2-7b", engine="landscape", dtype="float16", device="cpu",
                          max_batch=256, max_seq_len=384, options=(("landscape", str(path)),),
                          **kw)
    return LandscapeEngine.load(config)


def test_landscape_engine_replays_and_is_registered() -> None:
    assert engine_class("landscape") is LandscapeEngine
    engine = _engine()
    runner = InProcessRunner(engine)
    total = engine.total_device_budget
    from autotune.measure.trial import TrialRequest

    ok = runner.run(TrialRequest(batch=32, budget=0, isl=128, osl=256, repeats=1, warmup=0))
    assert ok.status == "ok"
    assert ok.measurement["throughput_tok_s"] == pytest.approx(
        engine.landscape.at(32, 0.0).throughput_tok_s)
    assert ok.measurement["tpot_s"] > 0.2  # streams 12.95 GB a step over a 53 GB/s link
    # Predicted not to fit: the worker refuses it without running (the recorded limit).
    no = runner.run(TrialRequest(batch=256, budget=total, isl=128, osl=256))
    assert no.status == "infeasible" and "exceeds" in no.reason
    with pytest.raises(UserInputError, match="recorded at isl 128, osl 256"):
        runner.run(TrialRequest(batch=1, budget=0, isl=64, osl=256))
    with pytest.raises(UserInputError, match="--max-batch"):
        LandscapeEngine.load(EngineConfig(
            model="llama2-7b", engine="landscape", device="cpu", max_batch=512,
            options=(("landscape", str(SYNTHETIC)),)))
    with pytest.raises(UserInputError, match="--landscape"):
        LandscapeEngine.load(EngineConfig(model="llama2-7b", engine="landscape", device="cpu"))


def test_export_of_a_grid_study_round_trips(tmp_path: Path) -> None:
    engine = _engine()
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(),
                                direction="maximize", sampler=make_sampler("grid", 0, 256))
    study.set_user_attr("workload", engine.landscape.workload)
    study.set_user_attr("total_device_budget", engine.total_device_budget)
    study.set_user_attr("calibration", engine.compute_calibration())
    run_in_process(study, InProcessRunner(engine), trials=grid_size(256), max_batch=256,
                   isl=128, osl=256, total=engine.total_device_budget)
    data = from_study(study, command="test")
    path = landscape.write(data, tmp_path / "exported.json")
    back = landscape.read(path)
    assert back.batches == engine.landscape.batches
    assert back.fractions == engine.landscape.fractions
    for a, b in zip(back.grid_points(), engine.landscape.grid_points(), strict=True):
        assert a.status == b.status
        if a.status == "ok":
            assert a.throughput_tok_s == pytest.approx(b.throughput_tok_s, rel=1e-3)
    assert back.calibration["gemm_rows"]
    # Half a grid is not a landscape.
    partial = optuna.create_study(storage=optuna.storages.InMemoryStorage(),
                                  direction="maximize", sampler=make_sampler("grid", 0, 256))
    run_in_process(partial, InProcessRunner(engine), trials=20, max_batch=256, isl=128,
                   osl=256, total=engine.total_device_budget)
    with pytest.raises(UserInputError, match="not a full grid"):
        from_study(partial)


def test_latency_limits_are_constraints_end_to_end(storage_url: str) -> None:
    options = RunOptions(model="llama2-7b", engine="landscape", device="cpu", trials=6,
                         storage=storage_url, dtype="float16", repeats=1, max_tpot_ms=200.0,
                         early_stop=False, engine_options=(("landscape", str(SYNTHETIC)),))
    result = run_study(options)
    assert result.ran == 6
    study = load_study(open_storage(storage_url, create=False), result.study_name)
    assert result.study_name.endswith("-tpot200ms")
    for t in study.trials:
        assert set(t.constraints) == {"memory_gib", "tpot_ms"}
        if t.user_attrs["status"] == "ok":
            assert t.constraints["tpot_ms"] == pytest.approx(t.user_attrs["tpot_ms"] - 200.0,
                                                             abs=1e-2)
            assert "predicted_tpot_ms" in t.user_attrs  # the prior's figure beside it
    rec = recommend.build(study)
    assert rec["best"]["tpot_ms"] <= 200.0
    assert rec["workload"]["limits"] == {"max_tpot_ms": 200.0}
    assert study.user_attrs["calibration"]["h2d_gb_s"] == 53.0
    assert study.user_attrs["prior"]["fitted_on"] >= 1


def test_bad_limits_and_sampler_are_user_errors(storage_url: str) -> None:
    for kw in (dict(max_tpot_ms=-1.0), dict(max_latency_s=0), dict(sampler="annealing")):
        with pytest.raises(UserInputError):
            RunOptions(model="tiny-llama", device="cpu", storage=storage_url, **kw)


def test_cli_replays_and_exports_a_landscape(tmp_path: Path, autotune_here) -> None:
    db = f"sqlite:///{tmp_path / 'l.db'}"
    run = autotune_here("run", "--landscape", str(SYNTHETIC), "--trials", "3", "--storage", db,
                        "--max-tpot-ms", "180", "--out", str(tmp_path / "rec.json"))
    assert run.returncode == 0, run.stderr
    assert "best: batch" in run.stdout
    rec = recommend.read(tmp_path / "rec.json")
    assert rec["best"]["tpot_ms"] <= 180
    # `show` ranks feasible trials first: its first row is the recommendation.
    show = autotune_here("show", "--storage", db)
    rows = [line for line in show.stdout.splitlines() if line.startswith("│")]
    assert rows[0].split("│")[1].strip() == str(rec["best"]["trial"]), show.stdout
    # Three trials are not a grid: export explains, in one line, with exit code 2.
    exp = autotune_here("export", "--storage", db, "--landscape", str(tmp_path / "l.json"))
    assert exp.returncode == 2 and "not a full grid" in exp.stderr


def test_landscape_points_are_physical() -> None:
    land = landscape.read(SYNTHETIC)
    for p in land.grid_points():
        if p.status == "ok":
            streamed = p.streamed_bytes_per_step
            assert p.tpot_ms / 1e3 >= streamed / 53e9 * 0.999  # never faster than the link
            assert math.isclose(p.throughput_tok_s, p.batch * 256 / land.e2e_s(p), rel_tol=1e-3)
    assert land.best(Limits(max_tpot_ms=1.0)) is None


def test_a_measured_peak_over_the_limit_is_recorded_infeasible_and_learned() -> None:
    """TensorRT's memory is outside PyTorch's allocator, so no cap holds it: a trial whose
    NVML peak passes --gpu-memory-limit is measured, kept, recorded as infeasible (never a
    recommendation) and its shortfall is learned by the engine's later plans."""
    from dataclasses import replace

    from autotune.measure.trial import TrialRequest, run_trial

    class Escaping(LandscapeEngine):  # an engine whose peak passes its plan by 1 GiB
        learned: list[tuple[int, int]] = []

        def simulate_measurement(self, *args: Any, **kw: Any) -> Any:
            m = super().simulate_measurement(*args, **kw)
            return replace(m, peak_device_bytes=m.peak_reserved_bytes + 2**30)

        def learn_peak(self, planned: int, measured: int) -> None:
            self.learned.append((planned, measured))

    engine = _engine()
    escaping = Escaping(engine.config, engine.landscape)
    outcome = run_trial(escaping, TrialRequest(batch=32, budget=0, isl=128, osl=256,
                                               repeats=1, warmup=0))
    assert outcome.status == "infeasible" and outcome.measurement is not None
    assert "exceeds --gpu-memory-limit" in outcome.reason and "the memory plan said" in outcome.reason
    assert escaping.learned == [(outcome.plan["total"], outcome.measurement["peak_device_bytes"])]


def _all_points(key: str, value: object):
    return lambda d: [p.update({key: value}) for p in d["points"] if p["status"] == "ok"]


@pytest.mark.parametrize(("mutate", "match"), [
    (_all_points("throughput_tok_s", float("nan")), "throughput_tok_s: expected a number"),
    (_all_points("throughput_tok_s", -5.0), "throughput_tok_s: expected a number"),
    (_all_points("throughput_tok_s", float("inf")), "throughput_tok_s: expected a number"),
    (_all_points("tpot_ms", -1), "tpot_ms: expected a time"),
    (_all_points("peak_memory_bytes", "8GiB"), "peak_memory_bytes: expected bytes"),
    (lambda d: d["calibration"].update(h2d_gb_s=float("nan")), "h2d_gb_s: expected a bandwidth"),
    (lambda d: d["calibration"]["gemm_s"].pop(), "gemm_s: expected 6 times"),
    (lambda d: d.update(total_device_budget=-1), "total_device_budget: expected a whole"),
    (lambda d: d.update(available_bytes=0.5), "available_bytes: expected a whole"),
    (lambda d: d.update(schema_version=True), "schema_version True is not supported"),
    (lambda d: d["workload"].pop("osl"), "workload osl: expected a whole number"),
    (lambda d: d["batches"].__setitem__(0, 1.5), "batches: expected whole numbers"),
], ids=["nan", "negative", "infinite", "tpot", "peak-text", "h2d-nan", "gemm-short",
        "total-negative", "available-fraction", "version-true", "no-osl", "batch-fraction"])
def test_every_value_a_landscape_carries_is_checked(mutate, match) -> None:
    """Issue 19: all-NaN throughputs ran as `nan tok/s`, negative and infinite ones ran, a NaN
    link speed steered the search to batch 2 at 15.3 tok/s (the valid file: batch 32, 121.2)."""
    bad = json.loads(SYNTHETIC.read_text())
    mutate(bad)
    with pytest.raises(SchemaError, match=match):
        landscape.validate(bad)


def test_the_repositorys_own_landscapes_replay_at_their_own_lengths(autotune_here, tmp_path) -> None:
    """Issue 19: `autotune run --landscape benchmarks/landscapes/...-isl128-osl8-h100.json`
    crashed each trial (recorded at osl 8; got osl 256). Its lengths are adopted; others given
    are refused in one line before any trial."""
    from test_own_inputs import refused

    recorded = sorted((Path(__file__).parents[1] / "benchmarks" / "landscapes").glob("*.json"))
    assert recorded
    for path in recorded:
        landscape.read(path)  # each one is valid
    path = recorded[0]
    url = f"sqlite:///{tmp_path / 'b.db'}"
    r = autotune_here("run", "--landscape", str(path), "--trials", "3", "--storage", url,
                      "--out", str(tmp_path / "rec.json"))
    assert r.returncode == 0, r.stderr
    workload = recommend.read(tmp_path / "rec.json")["workload"]
    assert (workload["isl"], workload["osl"]) == (128, 8)
    refused(autotune_here("run", "--landscape", str(path), "--trials", "3", "--osl", "16",
                          "--storage", url, "--study", "other"),
            "recorded at isl 128, osl 8; got isl 128, osl 16")
