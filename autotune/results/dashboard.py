"""``autotune dashboard``: optuna-dashboard on the study storage.

Binds to loopback unless told otherwise, and warns when it is not (the dashboard has no
authentication). Opens SQLite through :func:`autotune.storage.open_storage`, so it shares the
study's WAL mode and busy timeout and reads while a study writes: in WAL mode a reader never
waits for the writer, and a write from the dashboard (a note, a user attribute) waits up to
the busy timeout for the study's write to commit instead of failing with "database is locked".
tests/test_dashboard.py runs a study and this server together to hold that.

This module does not draw anything itself (see :mod:`autotune.results.report` for static pictures).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from autotune.errors import UserInputError
from autotune.storage import open_storage, redact

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(storage: str, host: str = "127.0.0.1", port: int = 8080,
          log: Callable[[str], None] = print) -> None:
    """Serves until interrupted; UserInputError for a bad or busy port."""
    import optuna_dashboard

    if not 0 < port < 65536:
        raise UserInputError(f"--port: expected 1..65535; got {port}")
    opened = open_storage(storage, create=False)
    if host not in _LOOPBACK:
        log(f"warning: serving on {host}: anyone who can reach this port can read and edit "
            "the studies (optuna-dashboard has no authentication)")
    log(f"optuna-dashboard for {redact(storage)} at http://{host}:{port}/ (Ctrl-C stops)")
    try:
        optuna_dashboard.run_server(opened, host=host, port=port)
    except OSError as e:
        if isinstance(e, socket.gaierror) or e.errno in (errno.EADDRINUSE, errno.EACCES,
                                                         errno.EADDRNOTAVAIL):
            raise UserInputError(
                f"cannot serve on {host}:{port} ({e.strerror}); give another --port or --host"
            ) from e
        raise
