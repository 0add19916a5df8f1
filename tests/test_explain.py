"""Why the best is the best: each kind of explanation against a landscape whose answer is known.

Every study here is ``autotune run --landscape`` as a user runs it (run_study, a real worker,
real SQLite): the landscape engine replays a recording, so what limits its optimum can be read
from the landscape file itself, and each sentence is checked against that, not against the
explainer's own arithmetic. The report's figures are checked on the same studies: the model's
surface, the memory edge and the limits' exclusion drawn behind the trials, and the bound panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest
from conftest import ROOT

from autotune.landscape import read
from autotune.results import recommend, report
from autotune.storage import load_study, open_storage
from autotune.tune.prior import Limits
from autotune.tune.study import RunOptions, run_study
from autotune.units import GiB

H100_8GIB = ROOT / "benchmarks" / "landscapes" / "llama2-7b-8GiB-isl128-osl8-h100.json"
SYNTHETIC = ROOT / "tests" / "data" / "synthetic-llama2-7b-8GiB.json"


def replay_options(url: str, path: Path, name: str, **options: object) -> RunOptions:
    """What ``autotune run --landscape PATH`` into ``url`` runs."""
    land = read(path)
    options.setdefault("max_batch", land.batches[-1])
    return RunOptions(model=land.workload["model"], engine="landscape",
                      engine_options=(("landscape", str(path)),), device="cpu",
                      dtype=land.workload.get("dtype", "float16"), isl=land.isl,
                      osl=land.osl, repeats=1, storage=url, study_name=name,
                      **options)  # type: ignore[arg-type]


def replay(url: str, path: Path, name: str, **options: object) -> optuna.Study:
    """``autotune run --landscape PATH`` into ``url``; the stored study."""
    run_study(replay_options(url, path, name, **options))
    return load_study(open_storage(url, create=False), name)


def made_as_a_run_makes_it(url: str, path: Path, name: str, **options: object) -> optuna.Study:
    """The study ``replay`` will run into, made first (to enqueue trials into it) as a run
    makes it: autotune refuses studies it did not make."""
    from autotune.tune.study import create_or_load, resolve_gpu_name

    run = replay_options(url, path, name, **options)
    study, _ = create_or_load(run, resolve_gpu_name(run))
    return study


def grid(path: Path) -> dict[tuple[int, float], dict]:
    data = json.loads(path.read_text())
    return {(p["batch"], p["budget_fraction"]): p for p in data["points"]}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('explain') / 'studies.db'}"


@pytest.fixture(scope="module")
def memory_study(url: str) -> optuna.Study:
    return replay(url, H100_8GIB, "memory", gpu_memory_limit=8 * GiB)  # as recorded


@pytest.fixture(scope="module")
def latency_study(url: str) -> optuna.Study:
    return replay(url, H100_8GIB, "latency", max_tpot_ms=150.0)


def test_memory_bound_on_the_h100_landscape(memory_study: optuna.Study) -> None:
    """At 8 GiB the H100 recording's best is batch 64 with 10% resident, and there neither
    batch 96 nor 20% resident fits: the memory edge. The sentence says so, with the link's
    fraction and the sequences per GiB the recording's own memory plans give."""
    land, points = read(H100_8GIB), grid(H100_8GIB)
    rec = recommend.build(memory_study)
    why, best = rec["explanation"], rec["best"]
    answer = land.best()
    assert (best["batch"], best["budget_fraction"]) == (answer.batch, pytest.approx(0.1, abs=0.01))
    assert points[(96, 0.1)]["status"] == "infeasible" == points[(64, 0.2)]["status"]
    assert why["kind"] == "memory"
    assert why["text"].startswith("memory-bound at batch 64 with 10% of the weights resident: "
                                  "neither a larger batch nor more resident weights fit in the "
                                  "7.75 GiB available (--gpu-memory-limit 8GiB less a margin)")
    # The fraction of the link: the recorded step against streamed bytes / the recorded link.
    p = points[(64, 0.1)]
    link = p["streamed_bytes_per_step"] / (land.calibration["h2d_gb_s"] * 1e9)
    assert best["bound_fraction"] == pytest.approx(link / (p["tpot_ms"] / 1e3), abs=1e-3)
    assert best["bound_by"] == "link"
    front = rec["pareto_front"]  # each configuration of the trade-off carries its own
    assert front and all(c["bound_fraction"] == next(
        t.user_attrs["bound_fraction"] for t in memory_study.trials if t.number == c["trial"])
        for c in front)
    assert f"at {100 * best['bound_fraction']:.0f}% of the link (53.8 GB/s" in why["text"]
    # One GiB more: the recorded plans' cost of a sequence at 10% resident, between 32 and 64.
    per_sequence = (points[(64, 0.1)]["predicted_peak_bytes"]
                    - points[(32, 0.1)]["predicted_peak_bytes"]) / 32
    assert why["sequences_per_gib"] == pytest.approx(GiB / per_sequence, rel=0.02)
    assert f"Each extra GiB buys about {why['sequences_per_gib']:.0f} sequences" in why["text"]
    # ...and what they would do, from the model: the recording's own slope at 10% says alike.
    measured = (points[(64, 0.1)]["throughput_tok_s"] - points[(32, 0.1)]["throughput_tok_s"]) / 32
    assert why["tok_s_per_gib"] == pytest.approx(measured * why["sequences_per_gib"], rel=0.2)
    assert "(from the model)" in why["text"]


