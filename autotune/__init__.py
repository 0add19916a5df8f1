"""autotune: find the best batch size and weight-streaming budget for LLM inference.

``import autotune`` is light: it imports neither torch_tensorrt nor CUDA (the parent process
spawns GPU workers; only they touch the device).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

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

# The names the README's Python API imports (``from autotune.study import run_study``, ``from
# autotune import recommend``), kept where their modules moved: each is the very module below.
MOVED = {"autotune.study": "autotune.tune.study", "autotune.recommend": "autotune.results.recommend"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a moved name as its module (one module object under both names)."""

    def __init__(self) -> None:
        self._specs: dict[str, Any] = {}

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: Any) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._specs[module.__name__]  # its own, not the alias's


sys.meta_path.insert(0, _MovedModules())  # before an editable install's finder
