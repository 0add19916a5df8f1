"""How a study chooses configurations: the samplers, and one trial from ask to tell.

``--sampler``: ``autotune`` (default: the prior's model, see :mod:`autotune.tune.prior`, which
starts at the predicted optimum and never proposes what cannot fit, meet the limits or win;
Optuna's TPE until the prior is attached and when nothing is left), ``tpe`` (Optuna's
multivariate TPE, 5 random startup trials), ``random``, ``gp`` (Optuna's GPSampler, needs
scipy) and ``grid`` (batch powers of two and their midpoints x budget in 10% steps: what
recorded landscapes are made of).

A trial runner is anything with ``run(request) -> TrialOutcome``, ``plan(...)`` and
``calibrate()``: a :class:`autotune.measure.worker.Worker` (a process per GPU) or an
:class:`InProcessRunner` (an engine in this process; landscapes replay in microseconds, which
is what the search benchmark and tests use). :func:`measure` runs a trial and measures it
again when it lands far off its prediction; :func:`after_trial` sends a calibration that a
trial contradicts back to be measured. This module does not store anything beyond what
Optuna's ``tell`` stores and those two record.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import optuna

from autotune.engines.memory import DEFAULT_MARGIN
from autotune.errors import UserInputError
from autotune.measure.trial import (
    TrialOutcome,
    TrialRequest,
    accuracy,
    calibrate,
    plan_configs,
    run_trial,
)
from autotune.tune.precisions import PrecisionPriors
from autotune.tune.prior import Limits, Observation, Prior
from autotune.tune.trials import record, study_bandwidths

log = logging.getLogger(__name__)

SAMPLERS = ("autotune", "tpe", "random", "grid", "gp")
GRID_FRACTIONS = tuple(round(0.1 * k, 1) for k in range(11))


def grid_batches(max_batch: int) -> list[int]:
    """Powers of two and their midpoints (1, 2, 3, 4, 6, 8, 12, ...) up to ``max_batch``,
    and ``max_batch`` itself."""
    out, p = [], 1
    while p <= max_batch:
        out.append(p)
        if p >= 2 and p + p // 2 <= max_batch:
            out.append(p + p // 2)
        p *= 2
    if out[-1] != max_batch:
        out.append(max_batch)
    return sorted(set(out))


def grid_size(max_batch: int) -> int:
    return len(grid_batches(max_batch)) * len(GRID_FRACTIONS)


def make_sampler(name: str, seed: int, max_batch: int,
                 precisions: tuple[str, ...] = ("none",)) -> Any:
    if name == "autotune":
        return AutotuneSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        space: dict[str, list[Any]] = {"batch": grid_batches(max_batch),
                                       "budget_fraction": list(GRID_FRACTIONS)}
        if len(precisions) > 1:
            space["precision"] = list(precisions)
        return _GridSampler(space, seed=seed)
    if name == "gp":
        try:
            import scipy  # noqa: F401  (GPSampler's optimizer)
        except ImportError as e:
            raise UserInputError("--sampler gp needs scipy: pip install scipy") from e
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=5)
    raise UserInputError(f"--sampler: expected one of {', '.join(SAMPLERS)}; got {name!r}")


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid, without ``study.stop()`` at the last point (which raises outside
    ``optimize``): the study's trial budget decides when to stop."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


def observations(study: Any) -> list[Observation]:
    """Finished and running trials, as the prior sees them."""
    obs = [Observation.from_trial(t) for t in study.get_trials(deepcopy=False)]
    return [o for o in obs if o is not None]


class AutotuneSampler(optuna.samplers.BaseSampler):
    """The prior's choice for batch x budget; TPE for anything else (see the module docstring).

    Pruned configurations are never proposed, so they never cost a trial. Where changing the
    engine's budget costs time (TensorRT), a worker is offered what is worth most per second
    from the budget its engine holds: each worker thread says which (:meth:`held_by`).
    """

    def __init__(self, seed: int | None = None) -> None:
        self._fallback = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5,
                                                    multivariate=True)
        self.prior: Any = None  # a Prior, or PrecisionPriors for several precisions
        self._worker = threading.local()  # Optuna's ask() has no way to say who asks

    @contextlib.contextmanager
    def held_by(self, budget: int | None) -> Iterator[None]:
        """Within the block, this thread's trials are asked for a worker whose engine holds
        ``budget`` (bytes; None: unknown)."""
        self._worker.budget = budget
        try:
            yield
        finally:
            self._worker.budget = None

    def attach(self, prior: Any) -> None:
        self.prior = prior

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        if self.prior is None:
            return self._fallback.infer_relative_search_space(study, trial)
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        space = {"batch": IntDistribution(1, self.prior.max_batch, log=True),
                 "budget_fraction": FloatDistribution(0.0, 1.0)}
        if isinstance(self.prior, PrecisionPriors):
            space["precision"] = CategoricalDistribution(list(self.prior.precisions))
        return space

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]
                        ) -> dict[str, Any]:
        if self.prior is None or not search_space:
            return self._fallback.sample_relative(study, trial, search_space)
        pick = self.prior.suggest(observations(study), getattr(self._worker, "budget", None))
        if pick is None:  # everything allowed was tried: let TPE refine
            log.info("the prior has no untried configuration left; TPE proposes")
            space = self._fallback.infer_relative_search_space(study, trial)
            return self._fallback.sample_relative(study, trial, space)
        if len(pick) == 3:
            return {"batch": pick[0], "budget_fraction": pick[1], "precision": pick[2]}
        return {"batch": pick[0], "budget_fraction": pick[1]}

    def sample_independent(self, study: Any, trial: Any, name: str, dist: Any) -> Any:
        return self._fallback.sample_independent(study, trial, name, dist)

    def before_trial(self, study: Any, trial: Any) -> None:
        self._fallback.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._fallback.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()


class InProcessRunner:
    """Runs trials on an engine in this process (for replayed landscapes; the worker's own
    functions, so outcomes are the same as through a worker)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._plans: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._calibration: dict[str, Any] | None = None

    def run(self, request: TrialRequest) -> TrialOutcome:
        return run_trial(self.engine, request)

    def plan(self, configs: list[tuple[int, int]], isl: int, osl: int, margin: int,
             precision: str | None = None) -> dict[str, Any]:
        key = (tuple(configs[:1]), tuple(configs[-1:]), len(configs), isl, osl, margin,
               precision)
        if key not in self._plans:  # the same candidates every study: plan them once
            self._plans[key] = plan_configs(self.engine, configs, isl, osl, margin, precision)
        return self._plans[key]

    def accuracy(self, isl: int, osl: int, seed: int) -> dict[str, Any]:
        return accuracy(self.engine, isl, osl, seed)

    def calibrate(self) -> dict[str, Any]:
        if self._calibration is None:
            self._calibration = calibrate(self.engine)
        return self._calibration