def test_latency_bound_by_tpot_on_the_h100_landscape(latency_study: optuna.Study) -> None:
    """With --max-tpot-ms 150 the recording needs 40% resident (30% streams too much for
    150 ms a step at any batch); the sentence names the limit, the bytes it allows and the
    share that must stay resident, between the grid's 30% and 40%."""
    land, points = read(H100_8GIB), grid(H100_8GIB)
    rec = recommend.build(latency_study)
    why, best = rec["explanation"], rec["best"]
    answer = land.best(Limits(max_tpot_ms=150.0))
    assert best["batch"] == answer.batch and best["budget_fraction"] == pytest.approx(
        answer.budget_fraction, abs=0.011)
    assert all(p["tpot_ms"] > 150 for (b, f), p in points.items() if f == 0.3
               and p["status"] == "ok")
    assert any(p["tpot_ms"] <= 150 for (b, f), p in points.items() if f == 0.4
               and p["status"] == "ok")
    assert why["kind"] == "latency" and why["limit"] == "--max-tpot-ms 150"
    assert 0.3 < why["min_resident_fraction"] <= 0.4
    assert (points[(1, 0.4)]["streamed_bytes_per_step"] <= why["max_streamed_bytes"]
            < points[(1, 0.3)]["streamed_bytes_per_step"])
    assert why["text"].startswith(
        f"latency-bound: --max-tpot-ms 150 allows at most {why['max_streamed_bytes'] / 1e9:.3g}"
        f" GB streamed per step")
    assert f"so at least {100 * why['min_resident_fraction']:.0f}% of the weights must stay " \
        "resident" in why["text"]


def test_bound_by_max_batch(url: str) -> None:
    """--max-batch 16 on the same recording: the best is at batch 16, while the recorded plans
    hold 64 sequences streaming everything (and not 96): the sentence says raise --max-batch,
    with a batch the recording's memory supports."""
    points = grid(H100_8GIB)
    rec = recommend.build(replay(url, H100_8GIB, "max-batch", max_batch=16))
    why = rec["explanation"]
    assert rec["best"]["batch"] == 16
    assert why["kind"] == "max_batch"
    assert points[(64, 0.0)]["status"] == "ok" and points[(96, 0.0)]["status"] == "infeasible"
    assert 64 <= why["memory_holds_batch"] < 96
    assert why["text"].startswith("bound by --max-batch 16: it is the largest batch searched")
    assert "raise --max-batch" in why["text"]
    # A gain, from the model, and a real one: 16 -> 64 sequences streaming the same bytes.
    assert re.search(r"\(about \+[0-9,]+ tok/s there, from the model\)", why["text"]), why


def test_unexplored_when_the_search_stopped_short(url: str) -> None:
    """Three trials far from the optimum (asked for by name, as a user's enqueued trials are):
    the model, fitted on them, points at the synthetic landscape's known best, batch 32
    streaming everything, and says it was not measured."""
    name = "stopped-short"
    study = made_as_a_run_makes_it(url, SYNTHETIC, name, trials=3)
    for batch, fraction in ((2, 0.3), (4, 0.2), (8, 0.1)):
        study.enqueue_trial({"batch": batch, "budget_fraction": fraction})
    rec = recommend.build(replay(url, SYNTHETIC, name, trials=3))
    why, answer = rec["explanation"], read(SYNTHETIC).best()
    assert rec["best"]["batch"] == 8
    assert why["kind"] == "unexplored"
    assert (why["model_batch"], why["model_fraction"]) == (answer.batch, answer.budget_fraction)
    assert why["model_tok_s"] == pytest.approx(answer.throughput_tok_s, rel=0.1)
    assert why["text"].startswith(f"not yet the optimum: the model expects batch {answer.batch}"
                                  " at 0% resident (untried)")


