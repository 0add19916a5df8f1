"""Trials whose process died: found, failed and retried once, so a resumed study loses nothing.

Every trial records who runs it when it starts (user attributes ``host``, ``pid`` and the
process's start time ``pid_start``, so a reused pid is not mistaken for ours) and a heartbeat
``heartbeat_unix`` that a thread refreshes while the trial runs. Optuna's own heartbeat only
runs inside ``study.optimize``; autotune uses ask/tell, hence this one.

Asking for a trial and recording who runs it are two writes: a process killed between them
leaves a RUNNING trial that names no one. So before asking, a process records itself as an
*asker* in the study's system attributes (:func:`asking`), and clears that record once the
trial carries its name. A RUNNING trial naming no one is dead when no pending asker is alive
(on this host: its pid; elsewhere: its record younger than ``stale_after_s``).

When a run or a worker starts, and before each trial it claims, :func:`recover` looks at
the study's RUNNING trials. One whose process is known to be gone on this host is failed at
once; one from another host (or whose pid cannot be checked) is failed when its heartbeat is
older than ``stale_after_s``. A failed trial gets ``status`` ``interrupted`` (it does not
count against the budget, see :mod:`autotune.tune.budget`) and its configuration is enqueued once
more, unless it was itself such a retry. Two processes recovering at once cannot both retry a trial: only the one whose
``tell`` moves it out of RUNNING enqueues.

This module does not run trials or decide what a trial's outcome is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from autotune.tune.budget import INTERRUPTED

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0  # how often a running trial says it is alive (seconds)
STALE_AFTER_S = 300.0  # a trial silent for this long on another host is dead (10 beats)
HOST = socket.gethostname()


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell reused pids apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parens
    if fields[0] == "Z":  # a zombie has exited: nobody will tell its trial
        return None
    return int(fields[19])


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    now = _process_start(pid)
    if os.path.exists("/proc/self/stat"):
        return now is not None and (start is None or now == start)
    return True


def mark_started(trial: Any) -> None:
    """Records who runs the trial, so that a later run can tell whether it died."""
    trial.set_user_attr("host", HOST)
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("pid_start", _process_start(os.getpid()))
    trial.set_user_attr("heartbeat_unix", time.time())  # wall clock: compared across hosts


@contextlib.contextmanager
def heartbeat(trial: Any, interval_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Refreshes the trial's heartbeat from a thread while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            try:
                trial.set_user_attr("heartbeat_unix", time.time())
            except Exception as e:  # a busy storage must not kill the trial; the next beat retries
                log.warning("heartbeat of trial %d not stored: %s", trial.number, e)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()  # before the caller tells the trial: a finished trial takes no attribute


_ASKER = "autotune:asking:"


def _me() -> dict[str, Any]:
    return {"host": HOST, "pid": os.getpid(), "pid_start": _process_start(os.getpid())}


@contextlib.contextmanager
def asking(study: Any) -> Iterator[None]:
    """Around ``study.ask()`` and :func:`mark_started`: says a process of ours may hold a
    trial that does not name us yet. Left set if we die in between, which is the point."""
    key = f"{_ASKER}{HOST}:{os.getpid()}:{threading.get_ident()}"
    storage = study._storage  # Study.set_system_attr is deprecated; the storage's is not
    storage.set_study_system_attr(study._study_id, key, {**_me(), "since_unix": time.time()})
    yield
    storage.set_study_system_attr(study._study_id, key, None)


def _askers(study: Any) -> list[dict[str, Any]]:
    return [v for k, v in study._storage.get_study_system_attrs(study._study_id).items()
            if k.startswith(_ASKER) and isinstance(v, dict)]


def _asker_alive(asker: dict[str, Any], *, stale_after_s: float, now: float) -> bool:
    if asker.get("host") == HOST and isinstance(asker.get("pid"), int):
        return asker["pid"] == os.getpid() or _alive(asker["pid"], asker.get("pid_start"))
    return now - float(asker.get("since_unix", 0)) <= stale_after_s


def why_dead(trial: Any, *, stale_after_s: float, now: float | None = None,
             askers: list[dict[str, Any]] | None = None) -> str | None:
    """Why a RUNNING trial is known dead, or None while it may still be running.

    ``askers``: the study's pending askers (see :func:`asking`); None where unknown."""
    a = trial.user_attrs
    if a.get("host") == HOST and isinstance(a.get("pid"), int):
        if a["pid"] == os.getpid():
            return None  # ours: a thread of this process runs it
        if not _alive(a["pid"], a.get("pid_start")):
            return f"its process {a['pid']} on {HOST} is gone"
        return None
    now = time.time() if now is None else now
    unnamed = "pid" not in a and "heartbeat_unix" not in a
    if unnamed and askers is not None and not any(
            _asker_alive(x, stale_after_s=stale_after_s, now=now) for x in askers):
        return "the process that asked for it died before recording itself"
    last = a.get("heartbeat_unix")
    if last is None and trial.datetime_start is not None:
        last = trial.datetime_start.timestamp()  # a trial from before heartbeats
    if last is not None and now - last > stale_after_s:
        where = f" on {a['host']}" if "host" in a else ""
        return f"no heartbeat{where} for {now - last:.0f} s"
    return None


def recover(study: Any, *, stale_after_s: float = STALE_AFTER_S) -> list[int]:
    """Fails the study's dead RUNNING trials and enqueues each one's configuration once.

    Returns the numbers of the trials it failed."""
    import optuna

    failed = []
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    askers = _askers(study) if running else []
    for trial in running:
        reason = why_dead(trial, stale_after_s=stale_after_s, askers=askers)
        if reason is None:
            continue
        if _interrupt(study, trial, reason):
            failed.append(trial.number)
    return failed


def interrupt_own(study: Any, reason: str = "the run was stopped") -> list[int]:
    """Fails the RUNNING trials this process runs (it is being stopped, by Ctrl-C say) and
    enqueues each one's configuration once, as :func:`recover` would after it died."""
    import optuna

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        ours = trial.user_attrs.get("host") == HOST and trial.user_attrs.get("pid") == os.getpid()
        if ours and _interrupt(study, trial, reason):
            failed.append(trial.number)
    return failed


def _interrupt(study: Any, trial: Any, reason: str) -> bool:
    """Tells ``trial`` FAIL with status ``interrupted`` and enqueues its configuration once;
    False when it finished meanwhile or another process failed it first."""
    import optuna

    storage = study._storage  # attributes of another thread's or process's trial
    try:
        storage.set_trial_user_attr(trial._trial_id, "status", INTERRUPTED)
        storage.set_trial_user_attr(trial._trial_id, "reason", f"interrupted: {reason}")
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
        return False
    retry = trial.user_attrs.get("retry_of") is None and bool(trial.params)
    log.warning("trial %d was interrupted (%s); %s", trial.number, reason,
                "its configuration will run again" if retry else "not retried again")
    if retry:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return True
