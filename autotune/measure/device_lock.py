"""One measurement at a time per device on a host.

Two runs that time trials on one device at once (two ``autotune run`` on one study, or on two,
on the same GPU or on this CPU) share it, each reads slower, and each records its figure as
if it had the device alone: on a 2-core machine two CPU runs measured 75-101 tok/s where one
alone measures about 10,000, and the study recommended a configuration for having run after
the other process stopped. So the tuner holds an exclusive lock on a file of the device while
it measures (the hardware's timings, a trial, the confirmation); another process on this host
waits for it, saying so, and its trial's time limit starts once it has the device.

The lock is ``flock`` on ``<dir>/<device>.lock``: released by the kernel when its holder dies,
however it dies. ``<dir>`` is ``$AUTOTUNE_LOCK_DIR``, else ``$XDG_RUNTIME_DIR/autotune-locks``,
else ``autotune-locks-<uid>`` in the temporary folder; it must be a folder of this user's that
no one else can write (another user's folder there could hold a link to a file of ours), and
the lock file is opened without following links. Runs of other users are not seen: a shared
GPU is theirs to share. A GPU is
named by its NVML UUID where NVML answers, so that two processes that see it under different
``CUDA_VISIBLE_DEVICES`` indices still take turns. Different devices never wait for each
other (``--gpus 0,1``, or several workers on one host each with its own GPU).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from autotune.errors import UserInputError

NOTICE_S = 5.0  # how often a wait is said
_POLL_S = 0.2
_PID_WIDTH = 12  # the holder's pid, written padded: nothing is truncated


class Cancelled(Exception):
    """The wait for the device was given up (the run was stopped meanwhile)."""


def lock_dir() -> Path:
    given = os.environ.get("AUTOTUNE_LOCK_DIR")
    if given:
        return Path(given)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "autotune-locks"
    return Path(tempfile.gettempdir()) / f"autotune-locks-{os.getuid()}"


def _own_folder(directory: Path) -> None:
    """Makes ``directory`` (0700) or checks that it is this user's and nobody else's to
    write; refuses it otherwise, in one line."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise UserInputError(
            f"{directory} (the device locks' folder) is not a folder of this user's that only "
            "it can write; remove it, or give another with AUTOTUNE_LOCK_DIR")


def device_key(device: str) -> str:
    """A file name for the device: ``cpu``, or the GPU's UUID (else its torch name)."""
    if device.startswith("cuda"):
        with contextlib.suppress(Exception):  # no NVML: the name, which errs on the safe side
            from autotune import gpu

            return gpu.device_info(device).uuid.replace("/", "_")
    return device.replace(":", "_").replace("/", "_")


@contextlib.contextmanager
def exclusive(device: str, on_wait: Callable[[float, str], None] | None = None,
              cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
    """Holds the device while the block runs, against other processes and other threads
    (each call opens the file anew: a thread that nests two calls on one device waits for
    itself). ``on_wait(seconds, holder)`` hears every ``NOTICE_S`` of a wait, with the pid
    holding the device; ``cancelled()`` true ends a wait with :class:`Cancelled`."""
    directory = lock_dir()
    _own_folder(directory)
    path = directory / f"{device_key(device)}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:  # a link there (ELOOP), or no room: said, never followed
        raise UserInputError(f"cannot open the device lock {path}: {e.strerror or e}") from e
    try:
        began = time.monotonic()
        notice = began + NOTICE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancelled is not None and cancelled():
                    raise Cancelled(f"stopped while waiting for {device}") from None
                now = time.monotonic()
                if on_wait is not None and now >= notice:
                    on_wait(now - began, _holder(fd))
                    notice = now + NOTICE_S
                time.sleep(_POLL_S)
        # Who holds it, for the others' notices: fixed width, so nothing need be truncated.
        os.pwrite(fd, str(os.getpid()).rjust(_PID_WIDTH).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, _PID_WIDTH, 0).decode().strip()
        if text:
            return f"pid {int(text)}"
    return "another process"