def _saturated(path: Path, slow: tuple[int, float] | None = None) -> Path:
    """A landscape where, resident, compute sets every step (1 ms + 1 ms per sequence, prefill
    alike: a 1-token prompt) and memory holds every batch: throughput saturates near 1,000
    tok/s, so batch 48 is within 0.5% of batch 64; streaming everything, the link (1 GB at
    50 GB/s: 20 ms) sets it up to batch 19. HBM and link bandwidths recorded. ``slow``: one
    grid point whose steps take 1.4x as long (a disturbed recording)."""
    isl, osl, total, batches, fractions = 1, 8, 10**9, [1, 2, 4, 8, 16, 32, 48, 64], [0.0, 0.5, 1.0]
    rows = [1, 8, 32, 128, 512, 2048]
    pts = []
    for b in batches:
        for f in fractions:
            streamed = int(total * (1 - f))
            disturbed = 1.4 if (b, f) == slow else 1.0
            tpot = disturbed * max(streamed / 50e9, 1e-3 + 1e-3 * b)
            ttft = disturbed * max(streamed / 50e9, 1e-3 + 1e-3 * b * isl)
            pts.append({"batch": b, "budget_fraction": f, "status": "ok",
                        "predicted_peak_bytes": 10**8 * (1 + b),
                        "throughput_tok_s": b * osl / (ttft + (osl - 1) * tpot),
                        "ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * tpot,
                        "peak_memory_bytes": 10**8 * (1 + b), "streamed_bytes_per_step": streamed})
    data = {"schema_version": 1, "kind": "autotune.landscape", "synthetic": True,
            "description": "compute-bound, saturating (tests/test_explain.py)",
            "workload": {"model": "tiny-llama", "dtype": "float32", "isl": isl, "osl": osl,
                         "max_batch": 64},
            "environment": {"h2d_gb_s": 50.0, "hbm_gb_s": 2000.0},
            "calibration": {"h2d_gb_s": 50.0, "gemm_rows": rows,
                            "gemm_s": [1e-3 + 1e-3 * r for r in rows]},
            "total_device_budget": total, "available_bytes": 100 * GiB,
            "batches": batches, "budget_fractions": fractions, "points": pts}
    path.write_text(json.dumps(data))
    return path


def test_nothing_binds_on_a_saturated_landscape(url: str, tmp_path: Path) -> None:
    """Compute saturates: batch 48 is the best measured, 64 fits and is untried, and the model
    puts it within its error: no limit binds, and the sentence says that, with the trial's
    fraction of its HBM bound (everything resident)."""
    path = _saturated(tmp_path / "saturated.json")
    land, name = read(path), "saturated"
    study = made_as_a_run_makes_it(url, path, name, trials=3, max_batch=64)
    for batch in (16, 32, 48):
        study.enqueue_trial({"batch": batch, "budget_fraction": 1.0})
    rec = recommend.build(replay(url, path, name, trials=3, max_batch=64))
    why, best = rec["explanation"], rec["best"]
    assert land.at(64, 1.0).throughput_tok_s < best["throughput_tok_s"] * 1.01  # the answer
    assert best["batch"] == 48 and why["kind"] == "model"
    assert why["text"].startswith("neither memory, --max-batch nor a latency limit binds at "
                                  "batch 48, 100% resident")
    assert best["bound_by"] == "HBM"
    # 1 GB resident read at 2,000 GB/s: 0.5 ms of the recorded 49 ms step.
    assert best["bound_fraction"] == pytest.approx(0.5 / land.at(48, 1.0).tpot_ms, rel=1e-3)
    assert "of the HBM bound (2,000 GB/s" in why["text"]


