"""How a command stops: Ctrl-C, SIGTERM and SIGHUP, each taken once, and the line saying what
was kept.

The first stop signal is raised in the main thread as KeyboardInterrupt (Ctrl-C's own, or
:class:`~autotune.errors.Interrupted` naming the signal), so that every stop gets Ctrl-C's
cleanup: the running trial failed and queued again, the workers stopped. From then on the
signal is ignored: a second press 10 ms later would otherwise cut that cleanup short and
leave the trial RUNNING. Python's default on SIGTERM would exit at once, leaving the trial
RUNNING and the worker on.

This module does not print (see :mod:`autotune.cli`) nor touch trials (see
:mod:`autotune.tune.resume`).
"""

from __future__ import annotations

import signal
from typing import Any

from autotune.errors import Interrupted, stop_name

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_on(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: a second signal must not cut the cleanup
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


def install() -> None:
    """Takes each stop signal once, as the module docstring says (main thread only)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_on)


def stop_line(e: BaseException, storage: str, study: str | None) -> str:
    """What a run or worker stopped by ``e`` says: what is kept, and how to go on."""
    from autotune.storage import redact

    why = "" if stop_name(e) == "Ctrl-C" else f" ({stop_name(e)})"
    if _finished_trials(storage, study) == 0:
        return (f"interrupted{why} before any trial finished: nothing to keep; rerun the same "
                "command to start")
    return (f"interrupted{why}: every finished trial is kept in {redact(storage)}; rerun the "
            "same command to resume (the trial that was running runs again)")


def _finished_trials(storage: str, study: str | None) -> int | None:
    """How many finished trials the study holds (0 where it, or its file, is not there);
    None if that cannot be read."""
    from autotune.errors import StudyNotFoundError
    from autotune.storage import load_study, open_storage, sqlite_path
    from autotune.tune import budget

    try:
        path = sqlite_path(storage)
        if path is not None and not path.exists():
            return 0
        return budget.spent(load_study(open_storage(storage, create=False, read_only=True),
                                       study))
    except StudyNotFoundError:  # never created, or removed again as it held no trial
        return 0
    except Exception:  # the stop is what matters: it is said the general way
        return None
