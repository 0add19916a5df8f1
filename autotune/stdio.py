"""The command line's standard streams, when their other end is gone.

Two cases a command must survive without losing its work:

- a stream closed before it started (``autotune run ... >&-``): Python sees ``None`` there,
  and the descriptor is free, so the next file opened (the SQLite database) would take it and
  get the command's output written into it. :func:`hold_closed` points the free descriptors
  at /dev/null first.
- a reader that goes away (``| head -1``, a pager quit early): writing raises BrokenPipeError.
  :class:`Dropping` wraps a stream so that from then on what is written is dropped and the
  command goes on (its files are written, its trials stored) and exits as it would have.

This module does not decide what is printed (see :mod:`autotune.cli`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO


def hold_closed() -> None:
    """Gives each closed standard descriptor (0, 1, 2) to /dev/null, and Python a stream
    for it: no file opened later can take its number."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            got = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if got != fd:
                os.dup2(got, fd)
                os.close(got)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115  (the process's own)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


class Dropping:
    """A text stream whose writes are dropped once its reader has gone (see the module
    docstring); the descriptor then points at /dev/null, so that the interpreter's last flush
    at exit does not fail either."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self._stream.write(text)
                self._stream.flush()  # line by line: the break is found at once
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.gone = True
        with contextlib.suppress(OSError, ValueError):  # a stream with no descriptor
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...
        return getattr(self._stream, name)


@contextlib.contextmanager
def survivable() -> Iterator[None]:
    """Within the block, sys.stdout and sys.stderr drop what their gone readers cannot take."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Dropping(sys.stdout), Dropping(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
