"""What autotune promises to survive (README, "What survives what"), one test per fault.

Each test breaks something for real where it can (SIGKILL, a lock held by another process, a
damaged file, a full tmpfs) and checks the promise: a clear message, nothing lost, nothing
overwritten, the rerun resumes. Worker crashes, hangs and OOMs are in test_study.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import ANALYTIC
from test_cli import RUN, _error

from autotune.errors import EngineUnavailableError, SchemaError, StorageError
from autotune.results import recommend
from autotune.storage import explain, load_study, open_storage
from autotune.tune import budget, resume
from autotune.tune.study import RunOptions, run_study


def _options(storage_url: str, **kw) -> RunOptions:
    base = dict(model="tiny-llama", engine=ANALYTIC, device="cpu", trials=2, isl=8, osl=4,
                max_batch=32, storage=storage_url, dtype="float32", repeats=1, warmup=0)
    base.update(early_stop=False)  # these tests count trials; early stop has its own
    base.update(kw)
    return RunOptions(**base)


def _study(url: str) -> optuna.Study:
    return load_study(open_storage(url, create=False), None)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------
# The tuner itself killed mid-study


def _running_trial(db: Path) -> bool:
    """A trial has completed and another runs, its process recorded (resume.mark_started) and
    its configuration chosen (a trial killed before that has nothing to retry)."""
    try:
        with sqlite3.connect(db, timeout=5) as conn:  # not mode=ro: it can fail beside WAL
            conn.execute("PRAGMA query_only = ON")
            states = [r[0] for r in conn.execute("SELECT state FROM trials")]
            marked = conn.execute(
                "SELECT count(*) FROM trials t JOIN trial_user_attributes a "
                "ON a.trial_id = t.trial_id WHERE t.state = 'RUNNING' AND a.key = 'pid' "
                "AND EXISTS (SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id "
                "AND p.param_name = 'budget_fraction')"
            ).fetchone()[0]
    except sqlite3.Error:
        return False
    return "COMPLETE" in states and marked > 0


# The first trial finishes; the next one hangs in its worker (until the trial timeout, 120 s):
# a stop sent once it is seen running finds it running, however slow the machine. (A trial
# of a fixed length, 1.5 s, could end first when a busy CI machine delayed the stop.)
_HANGS_AFTER_ONE = ("--engine-option", "fault=hang", "--engine-option", "fault_after=1",
                    "--trial-timeout", "120")


def test_tuner_killed_mid_study_resumes(tmp_path: Path, storage_url: str, cli_env, autotune_here) -> None:
    db = Path(storage_url.removeprefix("sqlite:///"))
    # 2 trials, the second hanging (it runs when the tuner is killed); the rerun's new worker
    # runs its first configuration, the killed trial's retry.
    args = (*RUN, "--trials", "2", "--no-early-stop", "--storage", storage_url, "--study", "k",
            *_HANGS_AFTER_ONE, "--out", str(tmp_path / "rec.json"))
    proc = _start_until(args, cli_env, lambda pid: _running_trial(db), **QUIET)
    workers = _children(proc.pid)
    assert workers, "the tuner has no worker process"
    os.kill(proc.pid, signal.SIGKILL)  # the tuner, mid-trial
    proc.wait()
    try:  # its worker dies with it: an orphan would measure beside the rerun's worker
        _wait_gone(workers)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    before = {t.number: t for t in _study(storage_url).trials}
    dead = [n for n, t in before.items() if t.state == optuna.trial.TrialState.RUNNING]
    completed = {n: t.value for n, t in before.items()
                 if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(dead) == 1 and completed

    r = autotune_here(*args)
    assert r.returncode == 0, r.stderr
    assert f"trial {dead[0]} was interrupted" in r.stderr, r.stderr
    trials = {t.number: t for t in _study(storage_url).trials}
    assert not [t for t in trials.values() if not t.state.is_finished()]  # none left RUNNING
    for n, value in completed.items():  # every completed trial is still there, unchanged
        assert trials[n].state == optuna.trial.TrialState.COMPLETE and trials[n].value == value
    failed = trials[dead[0]]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["status"] == budget.INTERRUPTED
    assert f"process {proc.pid} on" in failed.user_attrs["reason"]
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == dead[0]]
    assert len(retries) == 1 and retries[0].params == failed.params  # retried once
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    assert budget.spent(_study(storage_url)) == 2  # the budget, interrupted trial aside


def _start_until(args: tuple[str, ...], env: dict[str, str], ready: Callable[[int], bool],
                 **output: Any) -> subprocess.Popen:
    """``autotune *args`` in a process group of its own, returned once ``ready(its pid)``
    (within 120 s; else the group is killed and the test fails)."""
    proc = subprocess.Popen([sys.executable, "-m", "autotune", *args], env=env,
                            start_new_session=True, **output)
    deadline = time.monotonic() + 120
    try:
        while not ready(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, "no trial started"
            time.sleep(0.1)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


QUIET = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
CAPTURED = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started and theirs (Linux /proc), the worker among them (a child
    of the tuner's fork server)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                with contextlib.suppress(OSError):
                    kids = [int(c) for c in (task / "children").read_text().split()]
                    found += kids
                    todo += kids
    return found


def _gone(pid: int) -> bool:
    return resume._process_start(pid) is None  # no such process, or a zombie


def _wait_gone(pids: list[int], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, f"worker(s) {pids} outlived the tuner"
        time.sleep(0.1)


def test_a_killed_tuner_leaves_no_worker_behind(storage_url: str, cli_env) -> None:
    """The worker is mid-trial (a hung prefill) when its tuner is SIGKILLed: it must die with
    it, not finish the trial beside whatever runs next."""
    db = Path(storage_url.removeprefix("sqlite:///"))
    args = (*RUN, "--trials", "2", "--no-early-stop", "--storage", storage_url,
            "--engine-option", "fault=hang", "--trial-timeout", "120")
    proc = _start_until(args, cli_env, lambda pid: bool(_children(pid)) and _started(db),
                        **QUIET)
    try:
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # The worker goes when its fork server has exited (about 1 s here): 30 s for a loaded
        # machine; an orphan would still be there, its trial hangs for 120 s.
        _wait_gone(workers, timeout_s=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _started(db: Path) -> bool:
    """A trial is RUNNING with its configuration chosen."""
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            conn.execute("PRAGMA query_only = ON")
            return conn.execute(
                "SELECT count(*) FROM trials t JOIN trial_params p ON p.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING'").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def test_sigterm_stops_like_ctrl_c_and_the_worker_goes_with_it(
        tmp_path: Path, storage_url: str, cli_env) -> None:
    """SIGTERM (timeout, docker, systemd) to the tuner alone: one line, exit 143, the trial
    failed and retried on resume, and no worker left behind."""
    db = Path(storage_url.removeprefix("sqlite:///"))
    args = (*RUN, "--trials", "3", "--no-early-stop", "--storage", storage_url, "--study", "t",
            *_HANGS_AFTER_ONE, "--out", str(tmp_path / "rec.json"))
    proc = _start_until(args, cli_env, lambda pid: _running_trial(db), **CAPTURED)
    try:
        workers = _children(proc.pid)
        assert workers
        proc.send_signal(signal.SIGTERM)  # to the tuner only, as `timeout` sends it
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        assert "interrupted (SIGTERM): every finished trial is kept in" in stderr
        assert "Traceback" not in stderr, stderr
        _wait_gone(workers, timeout_s=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    trials = _study(storage_url).trials
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(stopped) == 1 and "SIGTERM" in stopped[0].user_attrs["reason"]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


_SIGNALLED_ON_ANOTHER_THREAD = """
import signal, sys, threading, time
from pathlib import Path
from test_faults import _running_trial
from autotune.cli import main

