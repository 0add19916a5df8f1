"""The Optuna wiring: one study searches batch size x weight-streaming budget.

Workload (model, engine, dtype, isl, osl, memory limit, GPU) is fixed per study, names it and
is its first record (resuming a study with another workload, or one autotune did not make, is
refused, :func:`check_workload`);
the parameters are ``batch`` (integer, log scale) and ``budget_fraction`` (of
``total_device_budget``; the bytes are recorded beside it). The objective is throughput.
Every trial's outcome is data: a configuration predicted not to fit, or that ran out of memory,
is told as a constraint violation (``trial.set_constraint``) with throughput 0 and its reason;
a crash, hang or error becomes a FAIL trial with its reason; the study goes on. Re-running the
same command resumes the study up to ``trials`` finished trials.

How long a study takes: ``trials`` is a ceiling. With the autotune sampler the study stops
early once the prior has converged (``early_stop``); trials on engines with uniform decode steps
time ``decode_steps`` steps and extrapolate the rest of the osl (the trial says so), and at the
end the best configuration is measured once over every step (``confirm``), its figures stored
beside the estimate (study attribute ``confirmation``).

One worker process per device runs trials; with several devices, one thread per worker asks
and tells against the same storage.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from autotune.engines import (
    EngineConfig,
    check_option_values,
    check_options,
    check_precisions,
    engine_class,
)
from autotune.engines.memory import MAX_BATCH
from autotune.errors import UserInputError, stop_name
from autotune.measure import device_lock, host
from autotune.measure.trial import TrialOutcome, TrialRequest
from autotune.measure.worker import Worker, WorkerInfo
from autotune.models import check_dtype, get_spec
from autotune.precision import parse_precisions
from autotune.storage import DEFAULT_STORAGE, close_storage, open_storage, parse_url, redact
from autotune.tune import budget, resume
from autotune.tune.acquisition import OUT_OF_REACH
from autotune.tune.prior import Limits
from autotune.tune.trials import OBJECTIVE, record, study_bandwidths
from autotune.units import GiB, parse_bytes, size_as_typed

log = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "FAIL", "PRUNED")


# The most a run may ask for: beyond, a typo (a study of 10**20 trials never ends; a batch of
# 10**7 sequences fits no GPU), refused before anything is written.
_MOST = {"trials": 100_000, "isl": 1 << 24, "osl": 1 << 24, "max_batch": MAX_BATCH,
         "repeats": 1000}
_NAME_BYTES = 200  # a study's name is its export's file name: studies/<name>.json


def check_study_name(name: str) -> None:
    """Refuses a study name that could not be its export's file name in studies/."""
    if not isinstance(name, str) or not name.strip():
        raise UserInputError("--study: expected a non-empty name")
    if any(c in name for c in "/\\") or any(ord(c) < 32 for c in name):
        raise UserInputError(
            f"--study: a study's name is also its export's file name (studies/NAME.json): "
            f"expected no '/', '\\' or control characters; got {name!r}")
    if len(name.encode()) > _NAME_BYTES:
        raise UserInputError(
            f"--study: a study's name is also its export's file name: expected at most "
            f"{_NAME_BYTES} bytes; got {len(name.encode())}")


