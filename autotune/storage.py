"""Opens the study storage: embedded SQLite by default, any Optuna RDB URL otherwise.

SQLite is put in WAL mode (persistent in the file) and opened with a busy timeout, so that
optuna-dashboard can read a study while it is being written. A file that is not a SQLite
database, or is another application's, or Optuna's with tables missing, is refused and never
written to; a missing or unwritable directory is reported
before anything is created. An existing file is first looked at through a read-only
connection (one that cannot checkpoint a WAL into it), and what is wrong is said as it is:
damaged, its write-ahead log lost, the disk full, or unreadable for another reason. Commands
that only read (show, export, report) open the database read-only, so a read-only file or
mount serves them. Passwords in URLs are redacted wherever a URL is shown.

This module does not know about trials or studies' contents (see :mod:`autotune.tune.study`).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, NoReturn

from autotune.errors import StorageError, StudyNotFoundError, UserInputError

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///studies/autotune.db"
SQLITE_BUSY_TIMEOUT_S = 60


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


def sqlite_files(url: str) -> dict[str, Path]:
    """The files a SQLite storage consists of (the database and the companions SQLite keeps
    beside it), by what they are; none for other backends."""
    path = sqlite_path(url)
    if path is None:
        return {}
    files = {"the study storage": path}
    for suffix in ("-wal", "-shm", "-journal"):
        files[f"the study storage's {suffix[1:]} file"] = Path(f"{path}{suffix}")
    return files


def _read_only_uri(path: Path) -> str:
    """A SQLite URI that can only read ``path``: such a connection never checkpoints a WAL into
    the file on closing (a normal one does, even with query_only). Immutable where nothing can
    be writing it (its folder is read-only and no WAL is there): SQLite could not open a WAL
    database read-only there otherwise, for want of its -shm index."""
    query = "mode=ro"
    folder = path.parent if str(path.parent) else Path(".")
    if not os.access(folder, os.W_OK) and not Path(f"{path}-wal").exists():
        query += "&immutable=1"
    return f"file:{urllib.parse.quote(str(path.resolve()))}?{query}"


def _query(path: Path, sql: str) -> list[Any]:
    """The rows of a read-only query on ``path``. In the rare case a read-only connection fails
    with an I/O error on the WAL index (it may beside a writer of this same process), asks
    again through a normal connection with writes refused (query_only)."""
    try:
        conn = sqlite3.connect(_read_only_uri(path), uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if not str(getattr(e, "sqlite_errorname", "")).startswith("SQLITE_IOERR") or _disk_full(
                path):
            raise
    conn = sqlite3.connect(str(path), timeout=SQLITE_BUSY_TIMEOUT_S)
    try:
        conn.execute("PRAGMA query_only = ON")
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _disk_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent if str(path.parent) else ".").free == 0
    except OSError:
        return False


def _damage(e: sqlite3.DatabaseError) -> bool:
    """Whether SQLite's error says the file itself is damaged (not: unreadable here)."""
    name = str(getattr(e, "sqlite_errorname", ""))
    return (name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
            or "malformed" in str(e) or "not a database" in str(e))


def _is_sqlite(path: Path) -> bool:
    """Whether a file is a SQLite database (or empty), asked through SQLite itself.

    Never with open()/close() on the file: closing any descriptor of a file drops every POSIX
    lock this process holds on it, and so the locks of the SQLite connections this process
    may have open on the same database (another process could then checkpoint the WAL from
    under them and lose writes)."""
    try:
        _query(path, "PRAGMA schema_version")
    except sqlite3.DatabaseError as e:
        if "not a database" in str(e):
            return False
        return True  # damaged or unreadable: check_integrity says which
    return True


def check_sqlite_file(path: Path, *, create: bool, writable: bool = True) -> None:
    """Refuses a path that is not (and cannot become) a SQLite database, before any write."""
    if path.is_symlink() and not path.exists():
        raise StorageError(f"storage: {path} is a symbolic link to nothing "
                           f"({os.readlink(path)}); give the database's real path")
    if path.exists():
        if path.is_dir():
            raise StorageError(f"storage: {path} is a directory, not a SQLite file")
        _check_wal_kept(path)  # before any connection: opening one rebuilds the index
        if not _is_sqlite(path):
            raise StorageError(
                f"storage: {path} is not a SQLite database (autotune never overwrites it); "
                "give another --storage path"
            )
        if writable and not os.access(path, os.W_OK):
            raise StorageError(f"storage: {path} is not writable (show, export and report "
                               "read it as it is)")
        return
    if not create:
        raise StorageError(f"storage: {path} does not exist (no study has been run there)")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists():
        if existing.is_symlink():  # a dangling link where a folder should be
            raise StorageError(
                f"storage: cannot create {path}: {existing} is a symbolic link to nothing "
                f"({os.readlink(existing)}); create its target or give another --storage path")
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(
            f"storage: cannot create {path}: {existing} is not a writable directory; "
            "give a writable --storage path"
        )


