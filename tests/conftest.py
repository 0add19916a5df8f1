"""Shared fixtures: a temporary SQLite storage and the test engines' import path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def storage_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies' / 'test.db'}"


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `python -m autotune` subprocesses that can load the test engines."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env
