"""Knobs and counters of the torch_tensorrt test double (not part of the real API).

Tests set the simulated environment here (free device memory, injected faults) and read what
the double did (compile calls, engine deserializations). ``reset()`` restores the defaults.
The version itself is ``torch_tensorrt.__version__``, read at every call, so a test can set it.
"""

from __future__ import annotations

import sys
from typing import Any

# Free device memory the automatic-budget heuristic sees (bytes). Large by default: for a
# small model on a large GPU TensorRT's automatic budget is capped at the streamable size,
# i.e. streaming is off by default (research note §1.4).
FREE_DEVICE_MEMORY = 80 * 2**30
# What the heuristic leaves free for the application ("leaving some space", §6).
AUTO_RESERVE = 0

# Injected faults. keep_context_on_set: the engine sets its budget without invalidating the
# live execution context first, which TensorRT rejects, so the budget silently stays (#4333,
# §5).
FAULTS: dict[str, bool] = {"keep_context_on_set": False}

COMPILE_CALLS: list[dict[str, Any]] = []  # kwargs of every dynamo.compile call
# Execution contexts holding their own device memory (kSTATIC): alive now, and the most alive
# at once since the last reset (the memory a budget change may hold at its peak).
STATIC_CONTEXTS: dict[str, int] = {"alive": 0, "peak": 0}
COUNTERS: dict[str, int] = {"engines_built": 0, "engines_deserialized": 0}


def reset() -> None:
    global FREE_DEVICE_MEMORY, AUTO_RESERVE
    FREE_DEVICE_MEMORY = 80 * 2**30
    AUTO_RESERVE = 0
    FAULTS["keep_context_on_set"] = False
    COMPILE_CALLS.clear()
    STATIC_CONTEXTS.update(alive=0, peak=0)
    for key in COUNTERS:
        COUNTERS[key] = 0


def version() -> tuple[int, int]:
    """(major, minor) of the simulated torch_tensorrt, from its settable ``__version__``."""
    text = sys.modules["torch_tensorrt"].__version__
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int(minor)