def _check_wal_kept(path: Path) -> None:
    """Refuses a database whose write-ahead log was deleted (or not copied with it): its
    index (-shm) says the log held committed pages that the file itself lacks. Opened as it
    is, those commits are lost for good; put back, nothing is."""
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    # Read only while no -wal exists: then no connection of this process holds a lock on
    # the -shm that closing a descriptor of it would drop.
    if wal.exists() or not shm.exists():
        return
    try:
        with open(shm, "rb") as f:
            header = f.read(48)  # the WAL-index header, in the host's byte order
    except OSError:
        return
    frames = int.from_bytes(header[16:20], sys.byteorder) if len(header) >= 48 else 0
    if header[12:13] == b"\x01" and frames > 0:
        raise StorageError(
            f"storage: {path}'s write-ahead log {wal.name} is missing, while its index "
            f"{shm.name} says it held {frames} pages of committed writes: it was deleted, or "
            f"not copied with the database. The file is not damaged but lacks those writes; "
            f"autotune leaves it untouched: put {wal.name} back beside it (or restore both "
            "from a backup)")


def check_integrity(path: Path) -> None:
    """Refuses a damaged (corrupted, truncated) database, reading it through a read-only
    connection: a damaged file is never written to, so whatever can still be recovered from
    it stays there. A file that cannot be read (a full disk, a lost write-ahead log, an I/O
    error) is not called damaged: the error says what is wrong."""
    try:
        problems = [row[0] for row in _query(path, "PRAGMA quick_check(3)")]
    except sqlite3.DatabaseError as e:
        if not _damage(e):
            raise _unreadable(path, e) from e
        problems = [str(e)]
    if problems != ["ok"]:
        problems = [" ".join(p.split()) for p in problems]  # one line, as errors are
        raise StorageError(
            f"storage: {path} is damaged (SQLite: {'; '.join(problems)[:200]}); autotune "
            "leaves it untouched: restore it from a backup (`sqlite3 FILE .recover` may save "
            "its trials) or give another --storage path"
        )


def check_schema(path: Path, *, create: bool) -> None:
    """Refuses a SQLite database that is not Optuna's, before anything writes to it: another
    application's (autotune would add a dozen tables to it and switch its journal mode), or
    Optuna's with tables missing (dropped: a run would make them again, empty, and its new
    trials would take the ids, and so the attributes, of the deleted ones). A database without
    any table is new: a run fills it; a command that only reads finds no study there."""
    from optuna.storages._rdb.models import BaseModel  # the tables Optuna makes

    tables = _settled_tables(path, set(BaseModel.metadata.tables))
    if not tables:
        if create:
            return
        raise StudyNotFoundError(f"storage: {path} holds no study (an empty database); run "
                                 "`autotune run --storage ...` first")
    missing = sorted(set(BaseModel.metadata.tables) - tables)
    if len(missing) == len(BaseModel.metadata.tables):
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise StorageError(
            f"storage: {path} is another application's SQLite database (tables: {shown}); "
            "autotune adds its tables only to a new file or an Optuna one and leaves this one "
            "untouched: give another --storage path")
    if missing:
        raise StorageError(
            f"storage: {path} is an Optuna database with tables missing ({', '.join(missing)}): "
            "dropped or damaged; autotune leaves it untouched (made again empty, they would "
            "give new trials the attributes of deleted ones): restore it from a backup or give "
            "another --storage path (if an older Optuna made it, `optuna storage upgrade` "
            "brings it up to date)")


# Another run creating the schema of a new file at this moment makes its tables one by one,
# each committed on its own: a table set still growing is that, not a dropped table. It is
# read again until it is whole or has not changed for this long.
SCHEMA_SETTLE_S = 2.0