def suggest(study: Any, trial: Any, max_batch: int, prior: Any = None,
            held: int | None = None) -> tuple[int, float]:
    """The trial's configuration, for a worker whose engine holds budget ``held`` (bytes;
    None: unknown), with the prior's prediction in its attributes (a study of one
    precision; :func:`suggest_config` for several)."""
    batch, fraction, _ = suggest_config(study, trial, max_batch, prior, held)
    return batch, fraction


def suggest_config(study: Any, trial: Any, max_batch: int, prior: Any = None,
                   held: int | None = None, precisions: tuple[str, ...] = ("none",)
                   ) -> tuple[int, float, str]:
    """The trial's batch, budget fraction and precision: ``precision`` is a categorical
    parameter only when the study searches more than one (else it is the one given, and
    the parameters are those of every study before precision became an axis)."""
    sampler = study.sampler
    with sampler.held_by(held) if isinstance(sampler, AutotuneSampler) else contextlib.nullcontext():
        batch = trial.suggest_int("batch", 1, max_batch, log=True)
        fraction = trial.suggest_float("budget_fraction", 0.0, 1.0)
        precision = (trial.suggest_categorical("precision", list(precisions))
                     if len(precisions) > 1 else precisions[0])
    if prior is not None:
        if not isinstance(study.sampler, AutotuneSampler):  # it refits when it samples
            prior.refit(observations(study))
        attrs = (prior.predicted_attrs(batch, fraction, precision)
                 if isinstance(prior, PrecisionPriors)
                 else prior.predicted_attrs(batch, fraction))
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    return batch, fraction, precision


