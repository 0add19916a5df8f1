"""The CLI end to end, via subprocess, against temporary SQLite files."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ANALYTIC, cli_environment, has_cuda

from autotune.results import recommend


def autotune(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    # Never the checkout: a run without --out writes studies/<study>.json where it runs. A
    # folder of its own inside the test's (conftest: every test runs in a temporary folder).
    cwd = cwd or Path(tempfile.mkdtemp(prefix="autotune-cli-", dir=Path.cwd()))
    return subprocess.run(
        [sys.executable, "-m", "autotune", *args], env=env, cwd=cwd, capture_output=True,
        text=True, timeout=240,
    )


RUN = ("run", "--model", "tiny-llama", "--device", "cpu", "--engine", ANALYTIC, "--isl", "8",
       "--osl", "4", "--max-batch", "32", "--dtype", "float32", "--repeats", "1")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One CLI run (2 trials, the default study name, its recommendation in rec.json), shared
    by the tests that only read it or read a copy of it: each would otherwise run the same
    study."""
    folder = tmp_path_factory.mktemp("finished")
    url = f"sqlite:///{folder / 'studies' / 'test.db'}"
    out = folder / "rec.json"
    env = cli_environment(tmp_path_factory)
    r = autotune(*RUN, "--trials", "2", "--no-early-stop", "--storage", url, "--out", str(out),
                 env=env, cwd=folder)
    name = recommend.read(out)["study"]["name"] if r.returncode == 0 else None
    return {"run": r, "url": url, "db": folder / "studies" / "test.db", "out": out,
            "name": name}


def _copy_of(finished: dict, tmp_path: Path) -> str:
    """A storage URL of this test's own copy of the finished study (for tests that write)."""
    (tmp_path / "copy").mkdir()
    shutil.copy(finished["db"], tmp_path / "copy" / "test.db")
    return f"sqlite:///{tmp_path / 'copy' / 'test.db'}"


