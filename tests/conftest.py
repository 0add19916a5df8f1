"""Shared fixtures: a temporary SQLite storage and the test engines' import path.

Every test runs in a folder of its own (the working directory of the test and of the commands
it starts): a default path (studies/NAME.json, studies/autotune.db) lands there, never in the
checkout. The session fails if the checkout's studies/ changed all the same."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

# One OpenMP thread per process (inherited by the CLI and worker subprocesses): the suite runs on
# parallel workers, each with processes of its own, on 2 cores, where OpenMP's spinning threads
# oversubscribed burned about 5x the CPU of the work itself (an analytic-engine run: 56 s of CPU
# against 10 s, on a busy machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:  # workers are spawned with the parent's sys.path
    sys.path.insert(0, str(TESTS))

ANALYTIC = "fakes:AnalyticEngine"


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _studies_listing() -> set[str]:
    return {p.name for p in (ROOT / "studies").iterdir()} if (ROOT / "studies").is_dir() else set()


_STUDIES_BEFORE = _studies_listing()


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory: pytest.TempPathFactory,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def _own_device_locks(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's runs take turns on the CPU among themselves only (autotune.measure.
    device_lock): the suite's parallel workers run many studies at once on purpose, and a
    test's hanging trial would otherwise hold up every other test's. The commands a test
    starts inherit it (cli_env copies the environment after this)."""
    monkeypatch.setenv("AUTOTUNE_LOCK_DIR", str(tmp_path_factory.mktemp("locks")))


# Fixtures wider than a test start their commands before the one above: one folder a process,
# removed as it ends.
if "AUTOTUNE_LOCK_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["AUTOTUNE_LOCK_DIR"] = tempfile.mkdtemp(prefix="autotune-test-locks-")
    atexit.register(shutil.rmtree, os.environ["AUTOTUNE_LOCK_DIR"], True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    new = _studies_listing() - _STUDIES_BEFORE
    if new:  # a test wrote where a user's studies live
        print(f"\nERROR: tests wrote into {ROOT / 'studies'}: {', '.join(sorted(new))}")
        session.exitstatus = 1


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: two workers a core, up to 8. Tests wait on the processes they start
    (sleeps, timeouts, signals, servers) about 40% of their time: one worker a core left the
    2-core CI machine 40% idle (3 min 16 s against 2 min 53 s with two a core)."""
    return min(2 * len(os.sched_getaffinity(0)), 8)


_UNGROUPED = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)  # after pytest-xdist's, which names each item's group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        ungrouped = [i.nodeid for i in items
                     if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if ungrouped:  # each worker would export the double's model anew: minutes, silently
            config.stash[_UNGROUPED] = (
                f"--dist loadgroup did not group {ungrouped[0]} (pytest-xdist#1386: pytest "
                "9.2's node ids); install the test extra's pytest (< 9.2)")
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    ungrouped = item.config.stash.get(_UNGROUPED, None)
    if ungrouped and item.get_closest_marker("xdist_group"):
        pytest.fail(ungrouped, pytrace=False)


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies' / 'test.db'}"


@pytest.fixture
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for `python -m autotune` subprocesses that can load the test engines."""
    return cli_environment(tmp_path_factory)


def cli_environment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """See ``cli_env`` (for module-scoped fixtures). Their temporary files go in the test's
    temporary folders too (TMPDIR): a process killed on purpose cannot clean up after itself
    (its fork server's socket folder, pymp-*, would be left in /tmp)."""
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp_path_factory.mktemp("tmpdir"))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


@pytest.fixture
def autotune_here(monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> Any:
    """The CLI in this process, for what fails before any process or file exists (bad input):
    the same ``main`` and messages, without a new interpreter per case. Signal handlers that
    ``main`` installs are put back."""
    import signal
    import subprocess

    from autotune.cli import main

    def call(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            code = main(list(args))
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return call
