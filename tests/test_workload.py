"""One study, one workload: resuming a study with another workload is refused, naming what
differs, before anything is written (the CLI via subprocess, a real SQLite file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import ANALYTIC

from autotune.errors import UserInputError
from autotune.storage import load_study, open_storage
from autotune.tune.study import RunOptions, check_total, run_study

RUN = ("run", "--model", "tiny-llama", "--device", "cpu", "--engine", ANALYTIC,
       "--max-batch", "16", "--repeats", "1", "--no-early-stop", "--study", "mix")


def _files(db: Path) -> dict[str, str]:
    """The SQLite file and its companions, byte for byte."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(db.parent.glob(db.name + "*"))}


def test_resuming_a_study_with_another_workload_is_refused(tmp_path: Path, storage_url: str,
                                                           autotune_here) -> None:
    """Issue 13: --study mix --isl 16 --osl 16, then --study mix --dtype bfloat16 --isl 128
    --osl 256 joined the first study; its JSON said isl 128 of a best measured at isl 16."""
    first = tmp_path / "first.json"
    r = autotune_here(*RUN, "--trials", "2", "--isl", "16", "--osl", "16", "--dtype", "float32",
                 "--storage",
                 storage_url, "--out", str(first))
    assert r.returncode == 0, r.stderr
    db = Path(storage_url.removeprefix("sqlite:///"))
    before = _files(db)

    second = tmp_path / "second.json"
    r = autotune_here(*RUN, "--trials", "4", "--isl", "128", "--osl", "256", "--dtype", "bfloat16",
                 "--storage", storage_url, "--out", str(second))
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    msg = lines[0]
    assert "'mix' measured another workload" in msg
    for what in ("dtype 'float32' (this run: 'bfloat16')", "isl 16 (this run: 128)",
                 "osl 16 (this run: 256)"):
        assert what in msg, msg
    assert "another --study" in msg
    assert _files(db) == before  # nothing written
    assert not second.exists()
    assert json.loads(first.read_text())["workload"]["isl"] == 16

    # The same workload resumes as before.
    r = autotune_here(*RUN, "--trials", "3", "--isl", "16", "--osl", "16", "--dtype", "float32",
                 "--storage", storage_url, "--out", str(first))
    assert r.returncode == 0, r.stderr
    assert len(load_study(open_storage(storage_url), "mix").trials) == 3


def test_every_part_of_the_workload_is_checked(storage_url: str) -> None:
    base = dict(model="tiny-llama", engine=ANALYTIC, device="cpu", trials=1, isl=8, osl=4,
                max_batch=16, storage=storage_url, dtype="float32", repeats=1,
                study_name="w", early_stop=False)
    run_study(RunOptions(**base))
    for kw, named in [
        (dict(gpu_memory_limit=2**30), "gpu_memory_limit None (this run: 1073741824)"),
        (dict(max_tpot_ms=5.0), "limits {} (this run: {'max_tpot_ms': 5.0})"),
        (dict(engine_options=(("budget_sleep_s", "0"),)), "engine options [] (this run:"),
        (dict(model="llama2-7b"), "model 'tiny-llama' (this run: 'llama2-7b')"),
        (dict(max_batch=32), "max_batch 16 (this run: 32)"),
    ]:
        with pytest.raises(UserInputError, match="measured another workload") as e:
            run_study(RunOptions(**{**base, "trials": 2, **kw}))
        assert named in str(e.value)
    assert len(load_study(open_storage(storage_url), "w").trials) == 1
    # What only changes how it is searched or timed is not another workload.
    run_study(RunOptions(**{**base, "trials": 2, "repeats": 2, "sampler": "random"}))
    assert len(load_study(open_storage(storage_url), "w").trials) == 2


def test_a_study_measured_against_other_streamable_bytes_is_refused() -> None:
    """The native engine's units changed (issue 14: the embedding and the LM head joined the
    budget): a study recorded with the older total would read its fractions as other bytes.
    run_study calls check_total once its first worker has loaded the engine."""
    import optuna

    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="t")
    study.set_user_attr("total_device_budget", 10**9)
    check_total(study, 10**9 + 4096)  # nothing measured yet: a new total is fine
    study.add_trial(optuna.trial.create_trial(value=1.0))
    check_total(study, 10**9)
    with pytest.raises(UserInputError, match="bytes of streamable weights"):
        check_total(study, 10**9 + 4096)


@pytest.mark.parametrize(("limit", "named"), [(8 * 2**30, "8GiB"), (int(7.5 * 2**30), "7.5GiB"),
                                              (600 * 2**20, "600MiB"), (None, "nolimit")])
def test_the_default_study_name_holds_the_limit_as_typed(storage_url: str, limit, named) -> None:
    from autotune.tune.study import default_study_name

    options = RunOptions(model="tiny-llama", engine=ANALYTIC, device="cpu", trials=1, isl=8,
                         osl=4, max_batch=8, storage=storage_url, dtype="float32",
                         gpu_memory_limit=limit)
    assert f"-{named}-cpu" in default_study_name(options, "cpu")