def test_run_show_export(tmp_path: Path, finished: dict, autotune_here) -> None:
    r, storage_url, out = finished["run"], finished["url"], finished["out"]
    assert r.returncode == 0, r.stderr
    assert "trial 2/2" in r.stderr and "best" in r.stderr
    assert "cpu: engine loaded in " in r.stderr and "512 MiB of streamable weights" in r.stderr
    assert "warming up and measuring" in r.stderr  # the first trial says what it does
    assert "recommendation written to" in r.stdout
    rec = recommend.read(out)
    assert rec["workload"]["model"] == "tiny-llama" and sum(rec["trials"].values()) == 2

    r = autotune_here("show", "--storage", storage_url)
    assert r.returncode == 0, r.stderr
    assert "tiny-llama" in r.stdout and "ok" in r.stdout

    out2 = tmp_path / "again.json"
    r = autotune_here("export", "--storage", storage_url, "--out", str(out2))
    assert r.returncode == 0, r.stderr
    assert recommend.read(out2)["best"] == rec["best"]

    # Without --out, export writes where run writes by default: studies/<study>.json.
    r = autotune_here("export", "--storage", storage_url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert recommend.read(tmp_path / recommend.default_path(rec["study"]["name"]))["best"] == \
        rec["best"]


def test_python_m_and_models(cli_env) -> None:
    # -X importtime's list: a command that needs no Optuna does not import it (~0.3 s a call).
    r = autotune("models", env={**cli_env, "PYTHONPROFILEIMPORTTIME": "1"})
    assert r.returncode == 0
    assert "| optuna\n" not in r.stderr and "| autotune.cli\n" in r.stderr
    for name in ("llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b", "tiny-llama"):
        assert name in r.stdout
    assert "12.55 GiB" in r.stdout  # llama2-7b fp16: 13.48 GB


def test_bench_prints_token_digest(autotune_here) -> None:
    r = autotune_here("bench", "--model", "tiny-llama", "--engine", ANALYTIC, "--batch", "2",
                 "--budget-fraction", "0.5", "--isl", "8", "--osl", "4", "--device", "cpu",
                 "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["measurement"]
    assert m["batch"] == 2 and len(m["tokens_sha256"]) == 64
    assert 0 < m["device_budget"] <= m["total_device_budget"] / 2


def test_the_reproduce_line_runs_with_the_studys_engine_options(autotune_here,
                                                                 tmp_path: Path) -> None:
    """A study's engine options are part of its speed (a compiled step, another attention):
    the recommendation's bench line carries them, and bench takes them."""
    out = tmp_path / "rec.json"
    r = autotune_here("run", "--model", "tiny-llama", "--engine", ANALYTIC, "--device", "cpu",
                      "--trials", "3", "--isl", "8", "--osl", "4", "--max-batch", "8",
                      "--engine-option", "clock=modelled", "--storage",
                      f"sqlite:///{tmp_path}/s.db", "--out", str(out))
    assert r.returncode == 0, r.stderr
    line = json.loads(out.read_text())["reproduce"]
    assert line.endswith("--engine-option clock=modelled"), line
    args = shlex.split(line)[1:]
    r = autotune_here(*args, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["measurement"]["batch"] == int(args[args.index("--batch") + 1])
    r = autotune_here(*args, "--engine-option", "warp=9")
    _error(r, "--engine-option warp", "does not take it")


def test_default_file_names_are_plain(tmp_path: Path) -> None:
    assert recommend.default_path("tiny-fakes:Engine/x").name == "tiny-fakes_Engine_x.json"


def _error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("run", "--model", "gpt-9", "--device", "cpu"), ("unknown model", "llama2-7b")),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--engine", "warp"),
         ("unknown engine", "native")),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--gpu-memory-limit", "eight"),
         ("--gpu-memory-limit", "8GiB")),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--trials", "0"), ("--trials",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--osl", "-3"), ("--osl",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--max-batch", "0"),
         ("--max-batch: expected a positive integer; got 0",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--seed", "-1"),
         ("--seed: expected an integer from 0 to 2**32 - 1; got -1",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--gpus", "0"),
         ("--gpus names GPUs, but --device is cpu",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--decode-steps", "-1"),
         ("--decode-steps", "every step")),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--storage", "nonsense"),
         ("not a database URL",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--weights", "/nonexistent"),
         ("no such directory",)),
        (("bench", "--model", "tiny-llama", "--engine", ANALYTIC, "--batch", "1", "--device",
          "cpu", "--budget", "99TiB", "--isl", "4", "--osl", "2"), ("expected 0..",)),
        (("bench", "--model", "tiny-llama", "--batch", "1", "--device", "cpu"),
         ("exactly one of",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--engine-option", "frobnicate=3"),
         ("--engine-option frobnicate", "native engine does not take it", "slots")),
        # Values too, before the model loads (a 70B load is minutes): one of each kind.
        (("run", "--model", "tiny-llama", "--device", "cpu", "--engine-option", "slots=abc"),
         ("--engine-option slots: expected an integer of 1 or more; got 'abc'",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--engine-option", "fused=maybe"),
         ("--engine-option fused: expected true or false",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--engine-option", "gemv=cutlass"),
         ("--engine-option gemv: expected cublas, triton, triton-all or cublas-halves",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--engine", "tensorrt",
          "--engine-option", "prefill_chunk=0"),
         ("--engine-option prefill_chunk: expected an integer of 1 or more; got 0",)),
        (("bench", "--model", "tiny-llama", "--batch", "1", "--device", "cpu", "--budget", "0",
          "--engine-option", "workspace_bytes=-1"),
         ("--engine-option workspace_bytes: expected an integer of 0 or more",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--study", "../../x"),
         ("--study", "file name", "'../../x'")),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--study", "n" * 300),
         ("--study", "at most 200 bytes")),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--gpu-memory-limit", "1e400"),
         ("--gpu-memory-limit", "beyond any memory")),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--trials",
          "99999999999999999999"), ("--trials: expected at most",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--trial-timeout", "nan"),
         ("--trial-timeout",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--storage", "sqlite:///"),
         ("names no file",)),
        (("run", "--model", "tiny-llama", "--device", "cpu", "--landscape", "."),
         ("--landscape .: is a directory",)),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, autotune_here, args,
                                                  needles) -> None:
    r = autotune_here(*args, cwd=tmp_path)
    _error(r, *needles)
    assert not (tmp_path / "studies").exists()  # nothing half-written


def test_non_integer_batch_is_a_usage_error(autotune_here) -> None:
    r = autotune_here("run", "--model", "tiny-llama", "--trials", "two")
    assert r.returncode == 2 and "Invalid value" in r.stderr


def test_weights_dir_that_is_not_a_checkpoint(tmp_path: Path, autotune_here) -> None:
    r = autotune_here("run", "--model", "tiny-llama", "--device", "cpu", "--weights", str(tmp_path), cwd=tmp_path)
    _error(r, "not a Hugging Face checkpoint")


@pytest.mark.skipif(has_cuda(), reason="this machine has a GPU")
def test_cuda_without_gpu(tmp_path: Path, autotune_here) -> None:
    r = autotune_here(*RUN, "--device", "cuda", cwd=tmp_path)
    _error(r, "no NVIDIA GPU", "--device cpu")
    assert not (tmp_path / "studies").exists()


def test_storage_that_is_not_sqlite_is_never_overwritten(tmp_path: Path, autotune_here) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("my precious notes\n")
    r = autotune_here(*RUN, "--storage", f"sqlite:///{bogus}")
    _error(r, "not a SQLite database")
    assert bogus.read_text() == "my precious notes\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_studies_directory(tmp_path: Path, autotune_here) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    r = autotune_here(*RUN, "--storage", f"sqlite:///{locked}/sub/a.db")
    _error(r, "not a writable directory")


def test_unwritable_studies_directory_as_a_file(tmp_path: Path, autotune_here) -> None:
    blocker = tmp_path / "studies"
    blocker.write_text("a file where the directory should be")
    r = autotune_here(*RUN, "--storage", f"sqlite:///{blocker}/a.db")
    _error(r, "not a writable directory")


def test_show_and_export_of_missing_things(tmp_path: Path, finished: dict, autotune_here) -> None:
    r = autotune_here("show", "--storage", f"sqlite:///{tmp_path}/none.db")
    _error(r, "does not exist")
    assert not (tmp_path / "none.db").exists()
    storage_url = finished["url"]  # one study, of the default name
    r = autotune_here("export", "--storage", storage_url, "--study", "s2", "--out",
                 str(tmp_path / "x.json"))
    _error(r, "no study named 's2'", finished["name"])
    assert not (tmp_path / "x.json").exists()


def test_run_and_export_with_no_completed_trial(tmp_path: Path, storage_url: str,
                                                 autotune_here) -> None:
    out = tmp_path / "rec.json"
    r = autotune_here(*RUN, "--trials", "2", "--storage", storage_url, "--engine-option",
                 "fault=error", "--out", str(out))
    _error(r, "no completed feasible trial")
    assert "trial 2/2" in r.stderr  # both trials ran and were recorded before the error
    assert not out.exists()
    r = autotune_here("export", "--storage", storage_url, "--out", str(out))
    _error(r, "no completed feasible trial")
    assert not out.exists()
    r = autotune_here(*RUN, "--engine-option", "novalue", cwd=tmp_path)
    _error(r, "KEY=VALUE")


def test_budgets_shown_are_the_ones_applied(storage_url: str, autotune_here) -> None:
    """The test engine applies budgets in whole 12.5% units, as real engines round to theirs:
    progress lines say what a budget asked for became, and the table, the best line and the
    JSON all show the applied one."""
    import re

    r = autotune_here(*RUN, "--trials", "4", "--no-early-stop", "--sampler", "random",
                 "--storage", storage_url)
    assert r.returncode == 0, r.stderr
    applied = re.findall(r"budget (\d+)% \((\d+)% applied\)", r.stderr)
    assert applied, r.stderr  # random fractions are rarely whole units
    def whole_units(pct: str) -> bool:  # 12.5% steps, printed rounded
        return min(abs(int(pct) - 12.5 * k) for k in range(9)) <= 0.5

    for asked, got in applied:
        assert int(got) <= int(asked) and whole_units(got)
    best = re.search(r"best: batch \d+, budget .* \((\d+)%\)", r.stdout)
    first_row = re.search(r"│\s+\d+\s+│\s+\d+\s+│\s+(\d+)% ", r.stdout)
    assert best and first_row, r.stdout
    assert best.group(1) == first_row.group(1)
    assert whole_units(best.group(1))


def test_auto_max_batch_follows_the_kv_cache() -> None:
    from autotune.engines.memory import auto_max_batch
    from autotune.models import get_spec
    from autotune.units import GiB

    # llama2-7b at 8 GiB: 42 sequences of 384 tokens would fill it; the floor stands.
    assert auto_max_batch(get_spec("llama2-7b"), "float16", 384, 8 * GiB) == 256
    # llama3-8b (8 KV heads: 48 MiB a sequence) on a 24 GiB card: 512 sequences.
    assert auto_max_batch(get_spec("llama3-8b"), "float16", 384, 24 * GiB) == 512
    assert auto_max_batch(get_spec("llama3-8b"), "float16", 384, 80 * GiB) == 1706
    assert auto_max_batch(get_spec("llama3-8b"), "float16", 128, 80 * GiB) == 2048  # the cap


@pytest.mark.skipif(has_cuda(), reason="needs a machine without a GPU")
def test_gpus_without_a_gpu_never_fall_back_to_the_cpu(tmp_path: Path, autotune_here) -> None:
    r = autotune_here("run", "--model", "tiny-llama", "--gpus", "0", "--trials", "1",
                 cwd=tmp_path)
    _error(r, "no NVIDIA GPU is usable here")
    assert not (tmp_path / "studies").exists()


def test_outputs_that_cannot_be_written_are_one_line(tmp_path: Path, finished: dict,
                                                     autotune_here) -> None:
    storage_url = finished["url"]
    r = autotune_here("export", "--storage", storage_url, "--out", str(tmp_path))
    _error(r, "is a directory; give a file name")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = autotune_here("export", "--storage", storage_url, "--out", str(blocker / "rec.json"))
    _error(r, f"cannot write {blocker / 'rec.json'}")
    r = autotune_here("report", "--storage", storage_url, "--out", str(blocker))
    _error(r, f"--out {blocker}: a file is there")
    assert blocker.read_text() == "not a folder"  # untouched


def test_inputs_that_are_the_wrong_kind_of_thing(tmp_path: Path, autotune_here) -> None:
    """A file where a folder is wanted, a dangling link, a malformed landscape: each one line,
    saying what it is."""
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"not a folder")
    r = autotune_here("run", "--model", "tiny-llama", "--device", "cpu", "--weights", str(a_file), cwd=tmp_path)
    _error(r, "is a file; give the checkpoint's folder")
    (tmp_path / "studies").symlink_to(tmp_path / "gone")
    r = autotune_here(*RUN, cwd=tmp_path)
    _error(r, "symbolic link to nothing")
    (tmp_path / "studies").unlink()
    landscape = tmp_path / "l.json"
    landscape.write_text(json.dumps({
        "schema_version": 1, "kind": "autotune.landscape", "workload": "tiny-llama",
        "total_device_budget": 1, "batches": [1], "budget_fractions": [0.0], "points": []}))
    r = autotune_here("run", "--landscape", str(landscape), cwd=tmp_path)
    _error(r, "workload must be a JSON object; got str")
    assert not (tmp_path / "studies").exists()


def test_an_unwritable_out_is_refused_before_the_first_trial(tmp_path: Path, autotune_here) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker / "rec.json", tmp_path / ("x" * 250 + ".json")):
        r = autotune_here(*RUN, "--out", str(out), cwd=tmp_path)
        _error(r, str(out.name)[:20])
        assert "trial" not in r.stderr  # refused before any
        assert not (tmp_path / "studies").exists()  # nothing written


def test_a_refused_run_leaves_no_empty_study(tmp_path: Path, finished: dict, autotune_here) -> None:
    storage_url = _copy_of(finished, tmp_path)  # one study; this test writes
    r = autotune_here(*RUN, "--storage", storage_url, "--study", "s2", "--engine-option",
                 "fault_at_load=1")
    _error(r, "could not load the engine")
    r = autotune_here("show", "--storage", storage_url)  # still the only one
    assert r.returncode == 0 and finished["name"] in r.stdout, r.stderr


def test_dashboard_on_a_host_that_does_not_exist(finished: dict, autotune_here) -> None:
    r = autotune_here("dashboard", "--storage", finished["url"], "--host", "999.1.1.1", "--port",
                 "18089")
    _error(r, "cannot serve on 999.1.1.1")


def test_no_feasible_trial_names_the_limit_that_was_set(storage_url: str, autotune_here) -> None:
    r = autotune_here(*RUN, "--trials", "6", "--storage", storage_url, "--max-tpot-ms", "0.001")
    _error(r, "no completed feasible trial", "--max-tpot-ms 0.001")
    error = "\n".join(line for line in r.stderr.splitlines() if line.startswith("error: "))
    assert "memory limit" not in error and "--gpu-memory-limit" not in error
    # One trial showed what the bounds said: the rest of the budget is not spent.
    assert "stopped after 1 trials: no configuration that fits can meet" in r.stdout + r.stderr
    assert "its trials: 1 ok" in r.stderr


def test_version_show_json_and_help(finished: dict, autotune_here) -> None:
    from autotune import __version__

    r = autotune_here("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"autotune {__version__}"
    assert finished["run"].returncode == 0, finished["run"].stderr  # 2 trials, --no-early-stop
    r = autotune_here("show", "--storage", finished["url"], "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["autotune_version"] == __version__
    assert [t["number"] for t in shown["trials"]] == [0, 1]
    assert all(t["state"] == "COMPLETE" and "batch" in t["attrs"] for t in shown["trials"])
    import typer.main

    from autotune.cli import app

    for command in typer.main.get_command(app).commands.values():
        for param in command.params:
            assert getattr(param, "help", None), f"{command.name} --{param.name} has no help"


def test_bench_out_of_host_memory_is_one_line(cli_env) -> None:
    """Issue 19: under `ulimit -v` the CPU allocator's failure was a traceback."""
    import resource

    def limit() -> None:  # address space: room for Python and torch, not for this batch
        resource.setrlimit(resource.RLIMIT_AS, (1_400_000 * 1024, 1_400_000 * 1024))

    r = subprocess.run([sys.executable, "-m", "autotune", "bench", "--model", "tiny-llama",
                        "--batch", "20000", "--budget-fraction", "0", "--device", "cpu",
                        "--isl", "8", "--osl", "4", "--repeats", "1", "--warmup", "0"],
                       env=cli_env, capture_output=True, text=True, timeout=240,
                       preexec_fn=limit)
    if "DefaultCPUAllocator" not in r.stderr:  # it failed before allocating the batch
        pytest.skip(f"this torch build does not start within 1.4 GB of address space: "
                    f"{r.stderr[-200:]}")
    _error(r, "error: batch 20000 ran out of memory", "lower --batch")