@dataclass(frozen=True)
class RunOptions:
    """A tuning run, validated on construction."""

    model: str
    engine: str = "native"
    trials: int = 20
    isl: int = 128
    osl: int = 256
    gpu_memory_limit: int | None = None  # bytes
    max_batch: int = 256
    storage: str = DEFAULT_STORAGE
    study_name: str | None = None
    device: str = "cuda"  # "cpu", "cuda" (all --gpus), "cuda:N"
    gpus: tuple[int, ...] = ()
    dtype: str = "float16"
    seed: int = 0
    weights: str | None = None
    repeats: int = 3
    warmup: int = 1
    trial_timeout_s: float = 900.0
    engine_options: tuple[tuple[str, Any], ...] = ()
    # Joins a study another run created (autotune worker): its stored options, workload and
    # environment are kept, and the sampler is not seeded, so that workers try different points.
    joined: bool = False
    # Latency limits (constraints; the objective stays throughput) and the search strategy.
    max_tpot_ms: float | None = None
    max_ttft_ms: float | None = None
    max_latency_s: float | None = None
    sampler: str = "autotune"
    # Measurement shortcut (None: time every step), early stop and the final full measurement.
    decode_steps: int | None = 32
    early_stop: bool = True
    confirm: bool = True
    # Weight precisions searched (--quantization): one is fixed; several are a categorical
    # parameter of the study (autotune.tune.precisions). ("none",): the study as before.
    quantization: tuple[str, ...] = ("none",)

    def __post_init__(self) -> None:
        self._take_python_forms()
        object.__setattr__(self, "quantization", parse_precisions(self.quantization))
        if self.decode_steps is not None and (
                not isinstance(self.decode_steps, int) or self.decode_steps < 1):
            raise UserInputError(f"--decode-steps: expected a positive integer (0: every step); "
                                 f"got {self.decode_steps!r}")
        for name, most in _MOST.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"--{name.replace('_', '-')}: expected a positive integer; "
                                     f"got {value!r}")
            if value > most:
                raise UserInputError(f"--{name.replace('_', '-')}: expected at most {most:,}; "
                                     f"got {value:,}")
        if self.warmup < 0:
            raise UserInputError(f"--warmup: expected 0 or more; got {self.warmup}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UserInputError(f"--seed: expected an integer from 0 to 2**32 - 1; got "
                                 f"{self.seed!r}")
        if self.gpus and self.device == "cpu":
            raise UserInputError("--gpus names GPUs, but --device is cpu: give --device cuda "
                                 "(or leave --device out)")
        if not math.isfinite(self.trial_timeout_s) or self.trial_timeout_s <= 0:
            raise UserInputError(f"--trial-timeout: expected seconds > 0; got {self.trial_timeout_s}")
        if self.gpu_memory_limit is not None and self.gpu_memory_limit <= 0:
            raise UserInputError(f"--gpu-memory-limit: expected a positive size; got "
                                 f"{self.gpu_memory_limit}")
        check_dtype(self.dtype)
        self.limits  # noqa: B018  (validates the limits)
        from autotune.tune.search import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise UserInputError(f"--sampler: expected one of {', '.join(SAMPLERS)}; got "
                                 f"{self.sampler!r}")
        get_spec(self.model, self.weights)  # unknown model / bad --weights fail here
        # Unknown engine or option keys fail here; missing extras fail at load.
        check_options(engine_class(self.engine), self.engine_options)
        check_precisions(engine_class(self.engine), self.engine_config("cpu"))
        check_option_values(engine_class(self.engine), self.engine_config("cpu"))
        parse_url(self.storage)
        if self.study_name is not None:
            check_study_name(self.study_name)
        spec = get_spec(self.model, self.weights)
        if self.isl + self.osl > spec.max_position_embeddings:
            raise UserInputError(
                f"--isl {self.isl} + --osl {self.osl} exceeds {self.model}'s "
                f"{spec.max_position_embeddings} positions"
            )

    def _take_python_forms(self) -> None:
        """What a Python caller would pass besides the CLI's forms (a Path, "8GiB", a dict of
        options, a list of GPUs) is taken; a wrong type is refused in one line, as the CLI
        refuses a flag, not as a TypeError from deep inside."""
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.storage, os.PathLike):
            put("storage", f"sqlite:///{os.fspath(self.storage)}")
        if isinstance(self.gpu_memory_limit, str):
            put("gpu_memory_limit", parse_bytes(self.gpu_memory_limit, what="gpu_memory_limit"))
        if isinstance(self.engine_options, dict):
            put("engine_options", tuple(self.engine_options.items()))
        if isinstance(self.gpus, list):
            put("gpus", tuple(self.gpus))
        checks = {
            "storage": str, "gpu_memory_limit": (int, type(None)), "device": str, "dtype": str,
            "trial_timeout_s": (int, float), "warmup": int, "gpus": tuple,
            "engine_options": tuple,
        }
        for name, kind in checks.items():
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise UserInputError(f"{name}: expected {_kind_name(kind)}; got {value!r}")
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in self.gpus):
            raise UserInputError(f"gpus: expected GPU indices (integers); got {self.gpus!r}")
        if not all(isinstance(o, tuple) and len(o) == 2 for o in self.engine_options):
            raise UserInputError("engine_options: expected (key, value) pairs or a dict; got "
                                 f"{self.engine_options!r}")
        if not (self.device in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise UserInputError(f"device: expected cpu, cuda or cuda:N; got {self.device!r}")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_tpot_ms, self.max_ttft_ms, self.max_latency_s)

    @property
    def devices(self) -> list[str]:
        if self.device == "cpu":
            return ["cpu"]
        if self.gpus:
            return [f"cuda:{i}" for i in self.gpus]
        return [self.device if ":" in self.device else "cuda:0"]

    def engine_config(self, device: str) -> EngineConfig:
        return EngineConfig(
            model=self.model, engine=self.engine, dtype=self.dtype, device=device,
            max_batch=self.max_batch, max_seq_len=self.isl + self.osl, max_prompt_len=self.isl,
            weights=self.weights, seed=self.seed, gpu_memory_limit=self.gpu_memory_limit, options=self.engine_options,
            quantization=self.quantization,
        )

    def workload(self, gpu_name: str) -> dict[str, Any]:
        return {
            "model": self.model, "engine": self.engine, "dtype": self.dtype, "isl": self.isl,
            "osl": self.osl, "gpu_memory_limit": self.gpu_memory_limit, "gpu": gpu_name,
            "max_batch": self.max_batch, "weights": self.weights, "repeats": self.repeats,
            "warmup": self.warmup, "limits": self.limits.as_dict(), "sampler": self.sampler,
            "decode_steps": self.decode_steps, "quantization": list(self.quantization),
        }

    def trial_request(self, batch: int, budget: int, precision: str | None = None
                      ) -> TrialRequest:
        """A trial's measurement: short warm-ups and ``decode_steps`` timed steps (where the
        engine's steps are uniform; measure.py checks)."""
        return TrialRequest(batch=batch, budget=budget, isl=self.isl, osl=self.osl,
                            repeats=self.repeats, warmup=self.warmup, seed=self.seed,
                            decode_steps=self.decode_steps, warmup_steps=self.decode_steps,
                            precision=precision or self.quantization[0])


