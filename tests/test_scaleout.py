"""Several workers on one study: exact trial claims, joining, and PostgreSQL for real.

The PostgreSQL test needs a server: ``.ci/run`` starts one on loopback and exports
``AUTOTUNE_TEST_POSTGRES_URL`` (``AUTOTUNE_TEST_POSTGRES_URL=$(.ci/postgres) pytest`` does the
same by hand); without it that test is skipped and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import ANALYTIC
from test_cli import RUN, _error, autotune

from autotune.errors import UserInputError
from autotune.results import recommend
from autotune.storage import load_study, open_storage
from autotune.tune import budget
from autotune.tune.join import join_study
from autotune.tune.study import RunOptions, run_study

PG_URL = os.environ.get("AUTOTUNE_TEST_POSTGRES_URL")
# Modelled step times make the two storages' figures exact (real sleeps on a loaded CI machine
# once ranked batch 16 over 32, 24% apart); the 1.5 s budget change keeps trials long enough
# for the joining workers to claim some (with 0.5 s, a loaded machine's joiners started late
# enough to get one trial each).
EXACT = (("clock", "modelled"),)
SLOW_EXACT = (("budget_sleep_s", "1.5"), *EXACT)
GRID = [{"batch": b, "budget_fraction": f} for b in (1, 2, 4, 8, 16, 32) for f in (0.0, 1.0)]


def _options(storage_url: str, **kw) -> RunOptions:
    base = dict(model="tiny-llama", engine=ANALYTIC, device="cpu", trials=2, isl=8, osl=4,
                max_batch=32, storage=storage_url, dtype="float32", repeats=1)
    base.update(early_stop=False)  # these tests count trials; early stop has its own
    base.update(kw)
    return RunOptions(**base)


def _made_as_a_run_makes_it(options: RunOptions) -> optuna.Study:
    """The study a run of ``options`` makes, made first (to enqueue trials into it): autotune
    refuses studies it did not make."""
    from autotune.tune.study import create_or_load, resolve_gpu_name

    study, _ = create_or_load(options, resolve_gpu_name(options))
    return study


def test_claims_are_exact_when_workers_race(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="race")
    study.enqueue_trial({"x": 0.5})  # enqueued: counts, in number order
    asked = [study.ask() for _ in range(4)]  # four workers asked before any of them counted
    assert [budget.claim(study, t, 3) for t in asked] == [True, True, True, False]
    assert study.trials[3].state == optuna.trial.TrialState.PRUNED
    assert study.trials[3].user_attrs["status"] == budget.OVER_BUDGET
    assert not budget.has_work(study, 3)
    # An interrupted trial gives its place back; a later trial takes it.
    asked[1].set_user_attr("status", budget.INTERRUPTED)
    study.tell(asked[1], state=optuna.trial.TrialState.FAIL)
    assert budget.has_work(study, 3)
    late = study.ask()
    assert budget.claim(study, late, 3)
    for t in (asked[0], asked[2], late):
        study.tell(t, 1.0)
    assert budget.spent(study) == 3


def test_worker_joins_with_the_study_options_and_refuses_another_gpu(
        storage_url: str, cli_env) -> None:
    opts = _options(storage_url, trials=2, engine_options=(("budget_sleep_s", "0"),), seed=7)
    run_study(opts)
    study = load_study(open_storage(storage_url), None)
    assert study.user_attrs["trials"] == 2
    study.set_user_attr("trials", 3)  # room for one more trial: the joiner runs exactly that
    result = join_study(storage_url, study.study_name, device="cpu", engines=(ANALYTIC,))
    assert result.ran == 1
    assert budget.spent(study) == 3
    assert study.user_attrs["run_options"]["seed"] == 7  # the study's options, kept as they were
    r = autotune("worker", "--storage", storage_url, "--device", "cpu", "--engine", ANALYTIC,
                 env=cli_env)
    assert r.returncode == 0 and "already has 3 finished trials" in r.stderr, r.stderr

    workload = dict(study.user_attrs["workload"], gpu="NVIDIA H100 80GB HBM3")
    study.set_user_attr("workload", workload)
    r = autotune("worker", "--storage", storage_url, "--study", study.study_name, "--device",
                 "cpu", "--engine", ANALYTIC, env=cli_env)
    _error(r, "measures 'NVIDIA H100 80GB HBM3'", "must be comparable")
    optuna.create_study(storage=open_storage(storage_url), study_name="bare")
    r = autotune("worker", "--storage", storage_url, "--study", "bare", "--device", "cpu",
                 env=cli_env)
    _error(r, "has no stored workload yet", "autotune run")
    assert budget.spent(load_study(open_storage(storage_url), study.study_name)) == 3


def _configs(study: optuna.Study) -> list[tuple[int, float]]:
    return sorted((t.params["batch"], t.params["budget_fraction"]) for t in study.trials
                  if t.state == optuna.trial.TrialState.COMPLETE)


@pytest.mark.skipif(PG_URL is None, reason="AUTOTUNE_TEST_POSTGRES_URL is unset: no PostgreSQL "
                    "server (.ci/run starts one; or export AUTOTUNE_TEST_POSTGRES_URL=$(.ci/postgres))")
def test_three_workers_on_postgresql(tmp_path: Path, cli_env) -> None:
    from sqlalchemy.engine import make_url

    password = make_url(PG_URL).password
    assert password, "the test URL must hold a password: its redaction is tested here"
    name = f"scaleout-{uuid.uuid4().hex[:8]}"
    created = _made_as_a_run_makes_it(_options(
        PG_URL, trials=len(GRID), study_name=name, engine_options=SLOW_EXACT))
    for params in GRID:  # the same points on both storages: their exports can be compared
        created.enqueue_trial(params)

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "autotune", *args], env=cli_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path)

    procs = [start(*RUN, "--trials", str(len(GRID)), "--storage", PG_URL, "--study", name,
                   *(f"--engine-option={k}={v}" for k, v in SLOW_EXACT),
                   "--out", str(tmp_path / "run.json"))]
    deadline = time.monotonic() + 120
    while "trials" not in optuna.load_study(study_name=name, storage=PG_URL).user_attrs:
        assert procs[0].poll() is None and time.monotonic() < deadline, procs[0].communicate()
        time.sleep(0.2)
    procs += [start("worker", "--storage", PG_URL, "--study", name, "--device", "cpu",
                    "--engine", ANALYTIC)
              for _ in range(2)]
    logs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr
        logs.append(stdout + stderr)
    r = autotune("export", "--storage", PG_URL, "--study", name, "--out",
                 str(tmp_path / "pg.json"), env=cli_env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    logs.append(r.stdout + r.stderr)

    study = optuna.load_study(study_name=name, storage=PG_URL)
    trials = study.trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(GRID)  # every trial of the budget completed ...
    assert _configs(study) == sorted((p["batch"], p["budget_fraction"]) for p in GRID)  # once
    assert all(t.state.is_finished() for t in trials)  # nothing left RUNNING or WAITING
    assert all(t.user_attrs["status"] == budget.OVER_BUDGET for t in trials
               if t.state == optuna.trial.TrialState.PRUNED)
    assert len({t.user_attrs["pid"] for t in complete}) >= 2, "the joiners ran no trial"

    # The same points on SQLite give the same recommendation where timing does not enter.
    sqlite_url = f"sqlite:///{tmp_path / 'same.db'}"
    same = _options(sqlite_url, trials=len(GRID), study_name=name, engine_options=EXACT)
    local = _made_as_a_run_makes_it(same)
    for params in GRID:
        local.enqueue_trial(params)
    run_study(same)
    pg = recommend.read(tmp_path / "pg.json")
    lite = recommend.build(load_study(open_storage(sqlite_url), name))
    assert _configs(load_study(open_storage(sqlite_url), name)) == _configs(study)
    for key in ("trials", "workload", "total_device_budget", "automatic_budget"):
        assert pg[key] == lite[key], key
    # Timed on the modelled clock, the same points have the same figures (to the rounding of
    # clocks that have run for different times): the same best.
    assert pg["best"] == pytest.approx(lite["best"], rel=1e-9)
    # ... and the very same trials, copied into SQLite, export to the very same JSON.
    copy_url = f"sqlite:///{tmp_path / 'copy.db'}"
    optuna.copy_study(from_study_name=name, from_storage=PG_URL,
                      to_storage=open_storage(copy_url))
    copied = recommend.build(load_study(open_storage(copy_url), name))
    # Only the export's own timestamp may differ.
    assert copied.pop("created_utc") >= pg.pop("created_utc")
    assert copied == pg

    # The password is in no log line, no exported JSON, no stored attribute.
    assert pg["study"]["storage"] == make_url(PG_URL).render_as_string(hide_password=True)
    for text in logs + [(tmp_path / "pg.json").read_text(), (tmp_path / "run.json").read_text(),
                        json.dumps(study.user_attrs),
                        json.dumps([t.user_attrs for t in trials])]:
        assert password not in text
    optuna.delete_study(study_name=name, storage=PG_URL)


def test_password_never_shown_when_the_server_is_unreachable(tmp_path: Path, cli_env) -> None:
    url = "postgresql+psycopg://tuner:hunter2-secret@127.0.0.1:9/autotune"
    for args in (("worker", "--storage", url, "--study", "x", "--device", "cpu"),
                 ("show", "--storage", url),
                 (*RUN, "--storage", url)):
        r = autotune(*args, env=cli_env, cwd=tmp_path)
        _error(r, "storage")
        assert "hunter2" not in r.stdout + r.stderr
        assert "tuner:***@127.0.0.1" in r.stderr or "cannot reach" in r.stderr


def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    import pickle

    from autotune.errors import UserInputError
    from autotune.models import CheckpointWeights

    canary = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserInputError, match="no \\*.safetensors files"):
        CheckpointWeights(str(tmp_path))
    assert not canary.exists()


def test_the_storage_chooses_no_code_and_no_pickle_path(tmp_path: Path, storage_url: str,
                                                        cli_env) -> None:
    """Whoever can write the database must not run code on the workers: an engine the
    worker's own command line does not allow is refused before anything is imported, and a
    host path option (the TensorRT cache, where a pickle is read) is never taken from it."""
    run_study(_options(storage_url, trials=1))
    study = load_study(open_storage(storage_url), None)
    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nclass X: pass\n")
    env = dict(cli_env, PYTHONPATH=f"{tmp_path}{os.pathsep}{cli_env['PYTHONPATH']}")
    r = autotune("worker", "--storage", storage_url, "--device", "cpu", env=env)
    _error(r, f"runs the engine '{ANALYTIC}'", f"--engine {ANALYTIC}")  # not allowed by default
    stored = dict(study.user_attrs["run_options"], engine="evilmod:X")
    study.set_user_attr("run_options", stored)
    r = autotune("worker", "--storage", storage_url, "--device", "cpu", "--engine", ANALYTIC,
                 env=env)
    _error(r, "runs the engine 'evilmod:X'", "never chooses code")
    assert not marker.exists()

    from autotune.tune.join import joined_options

    trt = dict(stored, engine="tensorrt", model="tiny-llama",
               engine_options=[["trt_cache_dir", "/from/the/storage"], ["opt_batch", "8"]])
    kw = dict(storage=storage_url, study_name="s", device="cpu", gpus=(), trials=2)
    assert joined_options(trt, **kw).engine_options == (("opt_batch", "8"),)
    mine = joined_options(trt, **kw, host_options=(("trt_cache_dir", str(tmp_path)),))
    assert dict(mine.engine_options) == {"opt_batch": "8", "trt_cache_dir": str(tmp_path)}
    with pytest.raises(UserInputError, match="only its own host's options"):
        joined_options(trt, **kw, host_options=(("opt_batch", "4"),))
