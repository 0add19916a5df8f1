"""Nothing lost, nothing mixed (issue 19): no command writes over what it reads, and a run
refuses storage and studies that autotune did not make, before writing anything.

The CLI runs in this process (:func:`cli`) where the subprocess is not the point; the storage
is always a real SQLite file."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import ANALYTIC

from autotune.storage import load_study, open_storage
from autotune.tune.study import RunOptions, run_study

DATA = Path(__file__).parent / "data"
SYNTHETIC = DATA / "synthetic-llama2-7b-8GiB.json"
# A checkpoint's config.json, as tiny-llama's shape (the weights are read only by a worker).
TINY_CONFIG = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 512, "max_position_embeddings": 256}
RUN = ("run", "--model", "tiny-llama", "--device", "cpu", "--engine", ANALYTIC, "--isl", "8",
       "--osl", "4", "--max-batch", "32", "--dtype", "float32", "--repeats", "1")


def refused(result: subprocess.CompletedProcess, *needles: str) -> None:
    """One ``error:`` line naming every needle, exit 2, no traceback (``autotune_here``'s
    result: the CLI in this process)."""
    code, out, err = result.returncode, result.stdout, result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines and lines[-1].startswith("error: "), (code, out, err)
    assert "Traceback" not in err and sum(x.startswith("error: ") for x in lines) == 1, err
    for needle in needles:
        assert needle in err, err


def digest(*paths: Path) -> dict[str, str | None]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
            for p in paths}


def _options(url: str, **kw) -> RunOptions:
    base = dict(model="tiny-llama", engine=ANALYTIC, device="cpu", trials=2, isl=8, osl=4,
                max_batch=32, storage=url, dtype="float32", repeats=1, warmup=0,
                early_stop=False, confirm=False)
    return RunOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file holding one finished study, checkpointed (copied alone, it is whole)."""
    db = tmp_path_factory.mktemp("finished") / "victim.db"
    run_study(_options(f"sqlite:///{db}", study_name="s", sampler="random"))  # no calibration
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


@pytest.fixture
def victim(tmp_path: Path, finished: Path) -> Path:
    db = tmp_path / "victim.db"
    shutil.copy(finished, db)
    return db


# ------------------------------------------------------------------------------------------
# No command writes over its own inputs


def test_export_never_writes_over_its_storage(autotune_here, tmp_path: Path, victim: Path) -> None:
    url = f"sqlite:///{victim}"
    before = digest(victim)
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    for args in (("--out", str(victim)), ("--out", str(link)), ("--landscape", str(victim)),
                 ("--out", f"{victim}-wal")):
        refused(autotune_here("export", "--storage", url, *args), "the study storage",
                "which this command reads")
        assert digest(victim) == before
    assert len(load_study(open_storage(url, create=False), "s").trials) == 2


def test_export_refuses_two_outputs_that_are_one_file(autotune_here, tmp_path: Path,
                                                       victim: Path) -> None:
    both = tmp_path / "both.json"
    refused(autotune_here("export", "--storage", f"sqlite:///{victim}", "--out", str(both),
                "--landscape", str(both)), "name one file")
    assert not both.exists()


def test_run_never_writes_over_its_storage_or_landscape(autotune_here, tmp_path: Path, victim: Path,
                                                         monkeypatch) -> None:
    before = digest(victim)
    refused(autotune_here(*RUN, "--storage", f"sqlite:///{victim}", "--study", "s", "--out",
                str(victim)), "--out", "the study storage")
    assert digest(victim) == before
    # With no --out, the default export path is checked too: here, the storage itself.
    monkeypatch.chdir(tmp_path)
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(victim, studies / "s.json")
    refused(autotune_here(*RUN, "--storage", f"sqlite:///{studies / 's.json'}", "--study", "s"),
            "the study storage")
    landscape = tmp_path / "l.json"
    shutil.copy(SYNTHETIC, landscape)
    before = digest(landscape)
    refused(autotune_here("run", "--landscape", str(landscape), "--trials", "2", "--storage",
                f"sqlite:///{tmp_path / 'new.db'}", "--out", str(landscape)), "the landscape")
    assert digest(landscape) == before
    assert not (tmp_path / "new.db").exists()  # refused before the storage was made


def test_export_never_writes_over_the_landscape_its_study_replays(autotune_here,
                                                                    tmp_path: Path) -> None:
    landscape = tmp_path / "l.json"
    shutil.copy(SYNTHETIC, landscape)
    url = f"sqlite:///{tmp_path / 'l.db'}"
    r = autotune_here("run", "--landscape", str(landscape), "--trials", "2", "--storage", url,
                      "--out", str(tmp_path / "rec.json"))
    assert r.returncode == 0, r.stderr
    before = digest(landscape)
    refused(autotune_here("export", "--storage", url, "--landscape", str(landscape)),
            "--landscape", "is the landscape")
    assert digest(landscape) == before