def default_study_name(options: RunOptions, gpu_name: str) -> str:
    """Names the workload: model, engine, dtype, isl, osl, memory limit and GPU."""
    limit = size_as_typed(options.gpu_memory_limit) if options.gpu_memory_limit else "nolimit"
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    name = (f"{options.model}-{options.engine}-{options.dtype}-isl{options.isl}-osl{options.osl}"
            f"-{limit}-{gpu}")
    if options.quantization != ("none",):  # other weights: another study
        name += "-" + "+".join(options.quantization)
    # Limits change what is feasible: another limit is another study.
    units = {"max_tpot_ms": "tpot{:g}ms", "max_ttft_ms": "ttft{:g}ms", "max_latency_s": "e2e{:g}s"}
    for key, value in options.limits.as_dict().items():
        name += "-" + units[key].format(value)
    return name


@dataclass
class TrialEvent:
    """Progress of a run, for the CLI: one per finished trial."""

    number: int  # Optuna's trial number
    done: int  # finished trials in the study so far
    total: int  # the study's trial budget
    params: dict[str, Any]
    outcome: TrialOutcome
    best: dict[str, Any] | None  # the best feasible trial so far
    total_device_budget: int = 0  # the engine's, to say what a budget asked for became


@dataclass
class RunResult:
    study_name: str
    storage: str  # redacted
    ran: int  # trials run by this invocation
    info: WorkerInfo | None
    recommendation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def resolve_gpu_name(options: RunOptions) -> str:
    """Checks the device exists (NVML) and the limit fits it; returns the GPU's name."""
    if options.device == "cpu":
        return "cpu"
    from autotune import gpu

    names = set()
    for device in options.devices:
        info = gpu.device_info(device)  # clear errors without a GPU / for a bad index
        if options.gpu_memory_limit and options.gpu_memory_limit > info.total_bytes:
            raise UserInputError(
                f"--gpu-memory-limit {options.gpu_memory_limit / GiB:.2f} GiB exceeds "
                f"{device}'s {info.total_bytes / GiB:.2f} GiB ({info.name})"
            )
        names.add(info.name)
    if len(names) > 1:
        raise UserInputError(
            f"--gpus mixes GPU models ({', '.join(sorted(names))}); trials of one study must be "
            "comparable: run one study per GPU model"
        )
    return names.pop()


def create_or_load(options: RunOptions, gpu_name: str) -> tuple[Any, bool]:
    """The study, and whether this call created it.

    A study's workload is its first record: the run that creates it stores it at once, and a
    run that finds the study made waits for it before comparing (:func:`check_workload`), so
    two runs started together on a new study cannot both measure, one workload each, into it.
    """
    storage = open_storage(options.storage, create=True)
    try:
        return _create_or_load(storage, options, gpu_name)
    except BaseException:
        close_storage(storage)  # refused: nothing written, and nothing left open
        raise


