"""Host memory: what the workers of a run will hold on the host, against what this host has.

Weight streaming keeps the streamed weights in host memory (the native engine pins one copy
per worker; Torch-TensorRT's engine keeps its own copy beside PyTorch's while it builds), so a
model that does not fit the GPU may not fit the host either: llama2-70b in fp16 needs 138 GB
per worker. Pinning more than the host can give does not fail cleanly: the kernel's OOM killer
ends the worker, or the host swaps everything else out. So a run checks first, before anything
is written, and says what it needs and what there is.

"What there is" is the kernel's ``MemAvailable`` (free memory plus the page cache it can
reclaim), capped by the memory cgroup's limit when the process runs in one (containers:
``MemAvailable`` there shows the whole host). Where neither can be read (not Linux), nothing is
checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from autotune.errors import UserInputError
from autotune.units import format_bytes

if TYPE_CHECKING:
    from autotune.engines.base import EngineConfig

# Above this share of the available memory, a run goes ahead with a warning: the rest of the
# host (page cache, other processes, the worker's own Python and CUDA state) is squeezed.
WARN_SHARE = 0.9

# cgroup v2 (limit, usage) and cgroup v1 (limit, usage) of the process's memory cgroup.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def mem_available(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """The kernel's ``MemAvailable`` in bytes, or None where it cannot be read."""
    try:
        text = Path(meminfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            return int(fields[1]) * 1024 if len(fields) >= 2 and fields[1].isdigit() else None
    return None


def cgroup_room(files: tuple[tuple[str, str], ...] = _CGROUP_FILES) -> int | None:
    """Bytes left under the memory cgroup's limit (limit - usage), or None without a limit."""
    for limit_path, usage_path in files:
        try:
            limit = Path(limit_path).read_text().strip()
            usage = Path(usage_path).read_text().strip()
        except OSError:
            continue
        # "max" (v2) or a huge page-rounded number (v1) mean no limit.
        if not limit.isdigit() or not usage.isdigit() or int(limit) >= 2**62:
            return None
        return max(int(limit) - int(usage), 0)
    return None


def available_bytes() -> int | None:
    """Host memory a run can still take: MemAvailable, capped by the cgroup's room."""
    known = [v for v in (mem_available(), cgroup_room()) if v is not None]
    return min(known) if known else None


def check_room(per_worker: int, workers: int, what: str,
               available: int | None = None, smaller: str = "a smaller model") -> str | None:
    """Raises UserInputError when ``workers`` x ``per_worker`` bytes exceed the host memory
    available; returns a warning when they take most of it; None otherwise.

    ``what`` names the holder in messages ("llama2-70b (float16) on the native engine").
    ``available``: bytes available (default: :func:`available_bytes`; None there: unchecked).
    ``smaller``: the other way out, in words.
    """
    if per_worker <= 0:
        return None
    if available is None:
        available = available_bytes()
        if available is None:
            return None
    needed = per_worker * workers
    each = f"{format_bytes(per_worker)} per worker x {workers} workers = " if workers > 1 else ""
    if needed > available:
        fewer = ", fewer --gpus," if workers > 1 else ""
        raise UserInputError(
            f"host memory: {what} keeps its weights in host memory: {each}"
            f"{format_bytes(needed)}, but this host has {format_bytes(available)} available; "
            f"use a host with more memory{fewer} or {smaller}"
        )
    if needed > WARN_SHARE * available:
        return (f"host memory: {what} will take {format_bytes(needed)} of the "
                f"{format_bytes(available)} this host has available; other processes may be "
                f"swapped out")
    return None


def check_engine(config: EngineConfig, workers: int) -> str | None:
    """:func:`check_room` for ``workers`` workers of ``config``'s engine on this host (engines
    without ``host_bytes``, such as the landscape replay, hold nothing worth checking)."""
    from autotune.engines import engine_class

    host_bytes = getattr(engine_class(config.engine), "host_bytes", None)
    if host_bytes is None:
        return None
    smaller = ("--dtype float16 (half the bytes) or a smaller model" if config.dtype == "float32"
               else "a smaller model")
    if config.engine == "native" and "none" in config.quantization:
        smaller += " or --quantization int8 (8-bit weights: about half the bytes)"
    return check_room(host_bytes(config), workers,
                      f"{config.model} ({config.dtype}) on the {config.engine} engine",
                      smaller=smaller)
