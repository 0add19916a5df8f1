"""Reading and writing the JSON files autotune exports (recommendations, landscapes).

Writes are atomic (a temporary file in the same directory, then a rename), so a crash or a full
disk never leaves half a file where a whole one was. Reads turn an unreadable or truncated file
into a :class:`~autotune.errors.SchemaError` naming the file. Checking the contents is the
caller's job.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from autotune.errors import SchemaError, UserInputError


def write_atomic(data: Any, path: str | Path, *, indent: int = 2) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path} is a directory; give a file name, such as "
                             f"{path / 'recommendation.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    except OSError as e:
        if e.errno == errno.ENOSPC:  # said as "the disk is full" by the CLI
            raise
        raise UserInputError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """Refuses, before any work, a path :func:`write_atomic` could not write: a folder, a
    name too long, a parent that is a file or not writable. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path} is a directory; give a file name, such as "
                             f"{path / 'recommendation.json'}")
    if len(path.name.encode()) > 255 - 16:  # the temporary file beside it adds a suffix
        raise UserInputError(f"{what} {path}: the file name is too long "
                             f"({len(path.name.encode())} bytes)")
    existing = path.parent if str(path.parent) else Path(".")
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"cannot write {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (
            path.exists() and not os.access(path, os.W_OK)):
        raise UserInputError(f"cannot write {path}: permission denied (or a read-only disk)")
    return path


def read(path: str | Path, what: str) -> Any:
    """The parsed JSON of ``path``; ``what`` names the kind of file in the errors."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SchemaError(f"cannot read {what} {path}: {e.strerror}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{what} {path} is not valid JSON (truncated?): {e}") from e