def stop_from_here():  # the kernel may hand a process's signal to any thread that takes it
    while not _running_trial(Path(sys.argv[1])):
        time.sleep(0.1)
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=stop_from_here, daemon=True).start()
sys.exit(main(sys.argv[2:]))
"""


def test_a_stop_signal_taken_by_another_thread_still_stops_the_run(
        tmp_path: Path, storage_url: str, cli_env) -> None:
    """Python runs signal handlers in the main thread only, and a main thread blocked for good
    (joining the trial threads) never ran it: a SIGTERM that the kernel gave another thread
    waited for the trial to end (CI saw it twice). The run must stop while the trial hangs."""
    db = Path(storage_url.removeprefix("sqlite:///"))
    args = (*RUN, "--trials", "3", "--no-early-stop", "--storage", storage_url, "--study", "o",
            *_HANGS_AFTER_ONE, "--out", str(tmp_path / "rec.json"))
    proc = subprocess.Popen([sys.executable, "-c", _SIGNALLED_ON_ANOTHER_THREAD, str(db), *args],
                            env=cli_env, start_new_session=True, **CAPTURED)
    try:
        # The whole run: 7.5 s quiet, up to 6x that on a loaded machine.
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 128 + signal.SIGTERM, stderr
        assert "interrupted (SIGTERM): every finished trial is kept in" in stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = [t for t in _study(storage_url).trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(stopped) == 1 and "SIGTERM" in stopped[0].user_attrs["reason"]


def test_a_late_reply_is_dropped_not_taken_for_the_next_answer(monkeypatch) -> None:
    """A worker stalls past a query's wait, then answers it: that answer must not be read as
    the outcome of the next trial (the pipe's messages are tagged)."""
    from autotune.engines import EngineConfig
    from autotune.errors import WorkerError
    from autotune.measure import worker as worker_mod
    from autotune.measure.trial import TrialRequest
    from autotune.measure.worker import Worker

    monkeypatch.setattr(worker_mod, "_QUERY_TIMEOUT_S", 0.5)
    config = EngineConfig(model="tiny-llama", engine=ANALYTIC, device="cpu", dtype="float32",
                          max_batch=4, max_seq_len=12, options=(("first_plan_sleep_s", 2.0),))
    with Worker(config, trial_timeout_s=0.5) as w:
        w.start()
        with pytest.raises(WorkerError, match="could not plan"):
            w.plan([(1, 0)], 8, 4)
        w.trial_timeout_s = 30.0
        outcome = w.run(TrialRequest(batch=1, budget=0, isl=8, osl=4, repeats=1, warmup=0))
        assert outcome.status == "ok", outcome
        assert w.plan([(2, 0)], 8, 4)["totals"]  # and the pipe stays in step after it


def _running(study: optuna.Study, **attrs) -> optuna.trial.Trial:
    trial = study.ask()
    trial.suggest_int("batch", 1, 32, log=True)
    trial.suggest_float("budget_fraction", 0.0, 1.0)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return trial


def test_stale_trials_are_failed_by_heartbeat_or_dead_pid_and_retried_once(
        storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="s",
                                direction="maximize")
    now = time.time()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    dead_here = _running(study, host=resume.HOST, pid=int(gone), heartbeat_unix=now)
    alive_here = _running(study, host=resume.HOST, pid=os.getppid(),
                          pid_start=resume._process_start(os.getppid()), heartbeat_unix=now)
    reused_pid = _running(study, host=resume.HOST, pid=os.getppid(), pid_start=1,
                          heartbeat_unix=now)
    silent_there = _running(study, host="elsewhere", pid=1, heartbeat_unix=now - 3600)
    fresh_there = _running(study, host="elsewhere", pid=1, heartbeat_unix=now - 5)
    retry_again = _running(study, host="elsewhere", pid=1, heartbeat_unix=0, retry_of=0)

    failed = resume.recover(study, stale_after_s=60)
    assert sorted(failed) == sorted([dead_here.number, reused_pid.number, silent_there.number,
                                     retry_again.number])
    by_number = {t.number: t for t in study.trials}
    for trial in (alive_here, fresh_there):
        assert by_number[trial.number].state == optuna.trial.TrialState.RUNNING
    assert "is gone" in by_number[dead_here.number].user_attrs["reason"]
    assert "no heartbeat on elsewhere" in by_number[silent_there.number].user_attrs["reason"]
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(t.user_attrs["retry_of"] for t in waiting) == sorted(
        [dead_here.number, reused_pid.number, silent_there.number])  # a retry is not retried
    for t in waiting:  # an enqueued trial holds its parameters as fixed_params until asked
        assert t.system_attrs["fixed_params"] == by_number[t.user_attrs["retry_of"]].params
    assert resume.recover(study, stale_after_s=60) == []  # idempotent: nothing retried twice


def test_heartbeat_refreshes_while_a_trial_runs(storage_url: str) -> None:
    study = optuna.create_study(storage=open_storage(storage_url), study_name="h")
    trial = study.ask()
    resume.mark_started(trial)
    first = study.trials[0].user_attrs["heartbeat_unix"]
    with resume.heartbeat(trial, interval_s=0.05):
        time.sleep(0.3)
    assert study.trials[0].user_attrs["heartbeat_unix"] > first
    study.tell(trial, 1.0)  # the heartbeat thread has stopped: telling works


# ------------------------------------------------------------------------------------------
# NVML failing


class _NVMLError(Exception):
    pass


def test_nvml_failing_is_a_clear_error_and_a_recorded_trial(monkeypatch) -> None:
    import pynvml

    from autotune import gpu
    from autotune.engines import EngineConfig, load_engine
    from autotune.measure.trial import TrialRequest, run_trial

    def broken(*args):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", broken)
    gpu._nvml.cache_clear()
    try:
        assert gpu.inventory() == []  # no GPU: the CLI's --device auto picks the CPU
        with pytest.raises(EngineUnavailableError, match="NVML.*--device cpu"):
            gpu.device_info("cuda:0")
        # NVML that initializes, then fails mid-study: the trial is an explained error.
        monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: object())
        monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", broken)
        gpu._nvml.cache_clear()
        with pytest.raises(EngineUnavailableError, match="NVML"):
            gpu.free_bytes("cuda:0")
        engine = load_engine(EngineConfig(model="tiny-llama", engine=ANALYTIC, device="cuda:0",
                                          dtype="float32", max_batch=4, max_seq_len=12))
        outcome = run_trial(engine, TrialRequest(batch=1, budget=0, isl=8, osl=4, repeats=1))
        assert outcome.status == "error" and "NVML" in outcome.reason
    finally:
        gpu._nvml.cache_clear()


