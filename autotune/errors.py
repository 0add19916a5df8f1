"""The exception tree of autotune.

Every error a user can cause is an :class:`AutotuneError`; the CLI prints its message on one
line and exits non-zero. Messages say what was expected, what was given, and how to fix it.
Internal invariants use ``assert`` instead and are bugs when they fire.
"""

from __future__ import annotations


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