def _create_or_load(storage: Any, options: RunOptions, gpu_name: str) -> tuple[Any, bool]:
    import optuna

    name = options.study_name or default_study_name(options, gpu_name)
    check_study_name(name)  # a default name from a long checkpoint folder name, say
    seed = None if options.joined else options.seed
    from autotune.tune.search import make_sampler

    sampler = make_sampler(options.sampler, seed, options.max_batch, options.quantization)
    if options.joined:  # a joiner takes the study's own options
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler), False
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        check_workload(study, options, gpu_name)
        created = False
    else:
        study.set_user_attr("workload", options.workload(gpu_name))
        study.set_user_attr("run_options", options_dict(options))
        created = True
    if study.metric_names is None:
        study.set_metric_names([OBJECTIVE])
    return study, created


# What makes trials comparable: a study measures one workload (sampler, repeats, seed and the
# decode-step shortcut only change how it is searched or timed).
WORKLOAD_KEYS = ("model", "weights", "engine", "dtype", "isl", "osl", "gpu_memory_limit", "gpu",
                 "max_batch", "limits")


# How long a run that finds a study without its workload waits for the run creating it to
# store it (two writes apart, on a busy disk): beyond, the study is not autotune's.
WORKLOAD_WAIT_S = 5.0


def check_workload(study: Any, options: RunOptions, gpu_name: str) -> None:
    """Refuses to resume a study that measured another workload, naming what differs (its
    best would be reported for a workload it was never measured on), and a study autotune did
    not make (plain Optuna's: its trials have none of autotune's attributes), before writing
    anything into it."""
    stored = _stored_workload(study, WORKLOAD_WAIT_S)
    if not isinstance(stored, dict):
        raise UserInputError(
            f"study {study.study_name!r} was not made by autotune (it stores no workload"
            f"{'; it has ' + str(len(study.trials)) + ' trials' if study.trials else ''}): "
            "autotune writes only into its own studies; give another --study")
    # First what auto resolves to, where the engine knows it before loading: a default that
    # follows it (tensorrt's --max-batch follows attention) would otherwise be named instead.
    early = getattr(engine_class(options.engine), "resolved_before_load", None)
    known = early(options.engine_options) if early is not None else None
    if known is not None:
        check_resolved(study, options.engine, known)
    mine = options.workload(gpu_name)
    differs = [f"{key} {stored.get(key)!r} (this run: {mine[key]!r})" for key in WORKLOAD_KEYS
               if key in stored and stored[key] != mine[key]]
    # A study from before precision was an axis measured 16-bit weights ("none").
    precisions = stored.get("quantization", ["none"])
    if precisions != mine["quantization"]:
        differs.append(f"--quantization {','.join(map(str, precisions))} (this run: "
                       f"{','.join(mine['quantization'])}; another set of precisions would "
                       "compare trials the study's search did not choose among)")
    ran = study.user_attrs.get("run_options", {}).get("engine_options")
    # Options the engine resolves at load are compared by what they resolved to, once loaded
    # (check_resolved): an old study resumes with them typed out.
    resolved = getattr(engine_class(options.engine), "resolved_options", {})
    typed = [list(p) for p in options.engine_options if p[0] not in resolved]
    if ran is not None and [list(p) for p in ran if p[0] not in resolved] != typed:
        differs.append(f"engine options {ran!r} (this run: {list(options.engine_options)!r})")
    if differs:
        raise UserInputError(
            f"study {study.study_name!r} measured another workload: {', '.join(differs)}; "
            "resume it with its own options, or give another --study"
        )


