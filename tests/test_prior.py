"""The prior and the autotune sampler on landscapes: its pruning never skips the true optimum,
it reaches the target in a handful of trials, and it warns when streaming is pointless."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from autotune.landscape import read
from autotune.tune.prior import Calibration, Limits, Observation, Prior
from autotune.tune.search import observations, start_prior

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from search import make_runner, run_one, tpot_limits  # noqa: E402

SYNTHETIC = Path(__file__).parent / "data" / "synthetic-llama2-7b-8GiB.json"
LANDSCAPES = [SYNTHETIC, *sorted((ROOT / "benchmarks" / "landscapes").glob("*.json"))]


def _cases() -> list[tuple[Path, Limits]]:
    out = []
    for path in LANDSCAPES:
        land = read(path)
        out += [(path, lim) for lim in [Limits(), *tpot_limits(land)]]
    return out


def _study(sampler: str = "autotune") -> optuna.Study:
    from autotune.tune.search import make_sampler

    return optuna.create_study(storage=optuna.storages.InMemoryStorage(),
                               direction="maximize", sampler=make_sampler(sampler, 0, 256))


def _true_optimum(prior: Prior, land, limits: Limits) -> tuple[int, int]:
    """The landscape's best candidate of the prior's grid that runs and meets the limits."""
    best, where = -1.0, None
    for i, b in enumerate(prior.batches):
        for j, f in enumerate(prior.fractions):
            p = land.at(int(b), float(f))
            if land.meets(p, limits) and p.throughput_tok_s > best:
                best, where = p.throughput_tok_s, (i, j)
    assert where is not None
    return where


@pytest.mark.parametrize(("path", "limits"), _cases(),
                         ids=lambda x: getattr(x, "name", None) or str(x.as_dict() or "none"))
def test_pruning_never_skips_the_true_optimum(path: Path, limits: Limits) -> None:
    runner, land = make_runner(str(path))
    study = _study()
    prior = start_prior(study, runner, total=land.total_device_budget, isl=land.isl,
                        osl=land.osl, max_batch=land.batches[-1], limits=limits,
                        h2d_gb_s=land.calibration.get("h2d_gb_s"))
    i, j = _true_optimum(prior, land, limits)
    assert prior.allowed([])[i, j], "pruned before any trial"
    from autotune.tune.search import run_in_process

    run_in_process(study, runner, trials=12, max_batch=land.batches[-1], isl=land.isl,
                   osl=land.osl, total=land.total_device_budget, limits=limits, prior=prior)
    obs = observations(study)
    tried = {(o.batch, round(o.fraction, 6)) for o in obs}
    optimum = (int(prior.batches[i]), float(prior.fractions[j]))
    if optimum not in tried:
        masks = prior.pruned(obs)
        assert not any(m[i, j] for m in masks.values()), {k: bool(m[i, j])
                                                         for k, m in masks.items()}
    # Every bound the pruning uses is below what the landscape measured.
    for o in obs:
        if o.status == "ok":
            bi, bj = prior._index(o.batch, o.fraction)
            assert prior._bounds["tpot_s"][bi, bj] <= o.tpot_s
            assert prior._bounds["throughput"][bi, bj] >= o.throughput


def test_search_reaches_the_target_with_a_tpot_limit() -> None:
    runner, land = make_runner(str(SYNTHETIC))
    limits = tpot_limits(land)[1]
    results = [run_one(runner, land, "autotune", seed, limits, 12) for seed in range(5)]
    at12 = [r.regrets[2] for r in results]
    assert statistics.median(at12) <= 0.03, at12
    assert max(r.oom for r in results) <= 1
    # No configuration that cannot fit was ever proposed.
    assert max(r.infeasible for r in results) == 0


@pytest.mark.parametrize(("path", "limits"), _cases(),
                         ids=lambda x: getattr(x, "name", None) or str(x.as_dict() or "none"))
def test_early_stop_ends_within_a_handful_of_trials_at_the_optimum(path: Path,
                                                                   limits: Limits) -> None:
    runner, land = make_runner(str(path))
    r = run_one(runner, land, "autotune", 0, limits, 20, early_stop=True)
    assert r.trials <= 8, r  # converged or stalled: never the whole budget
    assert r.regrets[-1] <= 0.03, r  # ... and where it stopped is the optimum


def test_a_stalled_search_is_told_apart_from_a_late_improvement() -> None:
    from autotune.tune.acquisition import PATIENCE, _stalled

    def ok(tput: float, feasible: bool = True) -> Observation:
        return Observation(8, 0.2, "ok", throughput=tput, tpot_s=0.2, ttft_s=0.2,
                           streamed=1.0, feasible=feasible)

    walk = [ok(70.0)] + [ok(120.0 - k, feasible=False) for k in range(PATIENCE)]
    assert _stalled(walk)  # the best came first; the rest broke a limit
    assert not _stalled(walk[:-1])  # not yet PATIENCE trials since the best
    assert not _stalled([*walk[:-1], ok(75.0)])  # the last trial beat the best by > 1%
    assert not _stalled([*walk, Observation(8, 0.3, "running")][1:])  # running ones wait


def test_first_trial_is_the_predicted_optimum_without_limits() -> None:
    runner, land = make_runner(str(SYNTHETIC))
    r = run_one(runner, land, "autotune", 0, Limits(), 4)
    assert r.regrets[0] <= 0.03


def _prior(plans: np.ndarray, available: int | None, **kw) -> Prior:
    cal = Calibration(53.0, (1, 64, 2048), (4e-3, 5e-3, 50e-3))
    return Prior(calibration=cal, plans=plans, available=available, total=10**10, isl=128,
                 osl=256, max_batch=4, limits=kw.pop("limits", None),
                 batches=np.arange(1, 5), fractions=np.array([0.0, 0.5, 1.0]), **kw)


def test_warns_when_streaming_is_pointless() -> None:
    plans = np.full((4, 3), 1e9)
    notes = _prior(plans, available=2 * 10**9).notes()
    assert any("streaming is pointless" in n for n in notes)
    assert not any("pointless" in n for n in _prior(plans * 3, available=2 * 10**9).notes())
    # On CPU without --gpu-memory-limit nothing bounds memory: said too (issue 20).
    assert any("no memory limit here" in n and "pointless" in n
               for n in _prior(plans * 3, available=None).notes())
    notes = _prior(plans, 2 * 10**9, limits=Limits(max_tpot_ms=0.1)).notes()
    assert any("can meet the limits" in n for n in notes)


def test_oom_excludes_what_lies_beyond() -> None:
    plans = np.add.outer(np.arange(4) * 1e8, np.arange(3) * 1e9)
    prior = _prior(plans, available=10**12)
    obs = [Observation(2, 0.5, "oom")]
    fit = prior.pruned(obs)["cannot_fit"]
    assert fit[1:, 1:].all() and not fit[0, 0] and not fit[1, 0]


def test_refit_recovers_the_link_from_stream_bound_trials() -> None:
    prior = _prior(np.zeros((4, 3)), None)
    obs = [Observation(b, 0.0, "ok", throughput=1.0, tpot_s=10**10 / 40e9,
                       ttft_s=10**10 / 40e9, streamed=1e10, feasible=True) for b in (1, 2)]
    c = prior.refit(obs)
    assert c.bw == pytest.approx(40e9)
    assert c.fitted_on == 2


def test_a_configuration_the_engine_applies_alike_is_measured_once() -> None:
    """Engines round budgets down to whole units: fractions 0.5 and 0.75 below are one
    configuration (5 GB resident), so measuring one of them rules out the other."""
    fractions = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    applied = np.array([0, 0, 5 * 10**9, 5 * 10**9, 10**10])
    cal = Calibration(53.0, (1, 64, 2048), (4e-3, 5e-3, 50e-3))
    prior = Prior(calibration=cal, plans=np.zeros((1, 5)), available=None, total=10**10,
                  isl=128, osl=256, max_batch=1, batches=np.arange(1, 2), fractions=fractions,
                  applied=applied)

    def ran(fraction: float, applied: int | None = None) -> Observation:
        # Measured but over a limit (not feasible): every untried point may still win.
        streamed = 10**10 - (applied if applied is not None else int(fraction * 10**10))
        t = max(streamed / 53e9, 5e-3)
        return Observation(1, fraction, "ok", throughput=256 / (256 * t), tpot_s=t, ttft_s=t,
                           streamed=float(streamed), feasible=False, applied=applied)

    assert prior.suggest([]) == (1, 1.0)
    # On the grid: 0.75 (predicted faster than 0.25) is 0.5's configuration.
    assert prior.suggest([ran(1.0), ran(0.5)]) == (1, 0.25)
    # Off the grid, the applied budget the trial recorded says which configuration it was.
    assert prior.suggest([ran(1.0), ran(0.6, applied=5 * 10**9)]) == (1, 0.25)
    assert prior.suggest([ran(1.0), ran(0.6, applied=5 * 10**9), ran(0.1, applied=0)]) is None


def test_limits_out_of_reach_cost_one_trial_that_shows_it() -> None:
    """An impossible --max-tpot-ms: the bounds say so before trial 1, but bounds rest on a
    calibration; the search measures the configuration nearest to meeting the limit (never
    one that cannot fit) and stops on that evidence, saying why."""
    from autotune.tune.search import run_in_process

    runner, land = make_runner(str(SYNTHETIC))
    limits = Limits(max_tpot_ms=0.001)
    study = _study()
    total = land.total_device_budget
    prior = start_prior(study, runner, total=total, isl=land.isl, osl=land.osl,
                        max_batch=land.batches[-1], limits=limits,
                        h2d_gb_s=land.calibration.get("h2d_gb_s"))
    assert prior.stop_reason(observations(study)) is None  # no trial yet: bounds alone
    outcomes = run_in_process(study, runner, trials=6, max_batch=land.batches[-1],
                              isl=land.isl, osl=land.osl, total=total, limits=limits,
                              prior=prior, early_stop=True)
    assert [o.status for o in outcomes] == ["ok"]
    (trial,) = study.trials
    fastest = min((p for p in land.grid_points() if p.status == "ok"), key=lambda p: p.tpot_ms)
    assert trial.user_attrs["tpot_ms"] <= 1.05 * fastest.tpot_ms  # the nearest to meeting
    why = prior.stop_reason(observations(study))
    assert why.startswith("no configuration that fits can meet the limits"), why
    # Without early stop the budget goes on the least violating ones, still none that OOM.
    study = _study()
    prior = start_prior(study, runner, total=total, isl=land.isl, osl=land.osl,
                        max_batch=land.batches[-1], limits=limits,
                        h2d_gb_s=land.calibration.get("h2d_gb_s"))
    outcomes = run_in_process(study, runner, trials=4, max_batch=land.batches[-1],
                              isl=land.isl, osl=land.osl, total=total, limits=limits,
                              prior=prior, early_stop=False)
    assert [o.status for o in outcomes] == ["ok"] * 4


class _CostlyChanges:
    """A runner whose engine pays ``change_s`` seconds whenever its budget changes, as a
    TensorRT engine rebuilding its execution contexts does (the replayed trial itself takes
    ``trial_s``); the time is accounted, not slept."""

    def __init__(self, runner, change_s: float, trial_s: float) -> None:
        self.runner, self.change_s, self.trial_s = runner, change_s, trial_s
        self.changes = 0

    def run(self, request):
        outcome = self.runner.run(request)
        outcome.elapsed_s = self.trial_s
        if outcome.budget_changed:
            self.changes += 1
            outcome.budget_change_s = self.change_s
            outcome.elapsed_s += self.change_s
        return outcome

    def plan(self, *args):
        return self.runner.plan(*args)

    def calibrate(self):
        return self.runner.calibrate()


@pytest.mark.parametrize("limits", [Limits(), Limits(max_tpot_ms=150.0)],
                         ids=["none", "tpot150"])
def test_costly_budget_changes_are_avoided_where_they_buy_little(limits: Limits) -> None:
    """Where a budget change costs three trials' time, the search changes the budget fewer
    times than where it is free, and still ends at the optimum."""
    from autotune.tune.search import run_in_process

    def study_with(change_s: float) -> tuple[int, float]:
        base, land = make_runner(str(SYNTHETIC))
        runner = _CostlyChanges(base, change_s=change_s, trial_s=1.0)
        study = _study()
        total = land.total_device_budget
        prior = start_prior(study, runner, total=total, isl=land.isl, osl=land.osl,
                            max_batch=land.batches[-1], limits=limits,
                            h2d_gb_s=land.calibration.get("h2d_gb_s"))
        run_in_process(study, runner, trials=12, max_batch=land.batches[-1], isl=land.isl,
                       osl=land.osl, total=total, limits=limits, prior=prior)
        best = max(t.value for t in study.trials
                   if t.value and all(v <= 0 for v in t.constraints.values()))
        return runner.changes, best / land.best(limits).throughput_tok_s

    free_changes, free_found = study_with(change_s=0.0)
    costly_changes, costly_found = study_with(change_s=3.0)
    assert costly_changes < free_changes, (costly_changes, free_changes)
    assert costly_found >= 0.97 and free_found >= 0.97, (costly_found, free_found)


def test_the_bounds_count_only_the_bytes_the_engine_streams() -> None:
    """A budget below the total may leave weights that are read where they lie, not streamed
    (the native engine's embedding): the bounds take the bytes the engine says it streams."""
    cal = Calibration(53.0, (1, 64, 2048), (4e-3, 5e-3, 50e-3))
    common = dict(calibration=cal, plans=np.zeros((1, 3)), available=None, total=10**10,
                  isl=128, osl=256, max_batch=1, batches=np.arange(1, 2),
                  fractions=np.array([0.0, 0.5, 1.0]))
    every_byte = Prior(**common)._lower_bounds([])["tpot_s"][0]
    told = Prior(**common, streamed=np.array([9e9, 4e9, 0.0]))._lower_bounds([])["tpot_s"][0]
    assert told[0] == pytest.approx(0.9 * every_byte[0])  # stream-bound: 10% fewer bytes
    assert told[1] == pytest.approx(0.8 * every_byte[1])
    assert told[2] == every_byte[2]  # nothing streamed: the matmuls bound it
    # The model predicts with them too, interpolated between the candidates.
    prior = Prior(**common, streamed=np.array([9e9, 4e9, 0.0]))
    for fraction, streamed in ((0.0, 9e9), (0.25, 6.5e9)):
        tpot = prior.predict(np.array(1.0), np.array(fraction))["tpot_s"]
        assert float(tpot) == pytest.approx(streamed / 53e9)