def start_prior(study: Any, runner: Any, *, total: int, isl: int, osl: int, max_batch: int,
                limits: Limits, h2d_gb_s: float | None,
                totals: dict[str, int] | None = None) -> Any:
    """Measures the hardware through ``runner`` (the matmuls only once per study: a resumed
    run or a joining worker reuses the stored calibration), builds the prior, stores its
    calibration with the study (a landscape exported later carries it) and hands it to an
    autotune sampler.

    A failed measurement is not the study's end: without a prior, the autotune sampler is TPE.
    """
    from autotune.errors import WorkerError
    from autotune.tune import prior as prior_mod

    try:
        if totals is not None and len(totals) > 1:  # precision is an axis: a prior each
            compute = study.user_attrs.get("calibration")
            priors: dict[str, Prior] = {}
            for p, p_total in totals.items():
                priors[p] = prior_mod.build(
                    runner, total=p_total, isl=isl, osl=osl, max_batch=max_batch,
                    limits=limits, h2d_gb_s=h2d_gb_s, margin=DEFAULT_MARGIN, compute=compute,
                    precision=p)
                # The matmuls are timed once: the other precisions reuse the first's.
                compute = compute or priors[p].calibration.as_dict()
            prior: Any = PrecisionPriors(priors)
        else:
            only = next(iter(totals)) if totals else "none"
            prior = prior_mod.build(runner, total=total, isl=isl, osl=osl, max_batch=max_batch,
                                    limits=limits, h2d_gb_s=h2d_gb_s, margin=DEFAULT_MARGIN,
                                    compute=study.user_attrs.get("calibration"),
                                    precision=None if only == "none" else only)
    except WorkerError as e:
        log.warning("no prior (%s); the search goes on without it", e)
        study.set_user_attr("prior", {"error": str(e)})
        return None
    study.set_user_attr("calibration", prior.calibration.as_dict())
    # A resumed study's trials judge the stored calibration at once (two runs calibrating
    # side by side once stored one that made every large batch look hopeless).
    check_calibration(study, prior, runner)
    study.set_user_attr("prior", prior.describe())
    # What the report draws and the recommendation explains, with no worker to ask then.
    study.set_user_attr("memory_edge", prior.memory_edge())
    if isinstance(prior, PrecisionPriors):
        study.set_user_attr("memory_edges", prior.memory_edges())
    if isinstance(study.sampler, AutotuneSampler):
        study.sampler.attach(prior)
    for note in prior.notes():
        log.warning("%s", note)
    return prior


def after_trial(study: Any, prior: Any, runner: Any = None) -> None:
    """Refits the prior on every finished trial and stores its constants with the study;
    with ``runner``, measures the calibration again when a trial contradicts it."""
    if prior is not None:
        if runner is not None:
            check_calibration(study, prior, runner)
        prior.refit(observations(study))
        study.set_user_attr("prior", prior.describe())


# Calibrations a run measures again when trials contradict them; beyond that the bounds,
# which step aside for what the trials showed, are left to carry on without it.
MAX_RECALIBRATIONS = 2


def check_calibration(study: Any, prior: Any, runner: Any) -> None:
    """Measures the matmul calibration again (through ``runner``) when a measured trial ran
    faster than it allows, and stores the new one with the study, saying why."""
    from dataclasses import replace

    from autotune.errors import WorkerError
    from autotune.tune.prior import Calibration

    why = prior.contradiction(observations(study))
    if why is None or prior.recalibrations >= MAX_RECALIBRATIONS:
        return
    prior.recalibrations += 1
    log.warning("the matmul calibration is contradicted by a trial (%s); measuring it again",
                why)
    try:
        fresh = Calibration.from_dict(runner.calibrate())
    except WorkerError as e:
        log.warning("could not measure the calibration again (%s); the bounds rest on the "
                    "trials where they contradict it", e)
        return
    prior.recalibrate(replace(fresh, h2d_gb_s=prior.calibration.h2d_gb_s,
                              history=(*prior.calibration.history, *fresh.history,
                                       f"re-measured: {why}")))
    study.set_user_attr("calibration", prior.calibration.as_dict())