def _settled_tables(path: Path, optuna_tables: set[str]) -> set[str]:
    """The file's tables, once no other process is still creating Optuna's schema in it."""
    def read() -> set[str]:
        rows = _query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in rows}

    tables = read()
    still = time.monotonic()
    while tables & optuna_tables and not optuna_tables <= tables:
        if time.monotonic() - still >= SCHEMA_SETTLE_S:
            break  # unchanged: dropped, not being made
        time.sleep(0.05)
        now = read()
        if now != tables:
            tables, still = now, time.monotonic()
    return tables


def _unreadable(path: Path, e: sqlite3.DatabaseError) -> StorageError:
    """What keeps SQLite from reading a file that is not known to be damaged."""
    if _disk_full(path) or getattr(e, "sqlite_errorname", "") == "SQLITE_FULL":
        return StorageError(
            f"storage: the disk holding {path} is full: SQLite cannot even make the index "
            f"it reads through ({path.name}-shm); free some space and rerun the same command "
            "(the file is not damaged)")
    known = explain(e)
    if known is not None and "locked" in str(known):
        return known
    return StorageError(
        f"storage: cannot read {path}: SQLite says {e!s} "
        f"({getattr(e, 'sqlite_errorname', type(e).__name__)}); the file is not known to be "
        f"damaged: check the disk, the files beside it ({path.name}-wal, {path.name}-shm) "
        "and their permissions")