def _stored_workload(study: Any, wait_s: float) -> Any:
    """The study's stored workload; while it has none and no trial, waits up to ``wait_s``
    for the run that created it a moment ago to store it."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        workload = study.user_attrs.get("workload")  # read from the storage each time
        if workload is not None or study.trials or time.monotonic() >= deadline:
            return workload
        time.sleep(0.05)


def check_resolved(study: Any, engine: str, facts: dict[str, Any]) -> None:
    """Refuses to go on with a study whose trials ran another decode step than the engine
    just loaded (its options' defaults resolved otherwise: the default changed, or this host
    cannot run what the study's could), naming the options that give the study's."""
    cls = engine_class(engine)
    resolved = getattr(cls, "resolved_options", {})
    stored = study.user_attrs.get("engine")
    if not resolved or not isinstance(stored, dict) or not study.trials:
        return
    was = {fact: stored.get(fact, before) for fact, before in resolved.values()}
    now = {fact: facts.get(fact, before) for fact, before in resolved.values()}
    if was != now:
        said = ", ".join(f"{k} {was[k]!r} (this run: {now[k]!r})" for k in was
                         if was[k] != now[k])
        giving = " ".join(f"--engine-option {k}={v}"
                          for k, v in cls.options_giving(was).items())
        raise UserInputError(
            f"study {study.study_name!r} measured another decode step: {said}; resume it with "
            f"{giving}, or give another --study")


def check_total(study: Any, total: int) -> None:
    """Refuses to go on with a study whose trials were measured against another
    ``total_device_budget`` (the engine's units changed: native's embedding and LM head joined
    the budget in issue 14): its stored budget fractions would mean other bytes."""
    stored = study.user_attrs.get("total_device_budget")
    if stored is not None and stored != total and study.trials:
        raise UserInputError(
            f"study {study.study_name!r} was measured with {stored} bytes of streamable weights; "
            f"the engine now has {total} (its units changed), so the stored budgets would mean "
            "other bytes: give another --study")


def measure_accuracy(worker: Any, options: RunOptions) -> dict[str, Any]:
    """Each 8-bit precision's distance from 16-bit, measured once per study in the worker
    (stored as the study's ``accuracy``); a failure is recorded, not fatal."""
    from autotune.errors import WorkerError

    try:
        return worker.accuracy(options.isl, options.osl, options.seed)
    except WorkerError as e:
        log.warning("the accuracy check failed (%s); the study goes on without it", e)
        return {"error": str(e)}


def best_summary(study: Any) -> dict[str, Any] | None:
    try:
        best = study.best_trial
    except ValueError:  # no feasible completed trial yet
        return None
    return {"number": best.number, **best.params, OBJECTIVE: best.value,
            "budget_pct": budget_shown(best.user_attrs)[1]}


def budget_shown(attrs: dict[str, Any]) -> tuple[int, float]:
    """A trial's budget as bytes and percent of the total: the one the engine applied (engines
    round down to whole units), else the one asked for (trials never run)."""
    if "budget_applied_pct" in attrs:
        return attrs["budget_applied_bytes"], attrs["budget_applied_pct"]
    return attrs["budget_bytes"], attrs["budget_pct"]


STOP_POLL_S = 0.2  # how soon a stop signal taken by a trial's thread stops the run


def run_study(
    options: RunOptions,
    progress: Callable[[TrialEvent], None] | None = None,
    on_worker: Callable[[str, float, WorkerInfo | None], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> RunResult:
    """Runs (or resumes) the study until it has ``options.trials`` finished trials.

    ``progress`` hears of every finished trial. ``on_worker(device, seconds, info)`` hears of
    each worker's load, which takes minutes for a large model: every 5 s while it loads
    (``info`` None), then once loaded (``info``: what it loaded). ``on_step(text)`` hears
    what a long step is doing (measuring the hardware, a first trial's warm-up), and again
    every 5 s of any wait on a worker (the trial, and its warm-up or timed run; a load that
    says what it is doing, compiling say: then in place of ``on_worker``'s notice)."""
    gpu_name = resolve_gpu_name(options)
    # Before anything is written: a model the host cannot hold would kill its workers.
    warning = host.check_engine(options.engine_config(options.devices[0]), len(options.devices))
    if warning:
        log.warning("%s", warning)
    study, created = create_or_load(options, gpu_name)
    on_step = on_step or (lambda _: None)
    kept = 0 if created else budget.spent(study)
    if kept:  # said before the load: a resumed run may have nothing left to run
        on_step(f"resuming study {study.study_name}: {kept} finished trial"
                f"{'s' if kept != 1 else ''} kept in {redact(options.storage)}")
    try:
        return _run(study, options, gpu_name, progress, on_worker, on_step)
    except BaseException:
        # A run refused before its first trial (the engine will not load, nothing fits...)
        # leaves no empty study behind: show and export would then ask which study to read.
        if created and not study.get_trials(deepcopy=False):
            import optuna

            try:
                optuna.delete_study(study_name=study.study_name, storage=study._storage)
            except Exception as e:  # the refusal is what the user must hear, not this
                log.warning("could not remove the empty study %s: %s", study.study_name, e)
        raise
    finally:
        close_storage(study._storage)  # the file whole when the run returns (storage.py)


def _run(study: Any, options: RunOptions, gpu_name: str,
         progress: Callable[[TrialEvent], None] | None,
         on_worker: Callable[[str, float, WorkerInfo | None], None] | None,
         on_step: Callable[[str], None]) -> RunResult:
    result = RunResult(study.study_name, redact(options.storage), 0, None)
    for number in resume.recover(study):  # the trials of a killed run: failed, retried once
        result.notes.append(f"trial {number} was interrupted by a dead process; retrying it")
    work = budget.has_work(study, options.trials)
    # A run killed during the final measurement left the best estimated: finish it now.
    if not work and not (options.confirm and needs_confirmation(study)):
        more = ("its own run may give --trials above that to run more" if options.joined
                else "give --trials above that to run more")
        result.notes.append(
            f"study {study.study_name} already has {budget.spent(study)} finished trials; {more}")
        return result
    from autotune.tune import search

    size = search.grid_size(options.max_batch)
    if options.sampler == "grid" and options.trials != size:
        covers = "part of it" if options.trials < size else "it, then repeats points"
        result.notes.append(f"the grid has {size} points; --trials {options.trials} covers "
                            f"{covers}")
    lock = threading.Lock()
    state: dict[str, Any] = {"ran": 0, "serving": len(options.devices)}
    errors: list[BaseException] = []
    workers: list[Any] = []  # stopped here when the caller is interrupted (see below)
    # Its own lock: the interruption takes it while a thread may hold ``lock`` for minutes
    # (the hardware's timing, or waiting for the device).
    workers_lock = threading.Lock()
    # Set as each serving thread ends. (After a KeyboardInterrupt cut a Thread.join short,
    # Python <= 3.12 may report a running thread as stopped: its is_alive() cannot be trusted.)
    ended = [threading.Event() for _ in options.devices]

    def claim() -> Any:
        """A trial inside the study's budget, or None: exact across processes and hosts."""
        # Workers elsewhere may have died since this run started: their trials would hold a
        # place in the budget, RUNNING, until the next run. Fail and retry them now.
        for number in resume.recover(study):
            with lock:
                result.notes.append(f"trial {number} was interrupted by a dead process; "
                                    f"retrying it")
        if state.get("interrupted"):
            return None
        reason = stop_reason(study, options, state.get("prior"))
        if reason is not None:
            with lock:
                state["stopped"] = (budget.spent(study), reason)
            return None
        # A cheap check right before asking (no PRUNED trial unless another worker races us).
        if not budget.has_work(study, options.trials):
            return None
        with resume.asking(study):  # a run killed in between leaves a record of it
            trial = study.ask()
            resume.mark_started(trial)  # who runs it, at once
        return trial if budget.claim(study, trial, options.trials) else None

    def serve(device: str, serving_ended: threading.Event) -> None:
        try:
            with Worker(options.engine_config(device),
                        trial_timeout_s=options.trial_timeout_s) as worker:
                with workers_lock:
                    if state.get("interrupted"):
                        return
                    workers.append(worker)
                doing = [""]  # what this worker is asked for now, for its notices

                def waiting(seconds: float, what: str) -> None:  # a wait past NOTICE_S
                    on_step(f"{device}: {doing[0]}{what} ({seconds:.0f} s)...")

                worker.on_wait = waiting

                def device_busy(seconds: float, holder: str) -> None:
                    on_step(f"{device}: {doing[0]}waiting for the device: {holder} is "
                            f"measuring on it ({seconds:.0f} s)...")

                def alone() -> Any:  # the device to this process while it times anything
                    # (a stopped run ends the wait: see the interruption below)
                    return device_lock.exclusive(device, device_busy,
                                                 lambda: state.get("interrupted", False))
                def loading(seconds: float) -> None:
                    if worker.doing:  # the load's phase, as the engine said it
                        on_step(f"{device}: loading the model: {worker.doing} "
                                f"({seconds:.0f} s)...")
                    elif on_worker is not None:
                        on_worker(device, seconds, None)

                info = worker.start(on_wait=loading)
                check_total(study, info.total_device_budget)
                check_resolved(study, options.engine, info.engine)
                totals = dict(info.total_device_budgets) or {
                    options.quantization[0]: info.total_device_budget}
                if on_worker is not None:
                    on_worker(device, info.load_s, info)
                with lock:
                    if result.info is None:
                        result.info = info
                        if not options.joined:
                            _record_study_attrs(study, options, gpu_name, info)
                total = info.total_device_budget
                with lock:  # one prior per run, measured by the first worker
                    if "prior" not in state and work:
                        if options.sampler == "autotune":
                            on_step(f"{device}: measuring the hardware for the search "
                                    "(matmul timings, memory plans)...")
                        with alone():
                            state["prior"] = search.start_prior(
                                study, worker, total=total, isl=options.isl, osl=options.osl,
                                max_batch=options.max_batch, limits=options.limits,
                                h2d_gb_s=info.environment.get("h2d_gb_s"), totals=totals)
                    if (work and not options.joined and "accuracy" not in study.user_attrs
                            and any(p != "none" for p in options.quantization)):
                        on_step(f"{device}: comparing 8-bit outputs with 16-bit on the same "
                                "prompts (once per study)...")
                        with alone():  # generation on the device: not beside a timing
                            accuracy = measure_accuracy(worker, options)
                        study.set_user_attr("accuracy", accuracy)
                prior = state.get("prior")
                bandwidths = study.user_attrs.get("bandwidths")  # the study's, for the bounds
                if prior is not None and (why := prior.nothing_fits()):
                    raise UserInputError(why)  # before any trial: none could run
                first, held = True, None  # held: the budget this worker's engine holds
                while work and (trial := claim()) is not None:
                    batch, fraction, precision = search.suggest_config(
                        study, trial, options.max_batch, prior, held, options.quantization)
                    p_total = totals.get(precision, total)
                    request = options.trial_request(batch, int(round(fraction * p_total)),
                                                    precision)
                    shown = "" if options.quantization == ("none",) else f", {precision}"
                    doing[0] = (f"trial #{trial.number} (batch {batch}, budget "
                                f"{100 * fraction:.0f}%{shown}): ")
                    if first:  # the slow one: kernels compile and caches warm up in it
                        on_step(f"{device}: trial #{trial.number} (batch {batch}, budget "
                                f"{100 * fraction:.0f}%{shown}): warming up and measuring; a first "
                                "trial also compiles and fills caches, so it takes longest...")
                        first = False
                    with resume.heartbeat(trial), alone():  # waiting, the trial is alive
                        outcome = search.measure(worker, request, trial)
                        with lock:  # recorded whole, or left to the interruption whole
                            if state.get("interrupted"):
                                return
                            record(study, trial, request, outcome, p_total, device,
                                   limits=options.limits, bandwidths=bandwidths)
                        if outcome.status in ("crash", "timeout"):  # a new worker
                            held = None
                        elif outcome.applied_budget is not None:
                            held = outcome.applied_budget
                        search.after_trial(study, prior, worker)  # may time matmuls again
                    with lock:
                        state["ran"] += 1
                        done = budget.spent(study)
                    if progress is not None:
                        progress(TrialEvent(trial.number, done, options.trials, trial.params,
                                            outcome, best_summary(study), p_total))
                with lock:  # the last worker to finish confirms the best, on its engine
                    state["serving"] -= 1
                    last = state["serving"] == 0
                if last and options.confirm and not errors and needs_confirmation(study):
                    doing[0] = "confirming the best over every decode step: "
                    with alone():
                        note = confirm_best(study, worker, options, total)
                    if note:
                        result.notes.append(note)
        except BaseException as e:  # surfaced in the calling thread below
            errors.append(e)
        finally:
            serving_ended.set()

    threads = [threading.Thread(target=serve, args=(d, e), daemon=True)
               for d, e in zip(options.devices, ended, strict=True)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                # Waking often: Python runs signal handlers in the main thread only, and when
                # the kernel hands SIGTERM to another thread, a main thread blocked in join()
                # for good would not stop the run until the trial ended.
                t.join(STOP_POLL_S)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: the running trials are failed now and
        # run again later
        # First, without a lock: a thread holding ``lock`` while it waits for the device ends
        # its wait on seeing this (device_lock.Cancelled), so that the lock comes free.
        state["interrupted"] = True
        # A process that goes on (a notebook, a script catching it) must not keep measuring
        # beside the next run: the workers stop now, and their threads with them.
        with workers_lock:
            for worker in workers:
                worker.abandon()
        with lock:  # no trial is being recorded meanwhile
            for number in resume.interrupt_own(study, f"the run was stopped ({stop_name(e)})"):
                result.notes.append(f"trial {number} was interrupted; it runs again on resume")
        deadline = time.monotonic() + WORKERS_GONE_S
        for event in ended:
            event.wait(max(0.0, deadline - time.monotonic()))
        raise
    result.ran = state["ran"]
    if errors:
        raise errors[0]
    if "stopped" in state:
        done, reason = state["stopped"]
        verb = "stopped" if reason.startswith(OUT_OF_REACH) else "converged"
        rest = f" (--no-early-stop runs all {options.trials})" if done < options.trials else ""
        result.notes.insert(0, f"{verb} after {done} trials: {reason}{rest}")
    return result


WORKERS_GONE_S = 15.0  # an interrupted run waits this long for its worker threads to end


def _kind_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {str: "text", int: "an integer", float: "a number", tuple: "a sequence",
             type(None): "None"}
    return " or ".join(words.get(k, k.__name__) for k in kinds)


def stop_reason(study: Any, options: RunOptions, prior: Any) -> str | None:
    """Why the study may stop before its trial budget (autotune sampler, early_stop;
    enqueued trials were asked for by name: they run first); None: it goes on."""
    if not options.early_stop or prior is None or options.sampler != "autotune":
        return None
    if any(t.state.name == "WAITING" for t in study.get_trials(deepcopy=False)):
        return None
    from autotune.tune.search import observations

    return prior.stop_reason(observations(study))


def needs_confirmation(study: Any) -> bool:
    """Whether the best trial was estimated and has not been measured over every step yet
    (a run stopped or killed before its final measurement leaves it so)."""
    try:
        best = study.best_trial
    except ValueError:
        return False
    done = study.user_attrs.get("confirmation")
    return (str(best.user_attrs.get("measurement", "")).startswith("estimated")
            and not (isinstance(done, dict) and done.get("trial") == best.number))


CONFIRM_TOLERANCE = 0.03  # the shortcut's allowed error (issue 5): beyond it, say so


def confirm_best(study: Any, worker: Any, options: RunOptions, total: int) -> str | None:
    """Measures the best trial over every decode step when its figures were estimated, and
    stores both as the study's ``confirmation``; returns a note for the user (None: nothing
    to confirm)."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    a = best.user_attrs
    if not str(a.get("measurement", "")).startswith("estimated"):
        return None
    request = replace(options.trial_request(a["batch"], a["budget_bytes"],
                                            a.get("precision")), repeats=1, decode_steps=None)
    outcome = worker.run(request)
    record: dict[str, Any] = {
        "trial": best.number, "batch": a["batch"], "budget_bytes": a["budget_bytes"],
        "status": outcome.status, "estimated_throughput_tok_s": best.value,
        "estimated_tpot_ms": a.get("tpot_ms"), "measurement": "full, 1 repeat",
    }
    if outcome.status != "ok":
        record["reason"] = outcome.reason
        study.set_user_attr("confirmation", record)
        return f"could not confirm trial {best.number} over every step: {outcome.reason}"
    m = outcome.measurement
    error = best.value / m[OBJECTIVE] - 1.0
    record.update(throughput_tok_s=round(m[OBJECTIVE], 3), tpot_ms=round(m["tpot_s"] * 1e3, 3),
                  ttft_ms=round(m["ttft_s"] * 1e3, 3), e2e_s=round(m["e2e_s"], 4),
                  estimate_error_pct=round(100 * error, 2),
                  within_tolerance=abs(error) <= CONFIRM_TOLERANCE,
                  tolerance_pct=100 * CONFIRM_TOLERANCE)
    study.set_user_attr("confirmation", record)
    note = (f"confirmed trial {best.number} over all {options.osl - 1} decode steps: "
            f"{m[OBJECTIVE]:.1f} tok/s measured, {best.value:.1f} estimated ({100 * error:+.1f}%)")
    if abs(error) > CONFIRM_TOLERANCE:
        note += (f"; that is beyond the {100 * CONFIRM_TOLERANCE:.0f}% the shortcut is allowed: "
                 "re-run with --decode-steps 0 to time every step")
    return note


def _record_study_attrs(study: Any, options: RunOptions, gpu_name: str, info: WorkerInfo) -> None:
    """The workload and environment, so that a recommendation says where it holds."""
    study.set_user_attr("workload", options.workload(gpu_name))
    study.set_user_attr("environment", info.environment)
    # Measured once at the study's start: every trial's fraction of the bound uses these.
    study.set_user_attr("bandwidths", study_bandwidths(info.engine, info.environment))
    study.set_user_attr("engine", info.engine)
    study.set_user_attr("total_device_budget", info.total_device_budget)
    if options.quantization != ("none",):
        study.set_user_attr("total_device_budgets", dict(info.total_device_budgets))
    study.set_user_attr("automatic_budget", info.automatic_budget)
    study.set_user_attr("storage", redact(options.storage))
    # What `autotune worker` needs to join: the budget and the options (password redacted).
    study.set_user_attr("trials", options.trials)
    study.set_user_attr("run_options", options_dict(options))


def options_dict(options: RunOptions) -> dict[str, Any]:
    return asdict(replace(options, storage=redact(options.storage)))
