"""Host memory: the check before a run (autotune.measure.host), on real files and through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.engines import EngineConfig, engine_class
from autotune.errors import UserInputError
from autotune.measure import host
from autotune.models import get_spec
from autotune.units import GiB

MEMINFO = """MemTotal:       24684092 kB
MemFree:        22377788 kB
MemAvailable:   23709500 kB
Buffers:          123456 kB
"""


def test_mem_available_reads_meminfo(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    assert host.mem_available(path) == 23709500 * 1024
    path.write_text("MemTotal: 1 kB\n")  # kernels before 3.14 have no MemAvailable
    assert host.mem_available(path) is None
    assert host.mem_available(tmp_path / "absent") is None


def test_cgroup_room_v2_v1_and_no_limit(tmp_path: Path) -> None:
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    files = ((str(limit), str(usage)),)
    assert host.cgroup_room(files) is None  # no cgroup files: no limit
    limit.write_text("max\n")
    usage.write_text("1000\n")
    assert host.cgroup_room(files) is None
    limit.write_text(f"{16 * GiB}\n")
    usage.write_text(f"{3 * GiB}\n")
    assert host.cgroup_room(files) == 13 * GiB
    usage.write_text(f"{17 * GiB}\n")
    assert host.cgroup_room(files) == 0
    limit.write_text("9223372036854771712\n")  # cgroup v1's "unlimited"
    assert host.cgroup_room(files) is None


def test_available_bytes_on_this_host() -> None:
    available = host.available_bytes()
    if available is None:
        pytest.skip("no /proc/meminfo here")
    total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024  # MemTotal, first line
    assert 0 < available <= total


def test_check_room_refuses_warns_and_passes() -> None:
    what = "m (float16) on the native engine"
    with pytest.raises(UserInputError, match=r"4.00 GiB per worker x 2 workers = 8.00 GiB, "
                                             r"but this host has 6.00 GiB available.*fewer --gpus"):
        host.check_room(4 * GiB, 2, what, available=6 * GiB)
    with pytest.raises(UserInputError) as e:
        host.check_room(7 * GiB, 1, what, available=6 * GiB)
    assert "per worker" not in str(e.value) and "--gpus" not in str(e.value)
    warning = host.check_room(5.7 * GiB, 1, what, available=6 * GiB)
    assert warning and "5.70 GiB of the 6.00 GiB" in warning
    assert host.check_room(3 * GiB, 1, what, available=6 * GiB) is None
    assert host.check_room(0, 4, what, available=1) is None  # nothing held


def test_engines_declare_what_they_hold() -> None:
    native = EngineConfig(model="llama2-70b", engine="native", dtype="float16", device="cpu")
    weights = get_spec("llama2-70b").weight_bytes("float16")
    assert engine_class("native").host_bytes(native) == weights
    trt = EngineConfig(model="llama2-70b", engine="tensorrt", dtype="float16", device="cuda")
    assert engine_class("tensorrt").host_bytes(trt) == 2 * weights  # torch's copy + TRT's
    assert not hasattr(engine_class("landscape"), "host_bytes")  # replays, holds no weights


def _too_big_for_this_host(model: str, dtype: str) -> None:
    available = host.available_bytes()
    if available is None or available >= get_spec(model).weight_bytes(dtype):
        pytest.skip(f"this host could hold {model}: nothing to refuse")


def test_run_refuses_a_model_the_host_cannot_hold(tmp_path: Path, autotune_here) -> None:
    _too_big_for_this_host("llama2-70b", "float32")
    db = tmp_path / "studies" / "big.db"
    r = autotune_here("run", "--model", "llama2-70b", "--device", "cpu", "--dtype", "float32",
                 "--trials", "1", "--storage", f"sqlite:///{db}")
    assert r.returncode == 2, r.stderr
    assert "error: host memory: llama2-70b (float32) on the native engine keeps its weights " \
           "in host memory: 257 GiB, but this host has" in r.stderr.replace("\n", " ")
    assert "--dtype float16 (half the bytes)" in r.stderr.replace("\n", " ")
    assert not db.exists()  # refused before anything was written


def test_bench_refuses_a_model_the_host_cannot_hold(autotune_here) -> None:
    _too_big_for_this_host("llama2-70b", "float32")
    r = autotune_here("bench", "--model", "llama2-70b", "--device", "cpu", "--dtype", "float32",
                 "--batch", "1", "--budget-fraction", "0")
    assert r.returncode == 2, r.stderr
    assert "error: host memory: llama2-70b" in r.stderr