def test_a_trial_the_model_misjudged_is_ringed(url: str, tmp_path: Path) -> None:
    """Streaming everything on the saturated landscape, with batch 8 recorded 1.4x slower than
    the link allows: of five trials, that one (and only that one) lies off the fitted model
    (the link's bandwidth: the median of the trials') by more than its error, and the
    landscape rings it and says the model's figure beside it."""
    path = _saturated(tmp_path / "disturbed.json", slow=(8, 0.0))
    name = "disturbed"
    study = made_as_a_run_makes_it(url, path, name, trials=5, max_batch=64)
    for batch in (2, 4, 8, 12, 16):
        study.enqueue_trial({"batch": batch, "budget_fraction": 0.0})
    stored = replay(url, path, name, trials=5, max_batch=64)
    ax = report.figures(stored)["landscape"].axes[0]
    (ring,) = [c for c in ax.collections if c.get_label().startswith("measured off the model")]
    assert [tuple(xy) for xy in ring.get_offsets()] == [(8.0, 0.0)]
    notes = [t.get_text() for t in ax.texts if t.get_text().startswith("model ")]
    assert len(notes) == 1 and notes[0].endswith("%)") and "(-" in notes[0]  # slower


def test_the_landscape_draws_what_the_search_saw(latency_study: optuna.Study) -> None:
    """Behind the trials: the model's throughput (a filled contour), the memory edge (a line at
    the recording's edge) and the region --max-tpot-ms 150 excludes (hatched)."""
    from matplotlib.contour import QuadContourSet

    figs = report.figures(latency_study)
    ax = figs["landscape"].axes[0]
    contours = [c for c in ax.collections if isinstance(c, QuadContourSet)]
    assert [list(c.hatches) for c in contours] == [[None], ["////"]]  # the model; the limit
    legend = [t.get_text().replace("\n", " ") for t in figs["landscape"].legends[0].get_texts()]
    assert any(t.startswith("memory edge: the largest batch that fits in 7.75 GiB")
               for t in legend)
    assert any("excluded by --max-tpot-ms 150" in t for t in legend)
    (edge,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("memory edge")]
    # A staircase: each 1% band of budget at its largest batch. At 0% and 10% resident the
    # recording fits batch 64 and not 96 (its grid's next batch): the edge line is there.
    bands = {round(float(y0 + y1) / 2, 3): x for x, y0, y1 in zip(
        edge.get_xdata()[::2], edge.get_ydata()[::2], edge.get_ydata()[1::2], strict=True)}
    for pct in (0.0, 10.0):
        assert 64 <= bands[pct] < 96, (pct, bands[pct])
    assert all(x == 0.8 for pct, x in bands.items() if pct >= 60)  # nothing fits: all grey


def test_the_bound_panel_shows_each_trials_fraction(memory_study: optuna.Study) -> None:
    fig = report.figures(memory_study)["bound"]
    ax = fig.axes[0]
    shown = sorted(round(float(y), 3) for c in ax.collections for _, y in c.get_offsets()
                   if c.get_label().startswith("bound by"))
    stored = sorted(round(100 * t.user_attrs["bound_fraction"], 3) for t in memory_study.trials
                    if "bound_fraction" in t.user_attrs)
    assert shown == stored and stored
    assert any(ln.get_ydata()[0] == 100 for ln in ax.get_lines())  # the bound itself


def test_the_run_ends_saying_why_and_show_has_the_bound(tmp_path: Path, autotune_here) -> None:
    """The command a user runs: its last lines are the best, why, and where the JSON went;
    ``autotune show`` has each trial's fraction of its bound and what sets it."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    run = autotune_here("run", "--landscape", str(H100_8GIB), "--isl", "128", "--osl", "8",
                        "--storage", url, "--out", str(tmp_path / "rec.json"))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.replace("\n ", " ").strip().splitlines()
    assert all(line.startswith("[replay] ") for line in lines[-4:])  # a replay, said so
    last = [line.removeprefix("[replay] ") for line in lines[-4:]]
    assert last[0].startswith("best: batch 64")
    assert last[1].startswith("why: memory-bound at batch 64 with 10% of the weights resident")
    assert last[2].startswith("recommendation written to")
    assert last[3].startswith("to serve it: autotune.deploy.apply(") and "batch 64" in last[3]
    written = recommend.read(tmp_path / "rec.json")
    assert last[1] == "why: " + written["explanation"]["text"]
    show = autotune_here("show", "--storage", url)
    assert show.returncode == 0, show.stderr
    assert "bound %" in show.stdout
    best = written["best"]
    assert f"{100 * best['bound_fraction']:.0f} link" in show.stdout
