"""Engines and their registry: ``--engine NAME`` or ``--engine package.module:Class``.

Engines are imported only when chosen, so ``import autotune`` never needs torch_tensorrt.
"""

from __future__ import annotations

import importlib

from autotune.engines.base import (
    Engine,
    EngineConfig,
    Generation,
    check_option_values,
    check_options,
    check_precisions,
    clamp_budget,
    declared_options,
)
from autotune.errors import UserInputError

__all__ = [
    "BUILTIN", "ENGINES", "Engine", "EngineConfig", "Generation", "check_option_values",
    "check_options", "check_precisions", "clamp_budget", "declared_options", "engine_class", "engine_names", "load_engine",
    "register_engine",
]

# name -> "module:Class", imported on first use.
ENGINES: dict[str, str] = {
    "native": "autotune.engines.native:NativeEngine",
    "tensorrt": "autotune.engines.tensorrt:TensorRTEngine",
    "landscape": "autotune.engines.landscape:LandscapeEngine",
}

# The engines autotune ships: `autotune worker` runs these, and no other, unless its own
# command line names another (--engine): a study's storage must not choose code to import.
BUILTIN = frozenset(ENGINES)

def register_engine(name: str, target: str) -> None:
    """Makes ``--engine name`` load ``target`` ("package.module:Class")."""
    if ":" not in target:
        raise UserInputError(f"engine target: expected 'package.module:Class'; got {target!r}")
    ENGINES[name] = target


def engine_names() -> list[str]:
    return list(ENGINES)


def engine_class(name: str) -> type[Engine]:
    """The class behind an engine name or a ``module:Class`` reference."""
    target = ENGINES.get(name, name if ":" in name else None)
    if target is None:
        raise UserInputError(
            f"unknown engine {name!r}; known engines: {', '.join(ENGINES)} "
            "(or give package.module:Class for your own)"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UserInputError(f"engine {name!r}: no module {module_name!r}") from e
        raise
    try:
        return getattr(module, class_name)
    except AttributeError as e:
        raise UserInputError(f"engine {name!r}: {module_name} has no {class_name}") from e


def load_engine(config: EngineConfig) -> Engine:
    cls = engine_class(config.engine)
    check_precisions(cls, config)
    check_option_values(cls, config)
    return cls.load(config)
