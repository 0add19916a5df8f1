"""Opens the study storage: embedded SQLite by default, any Optuna RDB URL otherwise.

SQLite is put in WAL mode (persistent in the file) and opened with a busy timeout, so that
optuna-dashboard can read a study while it is being written. A file that is not a SQLite
database is refused and never overwritten; a missing or unwritable directory is reported
before anything is created. Passwords in URLs are redacted wherever a URL is shown.

This module does not know about trials or studies' contents (see :mod:`autotune.study`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from autotune.errors import StorageError, UserInputError

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///studies/autotune.db"
SQLITE_BUSY_TIMEOUT_S = 60
_SQLITE_MAGIC = b"SQLite format 3\x00"


def parse_url(url: str) -> Any:
    """The SQLAlchemy URL object, or UserInputError for a malformed URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise UserInputError(
            f"storage: {redact(url)!r} is not a database URL; expected e.g. "
            "sqlite:///studies/autotune.db or postgresql://user@host/db"
        ) from e
    return parsed


def redact(url: str) -> str:
    """The URL with its password hidden (for logs, tables and exports)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a malformed URL: hide everything between :// and @
        if "://" in url and "@" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        return url


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite URL (None for other backends or in-memory)."""
    parsed = parse_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def check_sqlite_file(path: Path, *, create: bool) -> None:
    """Refuses a path that is not (and cannot become) a SQLite database, before any write."""
    if path.exists():
        if path.is_dir():
            raise StorageError(f"storage: {path} is a directory, not a SQLite file")
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head and head != _SQLITE_MAGIC:
            raise StorageError(
                f"storage: {path} is not a SQLite database (autotune never overwrites it); "
                "give another --storage path"
            )
        if not os.access(path, os.W_OK):
            raise StorageError(f"storage: {path} is not writable")
        return
    if not create:
        raise StorageError(f"storage: {path} does not exist (no study has been run there)")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(
            f"storage: cannot create {path}: {existing} is not a writable directory; "
            "give a writable --storage path"
        )


def _enable_wal(path: Path) -> None:
    """WAL lets readers (the dashboard) and the writer (the study) work at once."""
    conn = sqlite3.connect(str(path), timeout=SQLITE_BUSY_TIMEOUT_S)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            log.warning("SQLite at %s would not enter WAL mode (%s)", path, mode)
    except sqlite3.DatabaseError as e:
        raise StorageError(f"storage: {path} is not a usable SQLite database ({e})") from e
    finally:
        conn.close()


def open_storage(url: str = DEFAULT_STORAGE, *, create: bool = True) -> Any:
    """An Optuna RDBStorage for ``url``; ``create=False`` only opens existing storage."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    parsed = parse_url(url)
    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    if parsed.drivername.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        if path is not None:
            check_sqlite_file(path, create=create)
            path.parent.mkdir(parents=True, exist_ok=True)
            _enable_wal(path)
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except (SQLAlchemyError, ImportError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"storage {redact(url)}: cannot open it ({first})") from e


def study_names(storage: Any) -> list[str]:
    import optuna

    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage: Any, name: str | None) -> Any:
    """The named study; with no name, the only study there (an error if there are several)."""
    import optuna

    from autotune.errors import StudyNotFoundError

    names = study_names(storage)
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif not names:
            raise StudyNotFoundError("the storage holds no study yet; run `autotune run` first")
        else:
            raise UserInputError(
                f"the storage holds {len(names)} studies; pick one with --study: "
                + ", ".join(names)
            )
    if name not in names:
        raise StudyNotFoundError(
            f"no study named {name!r} in this storage; studies there: "
            + (", ".join(names) if names else "none")
        )
    return optuna.load_study(study_name=name, storage=storage)