# ------------------------------------------------------------------------------------------
# The SQLite file locked by a reader


_HOLD = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute(sys.argv[2])
conn.execute("SELECT count(*) FROM trials").fetchone()
print("held", flush=True)
time.sleep(float(sys.argv[3]))
conn.execute("ROLLBACK")
"""


def _hold(db: Path, how: str, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(db), how, str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_locked_sqlite_file_is_waited_for_then_a_clear_error(storage_url: str,
                                                              monkeypatch) -> None:
    run_study(_options(storage_url, trials=1))
    db = Path(storage_url.removeprefix("sqlite:///"))
    # A long read transaction (the dashboard, a notebook) never blocks the study (WAL) ...
    reader = _hold(db, "BEGIN", 30)
    # ... and an exclusive lock held for 2 s is waited for (busy timeout), nothing lost.
    locker = _hold(db, "BEGIN EXCLUSIVE", 2)
    t0 = time.perf_counter()
    run_study(_options(storage_url, trials=3))
    assert time.perf_counter() - t0 > 1.5
    locker.wait()
    reader.kill()
    reader.wait()
    assert budget.spent(_study(storage_url)) == 3
    # Held for longer than the busy timeout: a clear message, and the study is intact.
    monkeypatch.setattr("autotune.storage.SQLITE_BUSY_TIMEOUT_S", 1)
    locker = _hold(db, "BEGIN EXCLUSIVE", 20)
    try:
        with pytest.raises(Exception) as info:
            run_study(_options(storage_url, trials=4))
        assert "locked by another process" in str(explain(info.value))
    finally:
        locker.kill()
        locker.wait()
    study = _study(storage_url)
    assert budget.spent(study) == 3
    assert all(t.state.is_finished() for t in study.trials)


# ------------------------------------------------------------------------------------------
# A corrupted or truncated SQLite file


@pytest.fixture(scope="module")
def finished_db(tmp_path_factory) -> Path:
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'done.db'}"
    run_study(_options(url, trials=2))
    db = Path(url.removeprefix("sqlite:///"))
    with sqlite3.connect(db) as conn:  # everything into the main file: it is copied alone
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_sqlite_file_is_refused_and_never_written(tmp_path: Path, finished_db: Path,
                                                          damage: str, autotune_here) -> None:
    db = tmp_path / "done.db"
    shutil.copy(finished_db, db)
    size = db.stat().st_size
    with open(db, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(size // 2)
            f.write(b"\xa5" * 8192)
    digest = _digest(db)
    for args in (("show",), RUN + ("--trials", "3")):
        r = autotune_here(*args, "--storage", f"sqlite:///{db}", cwd=tmp_path)
        _error(r, "is damaged", "untouched")
        assert _digest(db) == digest  # not a byte changed
    # No export; SQLite's shared-memory index may appear beside it (read-only WAL access).
    assert set(os.listdir(tmp_path)) <= {"done.db", "done.db-wal", "done.db-shm"}
    assert not (tmp_path / "done.db-wal").exists() or not (tmp_path / "done.db-wal").stat().st_size


# ------------------------------------------------------------------------------------------
# Disk full, an unwritable studies directory


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the disk-full path is untested")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_disk_full_is_a_clear_error_and_the_rerun_resumes(tiny_tmpfs: Path, tmp_path: Path,
                                                          autotune_here) -> None:
    url = f"sqlite:///{tiny_tmpfs / 'studies' / 'full.db'}"
    run_study(_options(url, trials=1))
    # A reader keeps the file open (a dashboard, say), so its index exists: the run below
    # fails where it writes, not where it would make the index (another clear error).
    reader = _study(url)
    assert reader.trials
    filler = _fill(tiny_tmpfs)
    with pytest.raises(Exception) as info:
        run_study(_options(url, trials=30))
    assert "disk is full" in str(explain(info.value)), info.value
    r = autotune_here(*RUN, "--trials", "30", "--storage", url, cwd=tmp_path)
    _error(r, "disk is full", "rerun")
    # The export is written atomically: a full disk leaves the old file whole.
    rec = recommend.build(_study(url))
    filler.unlink()
    out = recommend.write(rec, tiny_tmpfs / "rec.json")
    before = out.read_bytes()
    filler = _fill(tiny_tmpfs)
    with pytest.raises(OSError):
        recommend.write({**rec, "pad": "x" * 100_000}, out)
    assert out.read_bytes() == before
    filler.unlink()
    run_study(_options(url, trials=3))  # space again: the same study resumes
    study = _study(url)
    assert budget.spent(study) == 3
    assert all(t.state.is_finished() for t in study.trials)


def test_read_only_studies_directory_even_for_root(tiny_tmpfs: Path, autotune_here) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    r = autotune_here(*RUN, "--storage", f"sqlite:///{tiny_tmpfs}/studies/a.db")
    _error(r, "not a writable directory")
    with pytest.raises(StorageError, match="not a writable directory"):
        open_storage(f"sqlite:///{tiny_tmpfs}/a.db")


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_a_storage_sqlite_cannot_open_is_one_line(autotune_here) -> None:
    """/proc takes no files: an error naming the storage (as root, whose /proc passes the
    writable-folder check, SQLite's own refusal), never a traceback."""
    r = autotune_here(*RUN, "--storage", "sqlite:////proc/autotune-test.db")
    _error(r, "storage", "/proc")


# ------------------------------------------------------------------------------------------
# The exported JSON read back


def test_exported_json_truncated_or_of_another_schema(tmp_path: Path, finished_db: Path) -> None:
    rec = recommend.build(_study(f"sqlite:///{finished_db}"))
    path = recommend.write(rec, tmp_path / "rec.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(SchemaError, match="not valid JSON \\(truncated\\?\\)"):
        recommend.read(path)
    path.write_text(json.dumps({**rec, "schema_version": 2}))
    with pytest.raises(SchemaError, match="schema_version 2 is not supported.*version 1"):
        recommend.read(path)
    path.write_text(json.dumps({k: v for k, v in rec.items() if k != "best"}))
    with pytest.raises(SchemaError, match="lacks best"):
        recommend.read(path)
    with pytest.raises(SchemaError, match="cannot read"):
        recommend.read(tmp_path / "missing.json")


def test_a_worker_dying_elsewhere_mid_study_is_retried_by_the_running_one(
        storage_url: str) -> None:
    """Another host's worker dies while this run goes on: its trial's heartbeat goes stale and
    the running study fails and retries it at its next claim, not at the next start."""
    injected: list[int] = []

    def die_elsewhere(event) -> None:
        if injected:
            return
        other = load_study(open_storage(storage_url, create=False), None)  # "another process"
        trial = other.ask()
        trial.suggest_int("batch", 1, 64, log=True)
        trial.suggest_float("budget_fraction", 0.0, 1.0)
        for key, value in {"host": "elsewhere", "pid": 1,
                           "heartbeat_unix": time.time() - 2 * resume.STALE_AFTER_S}.items():
            trial.set_user_attr(key, value)
        injected.append(trial.number)

    options = RunOptions(model="tiny-llama", engine=ANALYTIC, device="cpu", trials=4, isl=8,
                         osl=4, max_batch=64, storage=storage_url, dtype="float32", repeats=1,
                         early_stop=False, confirm=False)
    result = run_study(options, progress=die_elsewhere)
    assert f"trial {injected[0]} was interrupted by a dead process; retrying it" in result.notes
    trials = {t.number: t for t in load_study(open_storage(storage_url), None).trials}
    dead = trials[injected[0]]
    assert dead.state == optuna.trial.TrialState.FAIL
    assert dead.user_attrs["status"] == budget.INTERRUPTED
    assert "no heartbeat on elsewhere" in dead.user_attrs["reason"]
    retried = [t for t in trials.values() if t.user_attrs.get("retry_of") == dead.number]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == dead.params
    # The budget still holds exactly: 4 trials besides the interrupted one, none RUNNING.
    assert budget.spent(load_study(open_storage(storage_url), None)) == 4
    assert not [t for t in trials.values() if t.state == optuna.trial.TrialState.RUNNING]


def test_ctrl_c_stops_cleanly_and_the_rerun_measures_the_stopped_trial(
        tmp_path: Path, storage_url: str, cli_env, autotune_here) -> None:
    """Ctrl-C reaches the tuner and its worker (one process group): one line says what is
    kept, no traceback, the running trial is interrupted at once and runs again on resume."""
    db = Path(storage_url.removeprefix("sqlite:///"))
    # 2 trials, the second hanging: it still runs when the signal comes, on any machine. The
    # rerun's worker is new: its first prefill (the stopped trial's retry) runs.
    args = (*RUN, "--trials", "2", "--no-early-stop", "--storage", storage_url, "--study", "c",
            *_HANGS_AFTER_ONE, "--out", str(tmp_path / "rec.json"))
    proc = _start_until(args, cli_env, lambda pid: _running_trial(db), **CAPTURED)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted: every finished trial is kept in" in stderr
    assert "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr, stderr
    trials = {t.number: t for t in _study(storage_url).trials}
    stopped = [t for t in trials.values() if t.state == optuna.trial.TrialState.FAIL]
    assert len(stopped) == 1 and stopped[0].user_attrs["status"] == budget.INTERRUPTED, (
        [(t.number, t.state.name, t.user_attrs.get("status")) for t in trials.values()], stderr)
    assert "Ctrl-C" in stopped[0].user_attrs["reason"]
    assert not [t for t in trials.values() if t.state == optuna.trial.TrialState.RUNNING]

    r = autotune_here(*args)
    assert r.returncode == 0, r.stderr
    trials = {t.number: t for t in _study(storage_url).trials}
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == stopped[0].number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == stopped[0].params
    assert budget.spent(_study(storage_url)) == 2


def test_an_interrupted_run_stops_its_workers_in_a_process_that_goes_on(
        storage_url: str) -> None:
    """A notebook's kernel catches the KeyboardInterrupt and goes on: the run's worker and
    its thread stop with it (they went on measuring, and the next run measured beside them,
    each timed run 60 times slower), and the next run resumes the stopped trial."""
    import multiprocessing
    import threading

    db = Path(storage_url.removeprefix("sqlite:///"))
    options = _options(storage_url, trials=2, trial_timeout_s=120,
                       engine_options=(("fault", "hang"), ("fault_after", 1)))
    main = threading.main_thread().ident

    def interrupt_once_a_trial_runs() -> None:
        deadline = time.monotonic() + 120
        while not _running_trial(db) and time.monotonic() < deadline:
            time.sleep(0.1)
        signal.pthread_kill(main, signal.SIGINT)  # the main thread's KeyboardInterrupt

    threading.Thread(target=interrupt_once_a_trial_runs, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_study(options)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("autotune")]

    def finished() -> list[str]:  # (the retry of the interrupted one waits, unfinished)
        return [t.user_attrs.get("status") for t in _study(storage_url).trials
                if t.state.is_finished()]

    assert finished() == ["ok", budget.INTERRUPTED]
    time.sleep(1.0)  # a thread left measuring would record its trial by now
    assert finished() == ["ok", budget.INTERRUPTED]
    # The stopped trial runs again: a new worker's first configuration is spared the hang.
    assert run_study(options).ran == 1
    assert finished() == ["ok", budget.INTERRUPTED, "ok"]


_OPEN_AT = """
import sys
import optuna
from autotune.storage import open_storage
print("ready", flush=True)
sys.stdin.readline()  # all at once: the schema is created by whoever gets there
optuna.create_study(storage=open_storage(sys.argv[1]), study_name="s", load_if_exists=True)
print("opened")
"""


def test_runs_starting_at_once_on_a_new_sqlite_file(tmp_path: Path, cli_env) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT, url], env=cli_env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    # A barrier, not a clock: each has imported Optuna before any is let go (no busy wait).
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.communicate()[1]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0 and stdout.strip() == "opened", stderr
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["s"]


_KILLED_AT = """
import os, signal, sys
from autotune.tune import resume, study
from test_faults import _options
point = sys.argv[2]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "ask":  # between asking for a trial and recording who runs it
    resume.mark_started = die
else:  # during the final full measurement of the best
    study.confirm_best = die
study.run_study(_options(sys.argv[1], trials=3, decode_steps=1, warmup=1))
"""


def _killed_at(url: str, point: str, env: dict[str, str]) -> None:
    p = subprocess.run([sys.executable, "-c", _KILLED_AT, url, point], env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, p.stderr


def test_tuner_killed_between_ask_and_recording_itself(storage_url: str, cli_env) -> None:
    _killed_at(storage_url, "ask", cli_env)
    (unnamed,) = _study(storage_url).trials
    assert unnamed.state == optuna.trial.TrialState.RUNNING and "pid" not in unnamed.user_attrs
    result = run_study(_options(storage_url, trials=3))
    assert f"trial {unnamed.number} was interrupted by a dead process; retrying it" in \
        result.notes
    study = _study(storage_url)
    assert budget.spent(study) == 3  # not one short
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert "died before recording itself" in study.trials[unnamed.number].user_attrs["reason"]


def test_tuner_killed_during_the_confirmation_confirms_on_resume(
        tmp_path: Path, storage_url: str, cli_env, autotune_here) -> None:
    _killed_at(storage_url, "confirm", cli_env)
    study = _study(storage_url)
    assert budget.spent(study) == 3 and "confirmation" not in study.user_attrs
    out = tmp_path / "rec.json"
    r = autotune_here(*RUN, "--trials", "3", "--no-early-stop", "--decode-steps", "1",
                 "--storage", storage_url, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "confirmed trial" in r.stderr, r.stderr
    rec = recommend.read(out)
    assert rec["confirmation"]["trial"] == rec["best"]["trial"]
    assert budget.spent(_study(storage_url)) == 3  # no trial run for it


_WRITE_THEN_DIE = """
import os, signal, sys
from test_faults import _options
from autotune.storage import load_study, open_storage
from autotune.tune.study import run_study
run_study(_options(sys.argv[1], trials=int(sys.argv[2])))  # returns with the file whole
study = load_study(open_storage(sys.argv[1]), None)  # the process goes on writing
study.set_user_attr("written_after_the_run", True)
os.kill(os.getpid(), signal.SIGKILL)  # its last writes stay in the -wal, not the file
"""


def _write_then_die(url: str, trials: int, env: dict[str, str]) -> None:
    p = subprocess.run([sys.executable, "-c", _WRITE_THEN_DIE, url, str(trials)], env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, p.stderr


def test_a_damaged_file_with_a_wal_beside_it_is_left_untouched(
        tmp_path: Path, finished_db: Path, cli_env, autotune_here) -> None:
    db = tmp_path / "done.db"
    shutil.copy(finished_db, db)
    _write_then_die(f"sqlite:///{db}", 3, cli_env)  # a trial more, in the -wal
    wal = Path(f"{db}-wal")
    assert wal.stat().st_size > 0
    with open(db, "r+b") as f:  # every page but the header: the -wal holds a few of them
        f.seek(4096)
        f.write(b"\xa5" * (db.stat().st_size - 4096))
    digests = (_digest(db), _digest(wal))
    for args in (("show",), ("export", "--out", str(tmp_path / "r.json")), RUN):
        r = autotune_here(*args, "--storage", f"sqlite:///{db}", cwd=tmp_path)
        _error(r, "is damaged", "untouched")
        assert wal.exists() and (_digest(db), _digest(wal)) == digests  # nor checkpointed


def test_a_deleted_wal_is_said_as_such_not_as_damage(tmp_path: Path, cli_env, autotune_here) -> None:
    db = tmp_path / "w.db"
    _write_then_die(f"sqlite:///{db}", 1, cli_env)
    Path(f"{db}-wal").unlink()
    digest = _digest(db)
    for args in (("show",), RUN):
        r = autotune_here(*args, "--storage", f"sqlite:///{db}", cwd=tmp_path)
        _error(r, "w.db-wal is missing", "put w.db-wal back")
        assert "damaged" not in r.stderr.replace("not damaged", "")
    assert _digest(db) == digest


def test_no_space_left_is_said_as_such_not_as_damage(tiny_tmpfs: Path, tmp_path: Path,
                                                     autotune_here) -> None:
    url = f"sqlite:///{tiny_tmpfs / 'full.db'}"
    r = autotune_here(*RUN, "--trials", "1", "--storage", url, "--out", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert not Path(f"{tiny_tmpfs}/full.db-wal").exists()  # closed cleanly: no index left
    filler = _fill(tiny_tmpfs)
    try:
        for args in (("show",), RUN):
            r = autotune_here(*args, "--storage", url, cwd=tmp_path)
            _error(r, "is full")
            assert "damaged" not in r.stderr.replace("not damaged", "")
    finally:
        filler.unlink()


def test_read_only_database_serves_show_export_and_report(tiny_tmpfs: Path, tmp_path: Path,
                                                          finished_db: Path, autotune_here) -> None:
    shutil.copy(finished_db, tiny_tmpfs / "ro.db")  # a finished study, closed cleanly
    url = f"sqlite:///{tiny_tmpfs / 'ro.db'}"
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    r = autotune_here("show", "--storage", url)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    r = autotune_here("export", "--storage", url, "--out", str(tmp_path / "b.json"))
    assert r.returncode == 0, r.stderr
    best = recommend.build(_study(f"sqlite:///{finished_db}"))["best"]
    assert recommend.read(tmp_path / "b.json")["best"] == json.loads(json.dumps(best))
    r = autotune_here("report", "--storage", url, "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    r = autotune_here(*RUN, "--storage", url, cwd=tmp_path)  # a run must write: refused
    _error(r, "not writable")


def test_a_reader_gone_from_stdout_ends_nothing(tmp_path: Path, storage_url: str,
                                                 cli_env) -> None:
    """Issue 19: with stdout's reader gone, `run --out p.json` exited 1 without a word and
    never wrote p.json; `| head -1` exited 1; `>&-` gave an AttributeError."""
    out = tmp_path / "p.json"
    proc = subprocess.Popen([sys.executable, "-m", "autotune", *RUN, "--trials", "2",
                             "--no-early-stop", "--storage", storage_url, "--out", str(out)],
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.close()  # the reader goes before the first line
    stderr = proc.stderr.read()
    assert proc.wait(timeout=240) == 0, stderr
    assert "Traceback" not in stderr and "error" not in stderr, stderr
    assert recommend.read(out)["trials"] == {"ok": 2}
    shell = f"{sys.executable} -m autotune show --storage {storage_url}"
    for redirect in ("| head -1", ">&-", "2>&- | head -1"):
        r = subprocess.run(f"{shell} {redirect}; exit ${{PIPESTATUS[0]}}", shell=True,
                           executable="/bin/bash", env=cli_env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and not r.stderr, (redirect, r.stderr)


def test_two_quick_ctrl_c_still_leave_the_trial_to_run_again(
        tmp_path: Path, storage_url: str, cli_env) -> None:
    """Issue 19: a second SIGINT 10-50 ms after the first cut the cleanup: the trial stayed
    RUNNING, or failed without being queued again. A second press is ignored while it runs."""
    db = Path(storage_url.removeprefix("sqlite:///"))
    args = (*RUN, "--trials", "3", "--no-early-stop", "--storage", storage_url, "--study", "cc",
            *_HANGS_AFTER_ONE, "--out", str(tmp_path / "rec.json"))
    proc = _start_until(args, cli_env, lambda pid: _running_trial(db), **CAPTURED)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted: every finished trial is kept"), stderr  # the last
    trials = _study(storage_url).trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    (stopped,) = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert stopped.user_attrs["status"] == budget.INTERRUPTED
    (queued,) = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert queued.user_attrs["retry_of"] == stopped.number


def test_ctrl_c_while_measuring_the_hardware_is_the_last_word(storage_url: str,
                                                               cli_env) -> None:
    """Issue 19: Ctrl-C during `measuring the hardware` printed `interrupted`, then `the search
    goes on without it` (the worker's query, cut short by the exit). Before any trial
    finished, there is nothing to keep, and the line says so."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune", *RUN, "--trials", "2", "--storage", storage_url,
         "--engine-option", "first_plan_sleep_s=60"], env=cli_env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        said = []
        while not any("measuring the hardware" in line for line in said):
            line = proc.stderr.readline()
            assert line, said  # it ended before measuring
            said.append(line)
        os.killpg(proc.pid, signal.SIGINT)
        said += proc.stderr.readlines()
        assert proc.wait(timeout=60) == 130, said
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert said[-1].startswith("interrupted before any trial finished: nothing to keep"), said
    assert not any("goes on without it" in line for line in said), said


_STOPPED_MID_TRIAL = """
import sys
from test_faults import ANALYTIC
from autotune.engines import EngineConfig
from autotune.measure.trial import TrialRequest
from autotune.measure.worker import Worker
config = EngineConfig(model="tiny-llama", engine=ANALYTIC, device="cpu", dtype="float32",
                      max_batch=4, max_seq_len=12, options=(("budget_sleep_s", 1.5),))
request = TrialRequest(batch=1, budget=0, isl=8, osl=4, repeats=1, warmup=0)
with Worker(config, trial_timeout_s=120) as w:
    w.start()
    w.run(request)  # warm: the first trial imports what measuring needs
    w.trial_timeout_s = 10.0  # 1.5 s of work: ample on a loaded machine
    print("warm", flush=True)
    print(w.run(TrialRequest(batch=2, budget=2**26, isl=8, osl=4, repeats=1, warmup=0)).status)
"""


_ONE_WORKER = """
import os, sys
from autotune.engines import EngineConfig
from autotune.measure.worker import TrialRequest, Worker
config = EngineConfig(model="tiny-llama", engine=sys.argv[1], device="cpu", dtype="float32",
                      max_batch=4, max_seq_len=12, options=(("budget_sleep_s", 30),))
w = Worker(config, trial_timeout_s=120)
w.start()
print("ready", flush=True)
if sys.argv[2] == "hang-up":  # the tuner gone mid-trial, its end of the pipe closed
    w._conn.send((1, "trial", TrialRequest(batch=1, budget=2**20, isl=8, osl=4, repeats=1)))
    w._conn.close()
    os._exit(0)
w.stop()
"""


def test_a_worker_whose_tuner_hangs_up_mid_trial_goes_quietly(cli_env) -> None:
    """A Ctrl-C stops the tuner while its worker measures: the worker's next word finds the
    pipe closed, and it ends without a traceback under the tuner's last line."""
    r = subprocess.run([sys.executable, "-c", _ONE_WORKER, ANALYTIC, "hang-up"], env=cli_env,
                       capture_output=True, text=True, timeout=120)  # waits for the worker
    assert r.returncode == 0 and r.stdout == "ready\n", r.stderr
    assert "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH is Python 3.11+")
def test_workers_never_import_autotune_from_the_working_directory(tmp_path: Path,
                                                                  cli_env) -> None:
    """The fork server runs `python -c` (the working directory first on its path): another
    checkout's autotune/ where the tuner runs would be the code every worker ran. The tuner
    runs as the `autotune` script does, from a file elsewhere (its folder on the path, not
    the working directory)."""
    shadow = tmp_path / "autotune"
    shadow.mkdir()
    mark = tmp_path / "imported"
    (shadow / "__init__.py").write_text(
        f"open({str(mark)!r}, 'w').close()\nraise ImportError('a shadow autotune')\n")
    script = tmp_path / "bin" / "tuner.py"
    script.parent.mkdir()
    # Run as a file, the script is imported again as each worker starts: guarded as __main__.
    body = "".join(f"    {line}\n" for line in _ONE_WORKER.strip().splitlines())
    script.write_text(f"if __name__ == '__main__':\n{body}")
    r = subprocess.run([sys.executable, str(script), ANALYTIC, "start"],
                       cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "ready\n", r.stderr
    assert not mark.exists()


def test_a_script_without_a_main_guard_is_told_so(tmp_path: Path, cli_env) -> None:
    """Each worker imports the script that started the study again; without the guard it
    starts the study there too and dies: the error says which file and what to add."""
    script = tmp_path / "tune.py"
    script.write_text(
        "from autotune.tune.study import RunOptions, run_study\n"
        f"run_study(RunOptions(model='tiny-llama', engine={ANALYTIC!r}, device='cpu', "
        f"dtype='float32', trials=1, isl=8, osl=4, max_batch=4, "
        f"storage='sqlite:///{tmp_path}/s.db'))\n")
    r = subprocess.run([sys.executable, str(script)], env=cli_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert f"{script} starts the study without `if __name__ == \"__main__\":`" in r.stderr


def test_time_the_job_spent_stopped_is_not_the_trials(cli_env) -> None:
    """Issue 19: the job suspended (Ctrl-Z) past --trial-timeout made its trial a timeout and
    killed its worker: the configuration, the optimum, was never tried again."""
    proc = subprocess.Popen([sys.executable, "-c", _STOPPED_MID_TRIAL], env=cli_env,
                            start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "warm"
        time.sleep(0.5)  # mid-trial: changing the budget takes 1.5 s
        os.killpg(proc.pid, signal.SIGSTOP)  # what Ctrl-Z does to the job
        time.sleep(15)  # past the 10 s timeout (a poll counts at most 5 s: 5.5 s in all)
        os.killpg(proc.pid, signal.SIGCONT)
        assert proc.stdout.readline().strip() == "ok"
        assert proc.wait(timeout=60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
