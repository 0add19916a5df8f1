"""The first minute: the README's first command on a machine without a GPU (the demo, a
replay of an H100 landscape through the real study, labelled on every line), the help and
tables it shows, and what a long wait says (never silent)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ANALYTIC, ROOT
from rich.console import Console

from autotune import demo
from autotune.engines import EngineConfig
from autotune.measure import worker as worker_mod
from autotune.measure.trial import TrialRequest
from autotune.models import PRESETS


def test_the_demo_replays_a_gpu_landscape_and_shows_both_axes(tmp_path: Path, cli_env) -> None:
    """The README's `autotune run` without a GPU: every line says it is a replay; the trials
    move along both axes to the best inside the space (batch 32 at 30%: the 180 ms TPOT limit
    rules out the larger batches' smaller budgets), and the memory plan's edge is interior."""
    r = subprocess.run([sys.executable, "-m", "autotune", "run"], capture_output=True, text=True, env=cli_env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in (r.stderr + r.stdout).splitlines()
             if line.strip() and not set(line.strip()) <= set("━┏┓┗┛┃┡┩╇┳└┘┴─")]
    assert lines[0].startswith("[replay] llama2-7b on NVIDIA H100") and "not this machine" in lines[0]
    unlabelled = [line for line in lines if "[replay]" not in line
                  and not line.startswith(("┃", "┡", "┏", "└"))]  # table rules and header
    assert not unlabelled, unlabelled
    rec = json.loads(next((tmp_path / "studies").glob("*.json")).read_text())
    assert (rec["best"]["batch"], rec["best"]["budget_fraction"]) == (32, 0.3)
    show = subprocess.run([sys.executable, "-m", "autotune", "show", "--json", "--storage",
                           f"sqlite:///{tmp_path / 'studies' / 'autotune.db'}"], capture_output=True, text=True,
                          env=cli_env, timeout=120)
    study = json.loads(show.stdout)
    tried = {(t["params"]["batch"], round(t["params"]["budget_fraction"], 1))
             for t in study["trials"]}
    assert len({b for b, _ in tried}) > 1 and len({f for _, f in tried}) > 1, tried
    edge = rec["memory_edge"]["max_batch"]  # at every 10% of the budget
    assert edge[0] == max(edge) and 0 in edge and any(0 < b < max(edge) for b in edge), edge


def test_the_packaged_demo_landscape_is_the_recorded_one() -> None:
    recorded = ROOT / "benchmarks" / "landscapes" / demo.LANDSCAPE.name
    assert demo.LANDSCAPE.read_bytes() == recorded.read_bytes()


def _help(*args: str) -> str:
    from typer.testing import CliRunner

    from autotune.cli import app

    r = CliRunner().invoke(app, [*args, "--help"], terminal_width=100)
    assert r.exit_code == 0, r.output
    return r.output


def test_help_shows_no_type_on_flags_and_defaults_as_they_are() -> None:
    top, run = _help(), _help("run")
    assert "<bool>" not in top + run and "--version" in top
    assert "[default: auto]" in run.split("--dtype")[1].split("--seed")[0]


def test_the_models_table_fits_80_columns() -> None:
    from autotune.cli import _models_table

    console = Console(file=io.StringIO(), width=80, record=True)
    console.print(_models_table())
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text and "grouped-query" in text
    assert len([line for line in text.splitlines() if line.startswith("│")]) == len(PRESETS)  # a row each


def test_a_long_trial_says_what_it_waits_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every NOTICE_S of a wait, the parent hears what the worker is doing (here: a budget
    change that takes 1.5 s, then the warm-up and timed runs)."""
    monkeypatch.setattr(worker_mod, "NOTICE_S", 0.3)
    config = EngineConfig(model="tiny-llama", engine=ANALYTIC, dtype="float32", device="cpu",
                          max_batch=8, max_seq_len=12, options=(("budget_sleep_s", "1.5"),))
    heard: list[tuple[float, str]] = []
    with worker_mod.Worker(config) as w:
        w.on_wait = lambda seconds, what: heard.append((seconds, what))
        w.start()
        outcome = w.run(TrialRequest(batch=2, budget=0, isl=8, osl=4, repeats=1))
    assert outcome.status == "ok", outcome.reason
    assert any(what == "measuring: changing the budget" for _, what in heard), heard
    assert all(b[0] > a[0] for a, b in zip(heard, heard[1:], strict=False))