# A trial measured this many times slower or faster than its prediction is measured again
# before it counts: one disturbed measurement would otherwise steer (and end) the search.
WILD = 2.0
MAX_MEASUREMENTS = 3


def measure(runner: Any, request: TrialRequest, trial: Any = None) -> TrialOutcome:
    """Runs a trial; measures it again while its throughput is ``WILD`` x off the prediction
    stored in the trial's attributes and its measurements disagree with one another, and
    keeps the fastest (noise only ever slows a run down). The trial records every figure
    (``remeasured``)."""
    outcome = runner.run(request)
    predicted = trial.user_attrs.get("predicted_throughput_tok_s") if trial is not None else None
    if not predicted or not _wild(outcome, predicted):
        return outcome
    runs = [outcome]
    while len(runs) < MAX_MEASUREMENTS:
        runs.append(runner.run(request))
        ok = sorted((_throughput(o) for o in runs if o.status == "ok"), reverse=True)
        if len(ok) >= 2 and ok[1] >= ok[0] * (1 - 0.1):  # two agree: it is what it is
            break
    kept = max((o for o in runs if o.status == "ok"), key=_throughput, default=outcome)
    trial.set_user_attr("remeasured", {
        "why": f"measured {_throughput(outcome):.4g} tok/s where {predicted:.4g} was predicted",
        "throughputs_tok_s": [round(_throughput(o), 3) if o.status == "ok" else o.status
                              for o in runs],
        "kept": runs.index(kept)})
    return kept


def _throughput(outcome: TrialOutcome) -> float:
    return float(outcome.measurement["throughput_tok_s"]) if outcome.measurement else 0.0


def _wild(outcome: TrialOutcome, predicted: float) -> bool:
    if outcome.status != "ok" or predicted <= 0:
        return False
    ratio = _throughput(outcome) / predicted
    return not 1 / WILD <= ratio <= WILD


def run_in_process(study: Any, runner: Any, *, trials: int, max_batch: int, isl: int,
                   osl: int, total: int, limits: Limits | None = None,
                   prior: Any = None, seed: int = 0, early_stop: bool = False,
                   totals: dict[str, int] | None = None) -> list[TrialOutcome]:
    """The study loop without a worker process: ask, run, record, ``trials`` times (fewer
    with ``early_stop`` once the prior has converged, as ``autotune run`` does).
    ``totals``: precision -> streamable bytes, for a study that searches precisions."""
    precisions = tuple(totals) if totals else ("none",)
    outcomes: list[TrialOutcome] = []
    if "bandwidths" not in study.user_attrs:  # as run_study records them
        describe = getattr(getattr(runner, "engine", None), "describe", None)
        study.set_user_attr("bandwidths", study_bandwidths(describe() if describe else {}, {}))
    bandwidths = study.user_attrs["bandwidths"]
    for _ in range(trials):
        if early_stop and prior is not None and prior.converged(observations(study)):
            break
        held = next((o.applied_budget for o in reversed(outcomes)
                     if o.applied_budget is not None), None)
        trial = study.ask()
        batch, fraction, precision = suggest_config(study, trial, max_batch, prior, held,
                                                    precisions)
        p_total = totals[precision] if totals else total
        request = TrialRequest(batch=batch, budget=int(round(fraction * p_total)), isl=isl,
                               osl=osl, repeats=1, warmup=0, seed=seed, precision=precision)
        outcome = measure(runner, request, trial)
        record(study, trial, request, outcome, p_total, "in-process", limits=limits,
               bandwidths=bandwidths)
        after_trial(study, prior, runner)
        outcomes.append(outcome)
    return outcomes

