"""A long-lived worker process per device that holds one loaded engine and runs trials.

The parent (the study) never touches CUDA: it spawns a worker, which loads the engine once
(and pins its host memory once), then answers trial requests over a pipe. Whatever a trial
does to the worker, the parent survives it and turns it into data:

- predicted not to fit the memory headroom -> ``infeasible`` (not run);
- CUDA out of memory (classified from the exception, never caught wholesale) -> ``oom``;
  the worker frees its cache and goes on;
- any other exception in the trial -> ``error`` with the message; the worker goes on;
- the process dies (segfault, SIGKILL, os.abort) -> ``crash`` with the exit signal; the
  worker is restarted for the next trial;
- no answer within the timeout -> ``timeout``; the worker is killed and restarted.

Every request carries a sequence number that its reply echoes: a reply that comes after its
request was given up on (a stalled worker that resumes) is recognised and dropped, never read as
the answer to a later request. A worker never outlives its parent: on Linux the kernel kills it
when the parent dies (``PR_SET_PDEATHSIG``), and everywhere a thread watches the parent's pid.

This module is the process and its protocol; the trial it runs, and the short requests it
answers, are :mod:`autotune.measure.trial`'s. It does not choose configurations or store
anything (see :mod:`autotune.tune.study`).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import itertools
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.engines import EngineConfig
from autotune.engines.memory import DEFAULT_MARGIN
from autotune.errors import AutotuneError, WorkerError
from autotune.measure.trial import (
    TrialOutcome,
    TrialRequest,
    _first_line,
    accuracy,
    calibrate,
    plan_configs,
    run_trial,
    watch_continues,
)

log = logging.getLogger(__name__)

# How often the parent checks that a busy worker is still alive (seconds).
_POLL_S = 0.2
# The most one poll counts against a timeout (seconds): a longer gap is time the process was
# stopped (Ctrl-Z, SIGSTOP) or the machine asleep, and a stopped job's time is no trial's.
_MOST_PER_POLL_S = 5.0
# The longest a plan or calibrate request may take (seconds).
_QUERY_TIMEOUT_S = 300.0
# A wait longer than this says what it waits for, and again as often (never silent).
NOTICE_S = 5.0
# How long a worker that closed its pipe may take to exit (its files go first; freeing its
# device memory and the driver's teardown can take seconds), before it is killed.
_DYING_S = 30.0
# What each request is doing, for those notices.
_DOING = {"trial": "measuring", "plan": "planning memory", "calibrate": "timing the matmuls",
          "accuracy": "comparing 8-bit outputs with 16-bit"}


@dataclass
class WorkerInfo:
    """What a worker reports once its engine is loaded."""

    total_device_budget: int
    automatic_budget: int
    engine: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    load_s: float = 0.0
    # Streamable bytes of each precision the engine loaded ({"none": total} for one).
    total_device_budgets: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# The child side


# Short requests answered between trials: op -> function(engine, *payload).
_QUERIES = {"plan": plan_configs, "calibrate": calibrate, "accuracy": accuracy}


def describe_environment(config: EngineConfig) -> dict[str, Any]:
    """Versions, GPU and the measured host-to-device and device memory bandwidths (in the
    worker): the bounds of every configuration (:mod:`autotune.measure.roofline`)."""
    import platform

    env: dict[str, Any] = {"python": platform.python_version(), "device": config.device,
                           "cuda": None}
    # Read, not imported: torch takes seconds to import on a busy machine, and an engine that
    # replays a landscape never needs it; transformers takes ~1 s.
    for package in ("torch", "transformers", "optuna"):
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - declared deps
            pass
    if config.device.startswith("cuda"):
        import torch

        from autotune import gpu

        env["cuda"] = torch.version.cuda
        from autotune.measure.timing import measure_h2d_bandwidth, measure_hbm_bandwidth

        info = gpu.device_info(config.device)
        env["gpu"] = info.as_dict()
        env["h2d_gb_s"] = round(measure_h2d_bandwidth(config.device), 2)
        env["hbm_gb_s"] = round(measure_hbm_bandwidth(config.device), 1)
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


_PR_SET_PDEATHSIG = 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process: it exists
        return True
    return True


def _die_with_parent(parent_pid: int) -> None:
    """Ends this worker when its parent (the tuner) dies, however it dies (SIGKILL included):
    an orphan would go on loading the GPU and the host beside the next run's worker, spoiling
    its figures. The process that forked this one is the tuner itself (spawn) or the tuner's
    fork server (:func:`_context`), which ends as soon as the tuner does."""
    if sys.platform.startswith("linux"):
        try:  # the kernel's way: no polling, works while this process is busy in C code
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    forker = os.getppid()
    if not _alive(parent_pid) or forker == 1:  # reparented to init: the forker is gone too
        os._exit(1)  # it died before the above took effect

    def watch() -> None:  # elsewhere (and as a second line): reparented or gone: orphaned
        while os.getppid() == forker and _alive(parent_pid):
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve(conn: Any, config: EngineConfig, parent_pid: int | None = None,
           environment: dict[str, str] | None = None) -> None:
    """The worker's main loop (child process). Messages are ``(seq, op, payload)`` in and
    ``(seq, kind, data)`` out; the load's messages carry seq 0. ``environment``: the parent's
    now, which a process forked by the fork server takes on (a spawned one inherits it; the
    working directory and sys.path come with either, see :func:`_start`)."""
    if environment is not None:
        os.environ.clear()
        os.environ.update(environment)
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the parent stops the study and this process
    # with it; a traceback from here would only bury the parent's message. SIGTERM is the
    # parent's to handle too (it stops us through the pipe, or the kernel does as it dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_continues()  # a job stopped mid-measurement is measured again (measure.trial)
    # The logger's name says whose message it is (a library's, or autotune's own).
    logging.basicConfig(level=logging.WARNING,
                        format="worker: %(levelname)s %(name)s: %(message)s")
    try:
        if config.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(config.device)
        environment = describe_environment(config)
        from autotune.engines import load_engine
        from autotune.engines.base import loading_said_to

        t0 = time.perf_counter()
        with loading_said_to(lambda text: _tell(conn, (0, "progress", text))):
            engine = load_engine(config)
        info = WorkerInfo(
            total_device_budget=engine.total_device_budget,
            automatic_budget=engine.get_automatic_weight_streaming_budget(),
            engine=engine.describe(),
            environment=environment,
            load_s=time.perf_counter() - t0,
            total_device_budgets=dict(getattr(engine, "total_device_budgets", None) or {
                getattr(engine, "precision", "none"): engine.total_device_budget}),
        )
        if getattr(engine, "simulate_measurement", None) is None:
            # Prompts are torch tensors: imported now (seconds on a busy machine), not inside
            # the first trial's timeout. A replay never needs torch, and skips it.
            import torch  # noqa: F401
    except Exception as e:
        if isinstance(e, AutotuneError):  # the user's to fix: their words, as the CLI says them
            conn.send((0, "failed", ("user", _first_line(e))))
        else:
            conn.send((0, "failed", ("load", f"{type(e).__name__}: {_first_line(e)}")))
        return
    try:
        conn.send((0, "ready", info))
        _answer(conn, engine)
    except (EOFError, ConnectionError):
        # The parent closed the pipe (a Ctrl-C stops it first, mid-trial as often as not):
        # nothing is left to tell, and a traceback would bury its message.
        pass
    finally:
        engine.close()


def _tell(conn: Any, message: tuple[Any, ...]) -> None:
    """Sends a notice that nothing depends on: a parent gone (the pipe closed) is for the
    next real message to find, not a reason to fail what is being done."""
    try:
        conn.send(message)
    except (OSError, EOFError):
        pass


def _answer(conn: Any, engine: Any) -> None:
    """Serves the parent's requests until it says stop (the worker's loop, after the load)."""
    while True:
        seq, op, payload = conn.recv()
        if op == "stop":
            return
        if op == "trial":  # what it is doing goes back as it goes (the parent's notices)
            step = lambda text, seq=seq: conn.send((seq, "progress", text))  # noqa: E731
            conn.send((seq, "outcome", run_trial(engine, payload, progress=step)))
        elif op in _QUERIES:
            try:
                conn.send((seq, "answer", _QUERIES[op](engine, *payload)))
            except Exception as e:  # the parent decides; the worker goes on
                conn.send((seq, "error", f"{type(e).__name__}: {_first_line(e)}"))
        else:
            conn.send((seq, "error", f"unknown op {op!r}"))


# ------------------------------------------------------------------------------------------
# The parent side


# What the fork server imports once, so that each worker it forks has them already.
_PRELOAD = ["autotune.measure.worker", "torch"]


def _context(config: EngineConfig) -> Any:
    """How worker processes start. Never by forking the tuner (a process that may hold CUDA
    state, and threads): on Linux, forked from a fork server, a clean process started once per
    tuner that has imported torch and this module (never touching CUDA) and that forks a
    worker in milliseconds, where a spawned one imports torch anew (seconds: at every restart
    after a crash or a hang, and for every study a Python process runs). Engines that replay
    measurements need no torch: they are spawned, as everything is elsewhere."""
    if not sys.platform.startswith("linux") or _replays(config.engine):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read once, when the server starts
    return ctx


def _unguarded_main() -> str:
    """Why a worker may have died at its start: multiprocessing imports the script that
    started the study again in each worker, and one without a ``__main__`` guard starts the
    study there anew (an error) instead of serving. '' where that is not the case."""
    main = sys.modules.get("__main__")
    if getattr(main, "__spec__", None) is not None:  # python -m: never imported again
        return ""
    path = getattr(main, "__file__", None)
    try:
        text = Path(path).read_text() if path else ""
    except (OSError, UnicodeDecodeError):
        return ""
    if not text or "__main__" in text:
        return ""
    return (f"; {path} starts the study without `if __name__ == \"__main__\":`, and each "
            "worker process imports it again: put the study under that guard")


class WorkerStopped(Exception):
    """The worker was stopped on purpose (its run was interrupted: :meth:`Worker.abandon`);
    not a failure of the worker's, so nothing catches it as one."""