def test_run_never_writes_into_its_checkpoint(autotune_here, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(TINY_CONFIG))
    run = [a if a != "tiny-llama" else "mine" for a in RUN]  # a checkpoint is no preset
    refused(autotune_here(*run, "--weights", str(ckpt), "--out", str(ckpt / "config.json")),
            "lies in the checkpoint folder")


def test_report_never_writes_over_its_storage(autotune_here, tmp_path: Path, finished: Path) -> None:
    folder = tmp_path / "rep"
    folder.mkdir()
    db = folder / "report.html"
    shutil.copy(finished, db)
    before = digest(db)
    refused(autotune_here("report", "--storage", f"sqlite:///{db}", "--out", str(folder)),
            "the study storage")
    assert digest(db) == before


# ------------------------------------------------------------------------------------------
# What autotune did not make is refused before anything is written


def _foreign(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")


def test_another_applications_database_is_refused_even_by_the_dashboard(
        autotune_here, tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    _foreign(db)
    before = digest(db)
    for args in (RUN, ("dashboard", "--port", "18123"), ("show",)):
        refused(autotune_here(*args, "--storage", f"sqlite:///{db}"),
                "another application's SQLite database (tables: users)")
        assert digest(db) == before  # no table added, the journal mode as it was
    assert set(p.name for p in tmp_path.iterdir()) <= {"app.db", "app.db-shm", "app.db-wal"}


@pytest.mark.parametrize("kind", ["empty file", "no tables", "trials dropped"])
def test_an_empty_or_incomplete_database(autotune_here, tmp_path: Path, victim: Path,
                                         kind: str) -> None:
    db = victim
    if kind == "empty file":
        db.write_bytes(b"")
    elif kind == "no tables":
        db.unlink()
        sqlite3.connect(db).close()
        with sqlite3.connect(db) as conn:  # a database, with nothing in it
            conn.execute("PRAGMA user_version = 1")
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TABLE trials")
    before = digest(db)
    url = f"sqlite:///{db}"
    needle = "tables missing (trials)" if kind == "trials dropped" else "holds no study"
    for args in (("show",), ("export", "--out", str(tmp_path / "r.json")),
                 ("report", "--out", str(tmp_path / "rep"))):
        refused(autotune_here(*args, "--storage", url), needle)
    assert digest(db) == before and not (tmp_path / "r.json").exists()
    if kind == "trials dropped":  # a run would make the table again and mix old attributes
        refused(autotune_here(*RUN, "--storage", url, "--out", str(tmp_path / "r.json")),
                needle, "untouched")
        assert digest(db) == before
    else:  # nothing in it to lose: a run may fill it
        assert open_storage(url) is not None


def test_a_study_plain_optuna_made_is_refused(storage_url: str) -> None:
    import optuna

    from autotune.errors import UserInputError
    from autotune.tune import study as study_mod

    plain = optuna.create_study(storage=open_storage(storage_url), study_name="plain",
                                direction="maximize")
    plain.enqueue_trial({"x": 1.0})
    plain.optimize(lambda t: t.suggest_float("x", 0, 2), n_trials=1)
    db = Path(storage_url.removeprefix("sqlite:///"))
    before = digest(db)
    with pytest.raises(UserInputError, match="'plain' was not made by autotune.*1 trials"):
        run_study(_options(storage_url, study_name="plain"))
    assert digest(db) == before
    optuna.create_study(storage=open_storage(storage_url), study_name="bare")
    study_mod.WORKLOAD_WAIT_S, wait = 0.2, study_mod.WORKLOAD_WAIT_S
    try:
        with pytest.raises(UserInputError, match="'bare' was not made by autotune"):
            run_study(_options(storage_url, study_name="bare"))
    finally:
        study_mod.WORKLOAD_WAIT_S = wait


_CREATE_AT = """
import sys
from test_own_inputs import _options
from autotune.errors import UserInputError
from autotune.tune.study import create_or_load
options = _options(sys.argv[1], study_name="mixrace", isl=int(sys.argv[2]))
print("ready", flush=True)
sys.stdin.readline()  # both at once
try:
    create_or_load(options, "cpu")
    print("created or resumed")
except UserInputError as e:
    print("refused:", e)
"""


def test_two_runs_creating_one_study_with_two_workloads(storage_url: str, cli_env) -> None:
    """Issue 19: started together on a new study, an isl-16 and an isl-8 run both measured
    into it. The workload is the study's first record, and the other run compares with it."""
    import sys

    open_storage(storage_url)  # the schema: the race is the study's, not the tables'
    procs = [subprocess.Popen([sys.executable, "-c", _CREATE_AT, storage_url, isl],
                              env=cli_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for isl in ("8", "4")]
    # A barrier, not a clock: both have imported autotune before either is let go.
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.communicate()[1]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    said = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert said[0] == "created or resumed", said
    assert said[1].startswith("refused: study 'mixrace' measured another workload: isl"), said
