"""``autotune dashboard``: optuna-dashboard on the study storage.

Binds to loopback unless told otherwise, and warns when it is not (the dashboard has no
authentication). Opens SQLite through :func:`autotune.storage.open_storage`, so it shares the
study's WAL mode and busy timeout and reads while a study writes.
"""

from __future__ import annotations

from collections.abc import Callable

from autotune.storage import open_storage, redact

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(storage: str, host: str = "127.0.0.1", port: int = 8080,
          log: Callable[[str], None] = print) -> None:
    import optuna_dashboard

    opened = open_storage(storage, create=False)
    if host not in _LOOPBACK:
        log(f"warning: serving on {host}: anyone who can reach this port can read and edit "
            "the studies (optuna-dashboard has no authentication)")
    log(f"optuna-dashboard for {redact(storage)} at http://{host}:{port}/ (Ctrl-C stops)")
    optuna_dashboard.run_server(opened, host=host, port=port)