_START_LOCK = threading.Lock()  # os.environ is the process's: one start changes it at a time


def _start(proc: Any, ctx: Any) -> None:
    """Starts a worker process. The fork server (started by the first) runs ``python -c``,
    which puts the working directory first on its sys.path, and it does not take the tuner's
    sys.path (Python 3.11 and 3.12): a folder named ``autotune`` where the tuner runs (another
    checkout) would be what its preload imports, and every worker would run that code.
    PYTHONSAFEPATH (3.11+) keeps the directory off; the workers get the tuner's environment
    back (``_serve``)."""
    if ctx.get_start_method() != "forkserver":
        proc.start()
        return
    with _START_LOCK:
        saved = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            proc.start()
        finally:
            if saved is None:
                del os.environ["PYTHONSAFEPATH"]
            else:
                os.environ["PYTHONSAFEPATH"] = saved


def _replays(engine: str) -> bool:
    from autotune.engines import engine_class

    try:
        return getattr(engine_class(engine), "simulate_measurement", None) is not None
    except Exception:  # the worker says what is wrong with it, as it loads
        return False


class Worker:
    """Parent-side handle of one worker process; restarts it after a crash or hang."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        trial_timeout_s: float = 900.0,
        load_timeout_s: float = 3600.0,
    ) -> None:
        self.config = config
        self.trial_timeout_s = trial_timeout_s
        self.load_timeout_s = load_timeout_s
        self.info: WorkerInfo | None = None
        self.restarts = 0
        # Hears of every wait past NOTICE_S: (seconds waited, what is being done).
        self.on_wait: Callable[[float, str], None] | None = None
        self._proc: Any = None
        self._conn: Any = None
        self._seq = itertools.count(1)  # request numbers; 0 is the load's
        self._abandoned = False  # see abandon()
        self._hung_up = False  # the worker's end of the pipe closed: it is dying
        self.doing = ""  # what the load last said it is doing; empty once it is done

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, on_wait: Callable[[float], None] | None = None,
              every_s: float | None = None) -> WorkerInfo:
        """Spawns the process and waits for the engine to load, calling ``on_wait(seconds)``
        every ``every_s`` (default NOTICE_S) while it loads (a large model takes minutes to
        pin; what the load says it is doing is in :attr:`doing` meanwhile)."""
        if self._abandoned:
            raise self._stopped()
        every_s = NOTICE_S if every_s is None else every_s
        ctx = _context(self.config)
        # The pipe carries pickles (Connection.send/recv), which is safe only because it is an
        # anonymous pipe between this process and the child it spawns: no one else can write
        # to it. Never hand this connection, or pickles from elsewhere, to anything else.
        parent, child = ctx.Pipe()
        with _START_LOCK:  # not while another start has PYTHONSAFEPATH set (_start)
            environment = dict(os.environ) if ctx.get_start_method() == "forkserver" else None
        self._proc = ctx.Process(
            target=_serve, args=(child, self.config, os.getpid(), environment),
            name=f"autotune-worker-{self.config.device}", daemon=True,
        )
        _start(self._proc, ctx)
        child.close()
        self._conn = parent
        self._hung_up = False
        if self._abandoned:  # stopped while it started
            self._kill()
            self.stop()
            raise self._stopped()
        began = time.monotonic()
        deadline = began + self.load_timeout_s
        while True:
            reply = self._receive(min(every_s, max(deadline - time.monotonic(), 0.0)), seq=0)
            if (reply is not None or self._hung_up or not self._proc.is_alive()
                    or self._abandoned or time.monotonic() >= deadline):
                break
            if on_wait is not None:
                on_wait(time.monotonic() - began)
        self.doing = ""
        if self._abandoned:
            self.stop()
            raise self._stopped()
        if reply is None or reply[0] != "ready":
            if reply is None and self._hung_up:
                self._proc.join(timeout=_DYING_S)
                what = self._dying_reason().removeprefix("died: ")
            else:
                what = self._death_reason() if reply is None else reply[1][1]
            if reply is None:
                what += _unguarded_main()
            self.stop()
            if reply is not None and reply[1][0] == "user":
                raise WorkerError(what)
            raise WorkerError(f"the worker on {self.config.device} could not load the engine: {what}")
        self.info = reply[1]
        return self.info

    def _serving(self) -> bool:
        """Whether the process is there to take a request (not gone, not going)."""
        return self._proc is not None and self._proc.is_alive() and not self._hung_up

    def _send(self, message: tuple[Any, ...]) -> bool:
        """Sends a request; False where the worker's end is closed (it is dying)."""
        try:
            self._conn.send(message)
        except (BrokenPipeError, OSError):
            self._hung_up = True
            return False
        return True

    def run(self, request: TrialRequest) -> TrialOutcome:
        """Runs one trial; never raises for what the trial did to the worker."""
        if not self._serving():
            self.restart()
        start = time.perf_counter()
        seq = next(self._seq)
        reply = None
        if self._send((seq, "trial", request)):
            reply = self._receive(self.trial_timeout_s, seq=seq, doing=_DOING["trial"])
        if reply is not None:
            if reply[0] == "outcome":
                return reply[1]
            return TrialOutcome("error", f"the worker could not run the trial: {reply[1]}",
                                elapsed_s=time.perf_counter() - start)
        elapsed = time.perf_counter() - start
        # A process that closed its pipe is dying (_DYING_S): let it be reaped; one that did
        # not is hung.
        self._proc.join(timeout=_DYING_S if self._hung_up else 2)
        if self._proc.is_alive() and not self._hung_up:  # no answer in time: a hang
            self._kill()
            outcome = TrialOutcome(
                "timeout", f"no result within {self.trial_timeout_s:.0f} s; worker killed",
            )
        else:
            outcome = TrialOutcome("crash", f"worker process {self._dying_reason()}")
        outcome.elapsed_s = elapsed
        self._proc = None
        self._conn.close()
        self._conn = None
        return outcome

    def accuracy(self, isl: int, osl: int, seed: int) -> dict[str, Any]:
        """Each 8-bit precision's distance from 16-bit (see :func:`accuracy`)."""
        return self._query("accuracy", (isl, osl, seed))

    def plan(self, configs: list[tuple[int, int]], isl: int, osl: int,
             margin: int = DEFAULT_MARGIN, precision: str | None = None) -> dict[str, Any]:
        """Memory plans of many configurations and the headroom (see :func:`plan_configs`)."""
        return self._query("plan", (configs, isl, osl, margin, precision))

    def calibrate(self) -> dict[str, Any]:
        """Times the model's matmuls in the worker (see :func:`autotune.measure.calibration.measure_compute`)."""
        return self._query("calibrate", ())

    def _query(self, op: str, payload: tuple[Any, ...]) -> Any:
        if not self._serving():
            self.restart()
        seq = next(self._seq)
        reply = None
        if self._send((seq, op, payload)):
            # Short requests, but never judged by a tight trial timeout (a cold first matmul).
            reply = self._receive(max(self.trial_timeout_s, _QUERY_TIMEOUT_S), seq=seq,
                                  doing=_DOING.get(op, op))
        if reply is None or reply[0] != "answer":
            if self._abandoned:  # killed on purpose: not the worker's failure to report
                raise self._stopped()
            if reply is not None:
                what = reply[1]
            elif self._hung_up:  # dying: reaped or killed here, restarted at the next request
                self._proc.join(timeout=_DYING_S)
                what = f"the worker {self._dying_reason()}"
            else:
                what = self._death_reason()
            raise WorkerError(f"the worker on {self.config.device} could not {op}: {what}")
        return reply[1]

    def restart(self) -> None:
        self.stop()
        if self._abandoned:
            raise self._stopped()
        self.restarts += 1
        log.warning("restarting the worker on %s (restart %d)", self.config.device, self.restarts)
        self.start()

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.is_alive():
            try:
                self._conn.send((next(self._seq), "stop", None))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._kill()
        self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _kill(self) -> None:
        self._proc.kill()
        self._proc.join(timeout=10)

    def _stopped(self) -> WorkerStopped:
        return WorkerStopped(f"the worker on {self.config.device} was stopped")

    def abandon(self) -> None:
        """Kills the process now, from any thread (its caller was interrupted), and for
        good: the thread waiting on it sees it die and gets no new one."""
        self._abandoned = True
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()

    def _receive(self, timeout_s: float, *, seq: int, doing: str = "") -> Any:
        """The reply ``(kind, data)`` to request ``seq``, or None if the process died or the
        time ran out (time the job spent stopped not counted). Replies to earlier requests
        (given up on: a worker that stalled, then went on) are dropped. What the worker says
        it is doing meanwhile (``progress``) is passed to ``on_wait`` every ``NOTICE_S`` of the
        wait (``doing``: what it waits for)."""
        began = last = time.monotonic()
        waited, notice = 0.0, began + NOTICE_S
        while waited < timeout_s:
            now = time.monotonic()
            waited += min(now - last, _MOST_PER_POLL_S)
            last = now
            if doing and self.on_wait is not None and now >= notice:
                self.on_wait(now - began, doing)
                notice = now + NOTICE_S
            if self._conn.poll(_POLL_S):
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    self._hung_up = True
                    return None
            elif not self._proc.is_alive():
                # It may have sent its last words before dying.
                try:
                    if not self._conn.poll(0):
                        return None
                    message = self._conn.recv()
                except (EOFError, OSError):
                    self._hung_up = True
                    return None
            else:
                continue
            if message[0] == seq and message[1] == "progress":
                if doing:  # a request's notices say it; the load's go to self.doing
                    doing = f"{doing.split(':')[0]}: {message[2]}"
                if seq == 0:
                    self.doing = message[2]
                continue
            if message[0] == seq:
                return message[1:]
            if message[1] != "progress":
                log.warning("dropped a late reply of the worker on %s (request %s, %s)",
                            self.config.device, message[0], message[1])
        return None

    def _dying_reason(self) -> str:
        """Why a process that hung up is gone; killed if it has not gone in ``_DYING_S``."""
        if self._proc.is_alive():
            self._kill()
            return f"closed its pipe and did not exit within {_DYING_S:.0f} s; killed"
        return f"died: {self._death_reason()}"

    def _death_reason(self) -> str:
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
