"""Reading and writing the JSON files autotune exports (recommendations, landscapes).

Writes are atomic (a temporary file in the same directory, then a rename), so a crash or a full
disk never leaves half a file where a whole one was. Reads turn an unreadable or truncated file
into a :class:`~autotune.errors.SchemaError` naming the file. Checking the contents is the
caller's job. A command never writes over what it reads: :func:`check_outputs` refuses an
output that is one of its inputs (the study's database, a landscape, a checkpoint's folder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from autotune.errors import SchemaError, UserInputError


def dumps(data: Any, *, indent: int | None = 2) -> str:
    """JSON that every reader takes: a NaN or an infinity (which Python would print bare, as
    no JSON parser but Python's reads) is written as null, the figure unknown."""
    def plain(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return json.dumps(plain(data), indent=indent, allow_nan=False)


def write_atomic(data: Any, path: str | Path, *, indent: int = 2) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path} is a directory; give a file name, such as "
                             f"{path / 'recommendation.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_beside(path)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # said as "the disk is full" by the CLI
            raise
        raise UserInputError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "w") as f:
            # A file replaced keeps its mode (where the file system has modes at all).
            with contextlib.suppress(OSError):
                os.fchmod(f.fileno(), path.stat().st_mode & 0o777)
            f.write(dumps(data, indent=indent) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _create_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder, made as open() makes files (0666 less the
    umask): mkstemp's 0600 would keep a recommendation from a serving process of another
    user."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:  # 48 random bits taken: draw again
            continue


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


def _same_place(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode where both exist (a hard or symbolic
    link), else the same absolute path once links are followed."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_outputs(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Refuses, before any work, an output that is an input (or lies in an input folder), and
    two outputs that are one file: writing it would destroy what the command reads, or one
    output the other. Keys say what each path is, as the message names it (``--out``,
    ``the study's storage``)."""
    for what, path in outputs.items():
        for source, given in inputs.items():
            inside = given.is_dir() and given.resolve() in path.resolve().parents
            if inside or _same_place(path, given):
                where = "lies in" if inside else "is"
                raise UserInputError(
                    f"{what} {path} {where} {source} {given}, which this command reads: "
                    f"writing it would destroy that; give another {what.split()[0]}")
    named = list(outputs.items())
    for i, (what, path) in enumerate(named):
        for other, second in named[i + 1:]:
            if _same_place(path, second):
                raise UserInputError(f"{what} and {other} name one file ({path}): one would "
                                     "overwrite the other; give two different paths")


def read(path: str | Path, what: str) -> Any:
    """The parsed JSON of ``path``; ``what`` names the kind of file in the errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SchemaError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:  # a database, a picture, a latin-1 text
        raise SchemaError(f"{what} {path} is not a JSON text (not UTF-8 at byte {e.start}); "
                          f"give the JSON file autotune wrote") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SchemaError(f"{what} {path} is not valid JSON (truncated?): {e}") from e
    except RecursionError as e:  # arrays nested thousands deep: no file autotune writes
        raise SchemaError(f"{what} {path} is nested too deeply to be one autotune writes") from e
