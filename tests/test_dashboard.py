"""The dashboard: SQLite settings, a study and the dashboard server at once, and a real browser.

The concurrency test runs ``autotune run`` (with its worker subprocess) and ``autotune
dashboard`` as two processes on one SQLite file and polls optuna-dashboard's JSON API while
trials are written: neither side may fail ("database is locked" is optuna-dashboard's known
failure on SQLite). The browser test opens the served dashboard in headless Chromium (Debian's
``chromium``; .ci/run installs it) and keeps a screenshot in its temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ANALYTIC

from autotune.storage import SQLITE_BUSY_TIMEOUT_S, open_storage
from autotune.tune.study import RunOptions, run_study


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 10.0) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read())


@contextlib.contextmanager
def _dashboard(storage_url: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """``autotune dashboard`` on loopback; yields its base URL once /api/studies answers."""
    port = _free_port()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "autotune", "dashboard", "--storage", storage_url,
             "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"dashboard exited: {log.read_text()}"
            try:
                _get_json(base + "/api/studies", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, f"dashboard never answered: {log.read_text()}"
                time.sleep(0.2)
        yield base
        assert proc.poll() is None, f"dashboard died: {log.read_text()}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_sqlite_storage_has_wal_and_busy_timeout(storage_url: str) -> None:
    storage = open_storage(storage_url)
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1000 * SQLITE_BUSY_TIMEOUT_S


def test_reads_and_writes_wait_for_a_concurrent_writer(storage_url: str) -> None:
    """While another connection holds the write lock, a read answers at once (WAL) and a
    write waits for the lock (busy timeout) instead of failing with "database is locked"."""
    import optuna

    storage = open_storage(storage_url)
    optuna.create_study(storage=storage, study_name="held")
    holder = sqlite3.connect(storage_url.removeprefix("sqlite:///"), isolation_level=None,
                             check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE studies SET study_name = study_name")
    release = threading.Timer(1.0, holder.execute, args=("COMMIT",))
    release.start()
    try:
        start = time.perf_counter()
        assert [s.study_name for s in storage.get_all_studies()] == ["held"]
        assert time.perf_counter() - start < 0.5  # the reader did not wait for the writer
        optuna.create_study(storage=storage, study_name="written")  # waits ~1 s, then writes
        assert time.perf_counter() - start >= 0.8
    finally:
        release.join()
        holder.close()
    assert len(storage.get_all_studies()) == 2


def test_dashboard_serves_while_a_study_writes(tmp_path: Path, storage_url: str,
                                               cli_env: dict[str, str]) -> None:
    # Enough for polls to overlap the writes (each trial is a few writes), and trials slowed
    # (a sleep, no CPU) past optuna-dashboard's 2 s cache of a study's trials: 15 analytic
    # trials alone took 1.5 s, and the dashboard showed 0 then 15.
    trials = 15
    open_storage(storage_url)  # tables exist before either process starts
    with _dashboard(storage_url, cli_env, tmp_path / "dashboard.log") as base:
        run_log = tmp_path / "run.log"
        with open(run_log, "wb") as f:
            run = subprocess.Popen(
                [sys.executable, "-m", "autotune", "run", "--model", "tiny-llama", "--engine",
                 ANALYTIC, "--device", "cpu", "--dtype", "float32", "--trials", str(trials),
                 "--no-early-stop", "--isl", "8", "--osl", "4", "--repeats", "1", "--max-batch", "64",
                 "--engine-option", "budget_sleep_s=0.3", "--storage", storage_url,
                 "--study", "concurrent",
                 "--out", str(tmp_path / "rec.json")],
                stdout=f, stderr=subprocess.STDOUT, env=cli_env)
        seen: set[int] = set()  # trial counts the dashboard reported mid-run
        polls = 0
        deadline = time.monotonic() + 90
        while run.poll() is None and time.monotonic() < deadline:
            status, body = _get_json(base + "/api/studies")
            assert status == 200
            polls += 1
            for s in body["study_summaries"]:
                status, detail = _get_json(f"{base}/api/studies/{s['study_id']}?after=0")
                assert status == 200
                seen.add(len(detail["trials"]))
                polls += 1
            time.sleep(0.05)  # a browser polls too; leave the 2 cores to the study's writes
        assert run.wait(timeout=30) == 0, run_log.read_text()
        status, body = _get_json(base + "/api/studies")
        (summary,) = body["study_summaries"]
        assert summary["study_name"] == "concurrent"
        # optuna-dashboard caches a study's trials for 2 s (under 100 trials): the last ones,
        # and the last one's final state, show up within that time after the run ends.
        deadline = time.monotonic() + 10
        while True:
            _, detail = _get_json(f"{base}/api/studies/{summary['study_id']}")
            done = {t["state"] for t in detail["trials"]} == {"Complete"}
            if (len(detail["trials"]) == trials and done) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(detail["trials"]) == trials
        assert {t["state"] for t in detail["trials"]} == {"Complete"}
        # Each streaming trial's fraction of its bound is a user attribute the dashboard shows.
        attrs = [{a["key"] for a in t["user_attrs"]} for t in detail["trials"]]
        assert any("bound_fraction" in keys for keys in attrs)
    assert any(0 < n < trials for n in seen), f"no poll overlapped the writes: {sorted(seen)}"
    assert polls > 10
    for log in (run_log, tmp_path / "dashboard.log"):
        text = log.read_text()
        assert "database is locked" not in text and "Traceback" not in text, text


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
         "--window-size=1280,900", "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install "
                    "chromium; .ci/run installs it): headless browser test of the dashboard")
def test_browser_shows_the_study_and_its_trials(tmp_path: Path, storage_url: str,
                                                cli_env: dict[str, str]) -> None:
    browser = _chromium()
    assert browser is not None
    name = "browser-study"
    run_study(RunOptions(model="tiny-llama", engine=ANALYTIC, device="cpu", dtype="float32",
                         early_stop=False,
                         trials=5, isl=8, osl=4, max_batch=32, repeats=1, storage=storage_url,
                         study_name=name))
    with _dashboard(storage_url, cli_env, tmp_path / "dashboard.log") as base:
        _, body = _get_json(base + "/api/studies")
        study_id = next(s["study_id"] for s in body["study_summaries"] if s["study_name"] == name)
        listing = _headless(browser, tmp_path / "p1", "--dump-dom", f"{base}/dashboard")
        assert name in listing.stdout, listing.stderr[-2000:]
        trials = _headless(browser, tmp_path / "p2", "--dump-dom",
                           f"{base}/dashboard/studies/{study_id}/trials")
        for n in range(5):
            assert f"Trial {n}" in trials.stdout, trials.stderr[-2000:]
        shot = tmp_path / "dashboard-study.png"  # kept in pytest's temporary folders
        page = _headless(browser, tmp_path / "p3", f"--screenshot={shot}",
                         f"{base}/dashboard/studies/{study_id}")
        assert shot.exists(), page.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        overview = _headless(browser, tmp_path / "p4", "--dump-dom",
                             f"{base}/dashboard/studies/{study_id}")
        assert f"{name} (id={study_id})" in overview.stdout
        assert "throughput_tok_s" in overview.stdout  # the metric name, on the history plot
