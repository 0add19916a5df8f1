"""One measurement at a time per device on a host.

Two runs that time trials on one device at once (two ``autotune run`` on one study, or on two,
on the same GPU or on this CPU) share it, each reads slower, and each records its figure as
if it had the device alone: on a 2-core machine two CPU runs measured 75-101 tok/s where one
alone measures about 10,000, and the study recommended a configuration for having run after
the other process stopped. So the tuner holds an exclusive lock on a file of the device while
it measures (the hardware's timings, a trial, the confirmation); another process on this host
waits for it, saying so, and its trial's time limit starts once it has the device.

The lock is ``flock`` on ``<dir>/<device>.lock``: released by the kernel when its holder dies,
however it dies. ``<dir>`` is ``$AUTOTUNE_LOCK_DIR``, else ``autotune-locks-<uid>`` in the
temporary folder (runs of other users are not seen: a shared GPU is theirs to share). A GPU is
named by its NVML UUID where NVML answers, so that two processes that see it under different
``CUDA_VISIBLE_DEVICES`` indices still take turns. Different devices never wait for each
other (``--gpus 0,1``, or several workers on one host each with its own GPU).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

NOTICE_S = 5.0  # how often a wait is said
_POLL_S = 0.2


def lock_dir() -> Path:
    given = os.environ.get("AUTOTUNE_LOCK_DIR")
    return Path(given) if given else Path(tempfile.gettempdir()) / f"autotune-locks-{os.getuid()}"


def device_key(device: str) -> str:
    """A file name for the device: ``cpu``, or the GPU's UUID (else its torch name)."""
    if device.startswith("cuda"):
        with contextlib.suppress(Exception):  # no NVML: the name, which errs on the safe side
            from autotune import gpu

            return gpu.device_info(device).uuid.replace("/", "_")
    return device.replace(":", "_").replace("/", "_")


@contextlib.contextmanager
def exclusive(device: str, on_wait: Callable[[float, str], None] | None = None
              ) -> Iterator[None]:
    """Holds the device for this process (and thread) while the block runs. ``on_wait(seconds,
    holder)`` hears every ``NOTICE_S`` of a wait, with the pid holding the device."""
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / f"{device_key(device)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        began = time.monotonic()
        notice = began + NOTICE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if on_wait is not None and now >= notice:
                    on_wait(now - began, _holder(fd))
                    notice = now + NOTICE_S
                time.sleep(_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)  # who holds it, for the others' notices
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode().strip()
        if text:
            return f"pid {int(text)}"
    return "another process"
