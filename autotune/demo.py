"""The first run on a machine without a GPU: a replay of a landscape measured on a GPU.

Without a GPU there is no link to stream weights over (host and "device" are one memory), so
a CPU's figures say nothing of the batch x budget trade-off the tool exists to find, and on a
shared 2-core machine they are mostly noise. ``autotune run`` with ``--model auto`` on such a
machine therefore replays a grid the native engine measured on an H100 (llama2-7b, 8 GiB
limit, isl 128, osl 8; ``benchmarks/landscapes/``) through the real study: worker process,
memory plans, prior, SQLite, recommendation. A limit on time per output token puts the optimum
inside the space, on the memory limit's edge, so the search moves along both axes. Every line
the run prints says it is a replay (:func:`label`).

This module chooses the file, the limit and the words; it runs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A copy of benchmarks/landscapes/llama2-7b-8GiB-isl128-osl8-h100.json, shipped with the
# package so that an installed autotune finds it (tests/test_demo.py checks they are one file).
LANDSCAPE = Path(__file__).parent / "data" / "llama2-7b-8GiB-isl128-osl8-h100.json"
# Above the link-bound steps of budgets under 30% (190-240 ms there): the best then lies at
# batch 32, 30% resident, inside the space, not at its largest batch.
MAX_TPOT_MS = 180.0


def label(workload: dict[str, Any] | None) -> str:
    """The prefix of every line about a replayed study ("" for a measured one)."""
    return "[replay] " if (workload or {}).get("engine") == "landscape" else ""


def first_line(landscape: Any, *, limit: int | None, chosen: bool) -> str:
    """What is running: a replay, of what, measured where, and (for the demo) why."""
    wl, gpu = landscape.workload, (landscape.data.get("environment") or {}).get("gpu") or {}
    where = gpu.get("name") or wl.get("gpu") or "a GPU"
    memory = f", {limit / 2**30:g} GiB limit" if limit else ""
    why = ("no GPU here, so this demo replays figures measured on a GPU; they show the tool, "
           "not this machine" if chosen else "figures measured there, not here")
    return (f"[replay] {wl.get('model')} on {where}{memory}, isl {wl.get('isl')}, "
            f"osl {wl.get('osl')}, replayed from {Path(landscape.path).name}: {why}")