def _enable_wal(path: Path) -> None:
    """WAL lets readers (the dashboard) and the writer (the study) work at once.

    Switching a new file to WAL needs its exclusive lock. SQLite answers "locked" at once,
    without waiting out the busy timeout, where waiting could deadlock (another process on
    the new file holds a write lock while this one holds a read lock: runs starting together),
    so the switch is retried here until the same timeout has really passed."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    pause = 0.01
    while True:
        try:  # a path SQLite cannot open (/proc, /sys) fails here, as a clear error too
            conn = sqlite3.connect(str(path), timeout=SQLITE_BUSY_TIMEOUT_S)
        except sqlite3.Error as e:
            raise StorageError(f"storage: SQLite cannot open {path} ({e}); give a file on "
                               "an ordinary file system") from e
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("SQLite at %s would not enter WAL mode (%s)", path, mode)
            return
        except sqlite3.OperationalError as e:
            busy = "locked" in str(e).lower() or "busy" in str(e).lower()
            if not busy or time.monotonic() >= deadline:
                _raise_storage_error(path, e)
        except sqlite3.DatabaseError as e:
            _raise_storage_error(path, e)
        finally:
            conn.close()
        time.sleep(pause)
        pause = min(0.5, pause * 2)


def _raise_storage_error(path: Path, e: sqlite3.DatabaseError) -> NoReturn:
    known = explain(e)
    if known is not None:
        raise known from e
    raise StorageError(f"storage: {path} is not a usable SQLite database ({e})") from e


def explain(exc: BaseException) -> StorageError | None:
    """A clear StorageError for what a database said deep inside Optuna or SQLAlchemy
    (locked, disk full, read-only, damaged, unreachable), or None if it is something else."""
    import errno

    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:  # Optuna and SQLAlchemy wrap the driver's error
        seen.append(e)
        e = e.__cause__ or e.__context__
    text = " | ".join(str(x) for x in seen).lower()
    if any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in seen) or (
            "database or disk is full" in text or "no space left" in text):
        return StorageError(
            "the disk is full (no space left for the study storage or the export); free some "
            "space and rerun the same command: finished trials are kept and the study resumes"
        )
    if "database is locked" in text or "database table is locked" in text:
        return StorageError(
            f"storage: the SQLite file is locked by another process (waited "
            f"{SQLITE_BUSY_TIMEOUT_S} s); end whatever holds it (a long write transaction, an "
            "exclusive lock) and rerun: finished trials are kept and the study resumes"
        )
    if "readonly database" in text or "read-only" in text:
        return StorageError("storage: the database is read-only here; give a writable --storage")
    if "malformed" in text or "file is not a database" in text:
        return StorageError(
            "storage: the SQLite file is damaged (database disk image is malformed); autotune "
            "leaves it untouched: restore it from a backup or give another --storage path"
        )
    if "connection" in text and ("refused" in text or "failed" in text or "timeout" in text):
        first = str(seen[-1]).strip().splitlines()[0] if str(seen[-1]).strip() else ""
        return StorageError(f"storage: cannot reach the database server ({_scrub(first)})")
    return None


def _scrub(text: str) -> str:
    """Drivers may quote a connection string back: hide anything after a password key."""
    import re

    return re.sub(r"(password\s*=\s*)\S+", r"\1***", text, flags=re.IGNORECASE)


def open_storage(url: str = DEFAULT_STORAGE, *, create: bool = True,
                 read_only: bool = False) -> Any:
    """An Optuna RDBStorage for ``url``; ``create=False`` only opens existing storage;
    ``read_only`` (SQLite) opens an existing file through a connection that cannot write it,
    for the commands that only read (a read-only file or mount serves them)."""
    from sqlalchemy.exc import SQLAlchemyError

    parsed = parse_url(url)
    engine_kwargs: dict[str, Any] = {}
    path = sqlite_path(url)
    open_url = url
    if parsed.drivername.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        if not parsed.database:
            raise UserInputError(
                f"storage: {redact(url)!r} names no file; expected e.g. "
                "sqlite:///studies/autotune.db")
        if path is not None:
            check_sqlite_file(path, create=create and not read_only, writable=not read_only)
            if path.exists():
                if path.stat().st_size > 0:
                    check_integrity(path)
                check_schema(path, create=create and not read_only)
            if read_only:
                open_url = f"sqlite:///{_read_only_uri(path)}&uri=true"
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                _enable_wal(path)
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        return _rdb_storage(open_url, engine_kwargs, read_only=read_only)
    except (SQLAlchemyError, ImportError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if parsed.password:
            first = first.replace(str(parsed.password), "***")
        raise StorageError(f"storage {redact(url)}: cannot open it ({_scrub(first)})") from e


def close_storage(storage: Any) -> None:
    """Closes the database connections a storage holds; used again, it reconnects. For
    SQLite, closing the last connection checkpoints the ``-wal`` into the file and removes it:
    a Python caller's file is then whole when a run returns, as a CLI process's is when it
    exits (otherwise not until the garbage collector reaches the storage, and a copy of the
    file alone would miss the newest trials)."""
    backend = getattr(storage, "_backend", storage)  # Optuna caches an RDBStorage behind it
    engine = getattr(backend, "engine", None)
    if engine is None:  # not a database (an in-memory storage)
        return
    backend.remove_session()  # the session's connection back to the pool first
    engine.dispose()


def _head_version_once() -> None:
    """Makes Optuna read its schema's newest version once per process, not at every open.

    Every ``RDBStorage`` asks which alembic revision is Optuna's newest (to stamp a new file,
    and to check an existing one against it), and finds out by loading (compiling) each of its
    30 migration scripts: 0.2-0.3 s of CPU each time, two times for a new file. The answer is
    a fact of the installed Optuna, the same for every database: asked once, kept. Everything
    else Optuna checks (the database's own version) is still read from each database."""
    try:
        from optuna.storages._rdb.storage import _VersionManager
    except ImportError:  # pragma: no cover - another Optuna layout: it reads it each time
        return
    asked = getattr(_VersionManager, "get_head_version", None)
    if asked is None or getattr(asked, "autotune_once", False):
        return
    head: list[str] = []

    def get_head_version(self: Any) -> str:
        if not head:
            head.append(asked(self))
        return head[0]

    get_head_version.autotune_once = True  # type: ignore[attr-defined]
    _VersionManager.get_head_version = get_head_version


_SCHEMA_RACE = ("already exists", "unique constraint failed: alembic_version",
                "duplicate key value")


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], attempts: int = 6,
                 read_only: bool = False) -> Any:
    """Optuna's RDBStorage, whose first open creates the schema without a lock: two runs
    starting at once on a new database both create tables, and the loser fails ("table
    studies already exists", a duplicate alembic version). The winner's tables are whole once
    its transaction commits, so the loser opens again and finds them."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    _head_version_once()
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              skip_table_creation=read_only)
        except SQLAlchemyError as e:
            if attempt == attempts - 1 or not any(k in str(e).lower() for k in _SCHEMA_RACE):
                raise
            log.debug("schema created by another process meanwhile (%s); opening again", e)
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def study_names(storage: Any) -> list[str]:
    import optuna

    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage: Any, name: str | None) -> Any:
    """The named study; with no name, the only study there (an error if there are several)."""
    import optuna

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
