"""One measurement at a time per device on a host (autotune.measure.device_lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autotune.measure import device_lock


def test_one_measurement_at_a_time_per_device(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs timing on one device read slow and record it as the device's speed: a
    process holding the device makes another wait (said, with its pid) until it lets go;
    another device does not wait."""
    monkeypatch.setattr(device_lock, "NOTICE_S", 0.2)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom autotune.measure import device_lock\n"
         "with device_lock.exclusive('cpu'):\n    print('held', flush=True)\n"
         "    time.sleep(1.5)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with device_lock.exclusive("cuda:1"):  # another device (no NVML here: by name)
            pass
        heard: list[str] = []
        began = time.monotonic()
        with device_lock.exclusive("cpu", lambda seconds, who: heard.append(who)):
            waited = time.monotonic() - began
            assert holder.poll() is not None or waited > 0.5
        assert heard and heard[0] == f"pid {holder.pid}"
    finally:
        holder.wait(timeout=30)


def test_a_run_waits_for_the_device_and_says_so(storage_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (here the test's own thread, as one would) measures on the CPU: the
    run's hardware timing waits for it, said on the progress line with who holds the device,
    and its trials run once the device is free."""
    import threading

    from conftest import ANALYTIC

    from autotune.tune.study import RunOptions, run_study

    monkeypatch.setattr(device_lock, "NOTICE_S", 0.3)
    held, free = threading.Event(), threading.Event()

    def hold() -> None:
        with device_lock.exclusive("cpu"):
            held.set()
            free.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(10)
    steps: list[str] = []

    def step(text: str) -> None:
        steps.append(text)
        if "waiting for the device" in text:
            free.set()

    result = run_study(RunOptions(model="tiny-llama", engine=ANALYTIC, device="cpu",
                                  dtype="float32", trials=2, isl=8, osl=4, max_batch=8,
                                  storage=storage_url, repeats=1, early_stop=False),
                       on_step=step)
    waits = [s for s in steps if "waiting for the device" in s]
    assert waits and waits[0].startswith(f"cpu: waiting for the device: pid {os.getpid()} is "
                                         "measuring on it"), steps
    assert result.ran == 2


def test_a_lock_folder_others_can_write_or_a_link_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's folder could hold a link to one of our files, which opening the lock
    would then write: a folder others can write is refused, and a link is never followed."""
    from autotune.errors import UserInputError

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("AUTOTUNE_LOCK_DIR", str(shared))
    with pytest.raises(UserInputError, match="only it can write"):
        with device_lock.exclusive("cpu"):
            pass
    shared.chmod(0o700)
    precious = tmp_path / "precious"
    precious.write_text("precious data")
    (shared / "cpu.lock").symlink_to(precious)
    with pytest.raises(UserInputError, match="cannot open the device lock"):
        with device_lock.exclusive("cpu"):
            pass
    assert precious.read_text() == "precious data"
