"""autotune: find the best batch size and weight-streaming budget for LLM inference.

``import autotune`` is light: it imports neither torch_tensorrt nor CUDA (the parent process
spawns GPU workers; only they touch the device).
"""

from __future__ import annotations

from autotune.errors import (
    AutotuneError,
    EngineUnavailableError,
    NoCompletedTrialError,
    SchemaError,
    StorageError,
    StudyNotFoundError,
    UserInputError,
    WorkerError,
)

__version__ = "0.1.0"

__all__ = [
    "AutotuneError",
    "EngineUnavailableError",
    "NoCompletedTrialError",
    "SchemaError",
    "StorageError",
    "StudyNotFoundError",
    "UserInputError",
    "WorkerError",
    "__version__",
]
