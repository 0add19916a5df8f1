"""The study loop end to end on a real SQLite file, with real worker subprocesses."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import optuna
import pytest
from conftest import ANALYTIC
from fakes import KV_PER_SEQ, MiB

from autotune.errors import NoCompletedTrialError, UserInputError
from autotune.results import recommend
from autotune.storage import load_study, open_storage
from autotune.tune.study import RunOptions, run_study


def _options(storage_url: str, **kw) -> RunOptions:
    base = dict(model="tiny-llama", engine=ANALYTIC, device="cpu", trials=6, isl=8, osl=4,
                max_batch=64, storage=storage_url, dtype="float32", repeats=2)
    base.update(early_stop=False)  # these tests count trials; early stop has its own
    base.update(kw)
    return RunOptions(**base)


def _study(storage_url: str) -> optuna.Study:
    return load_study(open_storage(storage_url, create=False), None)


def test_study_runs_records_and_resumes(storage_url: str) -> None:
    events = []
    result = run_study(_options(storage_url), progress=events.append)
    # The file is whole when the run returns: no -wal beside it holding the newest trials
    # (this process goes on, as a notebook does; its storage is closed all the same).
    db = Path(storage_url.removeprefix("sqlite:///"))
    assert sorted(p.name for p in db.parent.iterdir()) == ["test.db"]
    assert result.ran == 6 and len(events) == 6
    assert [e.done for e in events] == [1, 2, 3, 4, 5, 6]
    study = _study(storage_url)
    trials = study.get_trials()
    assert len(trials) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:
        a = t.user_attrs
        assert a["status"] == "ok"
        assert a["throughput_tok_s"] > 0 and a["tpot_ms"] > 0 and a["ttft_ms"] > 0
        assert a["predicted_peak_bytes"] == a["memory_plan"]["total"]
        assert a["budget_applied_bytes"] <= a["budget_bytes"]
        assert len(a["e2e_samples_s"]) == 2
    # The engine rounds budgets to 8 units: autotune's search never measures one twice.
    ran = [(t.user_attrs["batch"], t.user_attrs["budget_applied_bytes"]) for t in trials]
    assert len(set(ran)) == len(ran), ran
    assert study.user_attrs["workload"]["model"] == "tiny-llama"
    assert study.user_attrs["total_device_budget"] == 8 * 64 * MiB
    # SQLite is in WAL mode so that the dashboard can read while the study writes.
    path = storage_url.removeprefix("sqlite:///")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    # The same command again resumes up to the new total, keeping every earlier trial, and
    # says so first.
    steps: list[str] = []
    result = run_study(_options(storage_url, trials=8), on_step=steps.append)
    assert result.ran == 2
    assert steps[0] == f"resuming study {result.study_name}: 6 finished trials kept in " \
        f"{storage_url}"
    assert len(_study(storage_url).get_trials()) == 8
    # ... and with nothing left to do, runs nothing.
    result = run_study(_options(storage_url, trials=8))
    assert result.ran == 0 and result.notes


def test_study_stops_early_once_converged(storage_url: str) -> None:
    result = run_study(_options(storage_url, trials=30, early_stop=True))
    assert 3 <= result.ran < 30
    assert result.notes[0].startswith(f"converged after {result.ran} trials")
    study = _study(storage_url)
    assert len(study.trials) == result.ran  # stopped before asking: no pruned leftovers
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # The same command again finds it converged and runs nothing.
    again = run_study(_options(storage_url, trials=30, early_stop=True))
    assert again.ran == 0 and again.notes[0].startswith("converged")


def test_estimated_trials_say_so_and_the_best_is_confirmed(storage_url: str) -> None:
    # On the modelled clock: the estimate and the confirmation are timed at different moments,
    # and a loaded machine's real sleeps differed by up to 25% between them.
    result = run_study(_options(storage_url, trials=3, osl=40, decode_steps=8,
                                engine_options=(("clock", "modelled"),)))
    study = _study(storage_url)
    for t in study.trials:
        assert t.user_attrs["measurement"].startswith("estimated: prefill + 8 of 39 decode")
    best = study.best_trial
    c = study.user_attrs["confirmation"]
    assert c["trial"] == best.number and c["status"] == "ok"
    assert c["measurement"].startswith("full")
    assert c["estimated_throughput_tok_s"] == best.value
    # The analytic engine's steps are alike (a missing extrapolation would be ~5x off).
    assert abs(c["estimate_error_pct"]) < 1
    assert any(n.startswith(f"confirmed trial {best.number} over all 39") for n in result.notes)
    rec = recommend.build(study)
    assert rec["confirmation"] == c and rec["best"]["measurement"].startswith("estimated")


def test_full_measurements_need_no_confirmation(storage_url: str) -> None:
    run_study(_options(storage_url, trials=2, osl=40, decode_steps=None))
    study = _study(storage_url)
    assert all(t.user_attrs["measurement"] == "full" for t in study.trials)
    assert "confirmation" not in study.user_attrs


def test_memory_limit_records_infeasible_without_running(storage_url: str) -> None:
    # 600 MiB: nothing beyond a handful of sequences fits (16 MiB of KV cache each).
    # TPE proposes what does not fit (autotune's sampler never does): the worker must refuse it.
    run_study(_options(storage_url, trials=8, gpu_memory_limit=600 * MiB, max_batch=256,
                       sampler="tpe"))
    study = _study(storage_url)
    infeasible = [t for t in study.trials if t.user_attrs["status"] == "infeasible"]
    ran = [t for t in study.trials if t.user_attrs["status"] == "ok"]
    assert infeasible, "a 600 MiB limit must make large batches infeasible"
    for t in infeasible:
        assert t.constraints["memory_gib"] > 0
        assert "e2e_s" not in t.user_attrs  # never run
        assert t.user_attrs["predicted_peak_bytes"] > t.user_attrs["available_bytes"]
        assert "exceeds" in t.user_attrs["reason"]
    for t in ran:
        assert t.user_attrs["batch"] * KV_PER_SEQ < 600 * MiB
    if ran:
        assert study.best_trial.user_attrs["status"] == "ok"


@pytest.mark.parametrize(
    ("fault", "status", "reason"),
    [
        ("oom", "oom", "out of memory"),
        ("error", "error", "ValueError: simulated engine bug"),
        ("abort", "crash", "SIGABRT"),
        ("abort_slowly", "crash", "SIGABRT"),  # hung up 3 s before it was gone
        ("kill", "crash", "SIGKILL"),
        ("hang", "timeout", "no result within"),
    ],
)
def test_faults_become_explained_trials(storage_url: str, fault: str, status: str,
                                        reason: str) -> None:
    # Only the hang needs the short timeout; the others have a minute to come back (a core
    # dump of an aborted torch process can take seconds on a loaded machine).
    opts = _options(storage_url, trials=2, engine_options=(("fault", fault), ("fault_batch", 1)),
                    trial_timeout_s=2.0 if fault == "hang" else 60.0)
    run_study(opts)
    trials = _study(storage_url).trials
    assert len(trials) == 2  # the study went on after the first fault
    for t in trials:
        assert t.user_attrs["status"] == status
        assert reason in t.user_attrs["reason"]
        if status == "oom":
            assert t.state == optuna.trial.TrialState.COMPLETE and t.constraints["memory_gib"] > 0
        else:
            assert t.state == optuna.trial.TrialState.FAIL


def test_fault_only_at_large_batch_keeps_the_rest(storage_url: str) -> None:
    opts = _options(storage_url, trials=8, engine_options=(("fault", "abort"), ("fault_batch", 8)))
    run_study(opts)
    study = _study(storage_url)
    for t in study.trials:
        expected = "crash" if t.params["batch"] >= 8 else "ok"
        assert t.user_attrs["status"] == expected
    rec = recommend.build(study)
    assert rec["best"]["batch"] < 8


def test_export_without_completed_trial_is_an_error(storage_url: str) -> None:
    run_study(_options(storage_url, trials=2, engine_options=(("fault", "error"),)))
    with pytest.raises(NoCompletedTrialError):
        recommend.build(_study(storage_url))


def test_recommendation_round_trip(storage_url: str, tmp_path) -> None:
    run_study(_options(storage_url, trials=6))
    rec = recommend.build(_study(storage_url))
    path = recommend.write(rec, tmp_path / "rec.json")
    back = recommend.read(path)
    assert back == json.loads(json.dumps(rec))
    best = back["best"]
    assert best["throughput_tok_s"] == max(c["throughput_tok_s"] for c in back["pareto_front"])
    mems = [c["peak_memory_bytes"] for c in back["pareto_front"]]
    tps = [c["throughput_tok_s"] for c in back["pareto_front"]]
    assert mems == sorted(mems) and tps == sorted(tps)
    assert back["reproduce"].startswith("autotune bench --model tiny-llama")


def test_python_callers_forms_are_taken_and_wrong_types_refused(tmp_path) -> None:
    """RunOptions from Python: a Path, "8GiB", a dict of options and a list of GPUs are what
    a caller would pass; a wrong type is one line (UserInputError), not a TypeError later."""
    o = _options(f"sqlite:///{tmp_path}/x.db", storage=tmp_path / "y.db",
                 gpu_memory_limit="8GiB", engine_options={"clock": "modelled"})
    assert o.storage == f"sqlite:///{tmp_path / 'y.db'}"
    assert o.gpu_memory_limit == 8 * 2**30 and o.engine_options == (("clock", "modelled"),)
    url = f"sqlite:///{tmp_path}/x.db"
    for kw, said in [(dict(trial_timeout_s="10"), "trial_timeout_s: expected an integer or "
                                                    "a number"),
                     (dict(device="gpu"), "device: expected cpu, cuda or cuda:N"),
                     (dict(device="cuda", gpus="0,1"), "gpus: expected a sequence"),
                     (dict(warmup=0.5), "warmup: expected an integer"),
                     (dict(gpu_memory_limit=9.1e9), "gpu_memory_limit: expected an integer"),
                     (dict(engine_options=(("slots",),)), "engine_options: expected (key, "
                                                          "value) pairs")]:
        with pytest.raises(UserInputError, match=re.escape(said)):
            _options(url, **kw)


def test_a_recommendation_is_written_as_open_would_write_it(tmp_path) -> None:
    """Readable by the serving process of another user where the umask allows (it made
    0600 files, mkstemp's mode), and a file replaced keeps its own mode."""
    from autotune import jsonfile

    old = os.umask(0o022)
    try:
        assert (jsonfile.write_atomic({"a": 1}, tmp_path / "r.json").stat().st_mode
                & 0o777) == 0o644
        os.umask(0o077)
        assert (jsonfile.write_atomic({"a": 1}, tmp_path / "private.json").stat().st_mode
                & 0o777) == 0o600
        (tmp_path / "r.json").chmod(0o640)
        assert (jsonfile.write_atomic({"a": 2}, tmp_path / "r.json").stat().st_mode
                & 0o777) == 0o640
    finally:
        os.umask(old)
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []


@pytest.mark.parametrize(
    "kw",
    [dict(trials=0), dict(isl=-1), dict(osl=0), dict(max_batch=0), dict(model="gpt-9"),
     dict(engine="warp-drive"), dict(storage="not a url"), dict(dtype="int3"),
     dict(isl=1000, osl=100)],
)
def test_bad_options_fail_before_anything_is_written(storage_url: str, kw) -> None:
    with pytest.raises(UserInputError):
        _options(storage_url, **kw)
    assert not os.path.exists(storage_url.removeprefix("sqlite:///"))


def test_a_slow_load_is_reported_while_it_lasts(storage_url: str) -> None:
    """A large model takes minutes to load: the run hears of it every so often, then once more
    with what was loaded (the CLI prints both)."""
    from autotune.engines import EngineConfig
    from autotune.measure.worker import Worker

    config = EngineConfig(model="tiny-llama", engine=ANALYTIC, dtype="float32", device="cpu",
                          options=(("load_sleep_s", 3),))
    waited: list[float] = []
    with Worker(config) as worker:
        info = worker.start(on_wait=waited.append, every_s=0.3)
    assert info.load_s >= 3
    assert len(waited) >= 2 and waited == sorted(waited) and waited[-1] < info.load_s + 5

    events: list[tuple[str, float, object]] = []
    run_study(_options(storage_url, trials=1), on_worker=lambda *e: events.append(e))
    assert [(device, info is not None) for device, _, info in events] == [("cpu", True)]


def test_what_a_load_says_it_is_doing_reaches_the_progress_line(
        storage_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A load of minutes (Torch-TensorRT compiling) says its phase: the progress line says
    it, with the time, in place of a bare "still loading"."""
    from autotune.measure import worker

    monkeypatch.setattr(worker, "NOTICE_S", 0.3)
    steps: list[str] = []
    run_study(_options(storage_url, trials=1, engine_options=(("load_sleep_s", 1.5),)),
              on_step=steps.append)
    said = [s for s in steps if "loading the model" in s]
    assert not [s for s in steps if "pinning" in s and s not in said], steps  # said once
    assert said and all(re.fullmatch(r"cpu: loading the model: pinning the weights \(\d+ s\)\.\.\.",
                                     s) for s in said), steps


def test_a_worker_dying_at_load_is_reported_once_not_in_a_loop() -> None:
    """A worker that aborts while it loads (malloc's abort, H100 2026-12-05) closes its pipe a
    while before it is gone: the wait ends there, with the signal, not thousands of "still
    loading" lines in a second."""
    from autotune.engines import EngineConfig
    from autotune.measure.worker import Worker, WorkerError

    config = EngineConfig(model="tiny-llama", engine=ANALYTIC, dtype="float32", device="cpu",
                          options=(("fault_at_load", "abort"),))
    waited: list[float] = []
    with Worker(config) as worker, pytest.raises(WorkerError, match="SIGABRT"):
        worker.start(on_wait=waited.append, every_s=0.3)
    assert len(waited) <= 3 + max(waited, default=0) / 0.3, waited


def test_a_worker_that_hangs_up_and_lingers_is_killed_and_the_next_trial_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial's worker that closed its pipe but is still there after _DYING_S is killed: the
    trial is a crash that says so, and the next trial gets a new worker."""
    from autotune.engines import EngineConfig
    from autotune.measure import worker as worker_module
    from autotune.measure.trial import TrialRequest
    from autotune.measure.worker import Worker

    monkeypatch.setattr(worker_module, "_DYING_S", 0.5)  # the fault lingers 3 s
    config = EngineConfig(model="tiny-llama", engine=ANALYTIC, dtype="float32", device="cpu",
                          options=(("fault", "abort_slowly"), ("fault_batch", 2)))
    with Worker(config) as worker:
        worker.start()
        crash = worker.run(TrialRequest(batch=2, budget=0, isl=4, osl=4, repeats=1, warmup=0))
        assert crash.status == "crash"
        assert "closed its pipe and did not exit within 0 s; killed" in crash.reason
        ok = worker.run(TrialRequest(batch=1, budget=0, isl=4, osl=4, repeats=1, warmup=0))
        assert ok.status == "ok", ok.reason
        assert worker.restarts == 1


def test_a_study_resumes_only_on_the_step_it_measured(storage_url: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An option the engine resolves at load (native's compile and attention: auto) may
    resolve otherwise on resume (a changed default, another host): the study refuses to mix
    the two, names the options that give its own step, resumes with them typed out, and its
    bench line carries what the step resolved to."""
    from autotune.results import recommend

    engine = "fakes:ResolvingEngine"
    monkeypatch.setenv("FAKE_STEP", "slow")
    run_study(_options(storage_url, engine=engine, trials=2))
    monkeypatch.setenv("FAKE_STEP", "fast")
    with pytest.raises(UserInputError, match=r"measured another decode step: step 'slow' "
                                             r"\(this run: 'fast'\); resume it with "
                                             r"--engine-option step=slow, or give"):
        run_study(_options(storage_url, engine=engine, trials=3))
    assert len(_study(storage_url).trials) == 2  # nothing measured
    result = run_study(_options(storage_url, engine=engine, trials=3,
                                engine_options=(("step", "slow"),)))
    assert result.ran == 1
    rec = recommend.build(_study(storage_url))
    assert rec["reproduce"].endswith("--engine-option step=slow"), rec["reproduce"]


def test_a_limit_nothing_fits_in_is_an_error_before_any_trial(storage_url: str) -> None:
    """Below the smallest configuration no trial could run: the study says so at once instead
    of spending its trials on configurations the memory plan refuses."""
    with pytest.raises(UserInputError, match=r"nothing fits: the smallest configuration "
                                             r"\(batch 1, 0% resident\) needs") as refused:
        run_study(_options(storage_url, gpu_memory_limit=300 * MiB))
    # ... and where it goes, by the plan's parts
    assert re.search(r"needs [\d.]+ \w+ of device memory \(resident weights [\d.]+ \w+, "
                     r".*KV cache [\d.]+ \w+", str(refused.value)), str(refused.value)
    from autotune.storage import study_names

    assert study_names(open_storage(storage_url)) == []  # refused: no empty study left
