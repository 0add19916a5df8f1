"""The exception tree of autotune.

Every error a user can cause is an :class:`AutotuneError`; the CLI prints its message on one
line and exits non-zero. Messages say what was expected, what was given, and how to fix it.
Internal invariants use ``assert`` instead and are bugs when they fire.
"""

from __future__ import annotations

import signal


class AutotuneError(Exception):
    """Base class of the errors autotune raises on purpose."""


class UserInputError(AutotuneError, ValueError):
    """A command-line flag, a file or an API argument is not acceptable."""


class EngineUnavailableError(AutotuneError):
    """An engine cannot run here (missing optional package, no GPU, ...)."""


class StorageError(AutotuneError):
    """The study storage cannot be opened or written."""


class StudyNotFoundError(AutotuneError):
    """A named study does not exist in the storage."""


class NoCompletedTrialError(AutotuneError):
    """A study has no completed feasible trial to recommend from."""


class SchemaError(AutotuneError):
    """An exported file is truncated, malformed or of an unknown ``schema_version``."""


class WorkerError(AutotuneError):
    """A worker process crashed, hung or answered something unexpected."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM from ``timeout``, docker or systemd; SIGHUP) raised as Ctrl-C's
    KeyboardInterrupt is, so that it gets every cleanup Ctrl-C gets."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def stop_name(e: BaseException) -> str:
    """What stopped the run, in words: the signal's name, or Ctrl-C."""
    return e.name if isinstance(e, Interrupted) else "Ctrl-C"


def stop_exit_code(e: BaseException) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C)."""
    return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)
