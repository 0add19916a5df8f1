"""``autotune report``: the figures of a study made here (analytic engine, real workers)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import optuna
import pytest
from conftest import ANALYTIC
from fakes import MiB

from autotune.errors import NoCompletedTrialError
from autotune.results import report
from autotune.storage import load_study, open_storage
from autotune.tune.study import RunOptions, run_study

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A study with feasible and infeasible trials (a 1 GiB limit: large batches don't fit)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('report') / 'study.db'}"
    run_study(RunOptions(model="tiny-llama", engine=ANALYTIC, device="cpu", dtype="float32",
                         early_stop=False,
                         trials=10, isl=8, osl=4, max_batch=256, repeats=1, storage=url,
                         gpu_memory_limit=1024 * MiB, study_name="report-study",
                         # TPE tries what does not fit (autotune's sampler never proposes it).
                         sampler="tpe"))
    return url


def _study(url: str) -> optuna.Study:
    return load_study(open_storage(url, create=False), None)


def test_points_follow_the_trials(study_url: str) -> None:
    study = _study(study_url)
    pts = report.points(study)
    assert len(pts) == len(study.trials) == 10
    statuses = {p.status for p in pts}
    assert statuses == {"ok", "infeasible"}, statuses
    for p, t in zip(pts, study.trials, strict=True):
        assert p.number == t.number and p.batch == t.params["batch"]
        assert 0 <= p.budget_pct <= 100
        assert (p.throughput_tok_s is not None) == (p.status == "ok")
        assert p.peak_memory_bytes and not p.peak_measured  # CPU: the model's prediction


def test_figures_are_labelled(study_url: str) -> None:
    study = _study(study_url)
    rec = report.recommendation(study)
    figs = report.figures(study, rec)
    assert list(figs) == list(report.FIGURES)

    land = figs["landscape"].axes[0]
    assert land.get_xscale() == "log" and "log2" in land.get_xlabel()
    assert "budget" in land.get_ylabel() and "%" in land.get_ylabel()
    (below,) = figs["landscape"].legends  # the figure's, under the axes
    legend = [t.get_text().replace("\n", " ") for t in below.get_texts()]
    assert any(t.startswith("infeasible") for t in legend)
    assert any(f"#{rec['best']['trial']}" in t and "recommendation" in t for t in legend)
    colorbar = figs["landscape"].axes[1]
    assert colorbar.get_ylabel().startswith("throughput (tokens/s)")

    pareto = figs["pareto"].axes[0]
    assert "peak device memory" in pareto.get_xlabel()
    assert pareto.get_ylabel() == "throughput (tokens/s)"
    (front_line,) = [ln for ln in pareto.get_lines() if ln.get_color() == "#ff7f0e"]
    assert len(front_line.get_xdata()) >= 1

    progress = figs["progress"].axes[0]
    (best_line,) = [ln for ln in progress.get_lines() if ln.get_label().startswith("best so far")]
    ys = list(best_line.get_ydata())
    assert ys == sorted(ys) and ys[-1] == pytest.approx(rec["best"]["throughput_tok_s"])
    for fig in figs.values():
        assert fig.axes[0].get_title(loc="left")


def test_write_report_is_self_contained(study_url: str, tmp_path: Path) -> None:
    files = report.write_report(_study(study_url), tmp_path / "out")
    assert set(files.pngs) == set(report.FIGURES)
    for path in files.pngs.values():
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 20_000
    page = files.html.read_text()
    assert page.count('src="data:image/png;base64,') == len(report.FIGURES) == 4
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere
    assert "<script" not in page
    assert "report-study" in page and "Recommendation" in page and "autotune bench" in page
    assert "<b>Why:</b>" in page


def test_report_before_any_feasible_trial(tmp_path: Path) -> None:
    """Infeasible trials only: the pictures show them, and the page says there is no pick."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    study = optuna.create_study(storage=open_storage(url), study_name="nothing-fits",
                                direction="maximize")
    for batch in (64, 128):
        trial = study.ask({"batch": optuna.distributions.IntDistribution(1, 256, log=True)})
        for key, value in {"status": "infeasible", "batch": batch, "budget_bytes": 0,
                           "budget_pct": 0.0, "predicted_peak_bytes": batch * 2**30}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, 0.0)
    files = report.write_report(_study(url), tmp_path / "out")
    assert "No feasible trial yet" in files.html.read_text()
    assert all(p.read_bytes()[:8] == PNG for p in files.pngs.values())

    empty = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    optuna.create_study(storage=open_storage(empty), study_name="empty")
    with pytest.raises(NoCompletedTrialError, match="no finished trial"):
        report.write_report(_study(empty), tmp_path / "empty-out")
    assert not (tmp_path / "empty-out").exists()


def test_cli_report(study_url: str, tmp_path: Path, autotune_here) -> None:
    out = tmp_path / "cli"
    proc = autotune_here("report", "--storage", study_url, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"report written to {out / 'report.html'}" in proc.stdout.replace("\n", "")
    assert sorted(p.name for p in out.iterdir()) == [
        "bound.png", "landscape.png", "pareto.png", "progress.png", "report.html"]

    proc = autotune_here("report", "--storage", study_url, "--study", "nope", "--out",
                         str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no study named 'nope'")

    (tmp_path / "a-file").write_text("")
    proc = autotune_here("report", "--storage", study_url, "--out", str(tmp_path / "a-file"))
    assert proc.returncode == 2 and "a file is there" in proc.stderr, proc.stderr


def test_trials_over_a_latency_limit_are_drawn_apart(tmp_path: Path) -> None:
    """A trial that ran but broke a TPOT limit is neither feasible nor a failure."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from search import make_runner

    from autotune.tune.prior import Limits
    from autotune.tune.search import run_in_process

    runner, land = make_runner(str(Path(__file__).parent / "data"
                                   / "synthetic-llama2-7b-8GiB.json"))
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(),
                                direction="maximize")
    study.set_user_attr("total_device_budget", land.total_device_budget)
    for batch, fraction in ((16, 0.0), (4, 0.3)):  # streaming all: ~240 ms a step; 30% resident
        study.enqueue_trial({"batch": batch, "budget_fraction": fraction})
    run_in_process(study, runner, trials=2, max_batch=land.batches[-1], isl=land.isl,
                   osl=land.osl, total=land.total_device_budget,
                   limits=Limits(max_tpot_ms=200.0))
    over, within = report.points(study)
    assert over.measured and over.over_limit and not over.feasible
    assert within.feasible and not within.over_limit
    files = report.write_report(study, tmp_path / "out")
    assert all(p.read_bytes().startswith(PNG) for p in files.pngs.values())
