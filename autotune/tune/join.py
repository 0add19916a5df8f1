"""Joining an existing study from another process or host (``autotune worker``).

A study started by ``autotune run`` stores its options (``run_options``, password redacted),
its workload and its trial budget (``trials``) in the study's user attributes. A joiner reads
them back, so that its trials measure the same workload: same model, engine, engine options,
dtype, lengths, memory limit, repeats and seed; only the devices are its own. It refuses to
join from a GPU of another model than the study's (trials of one study must be comparable), and
then runs trials until the budget is spent, claiming them exactly as :mod:`autotune.tune.budget`
describes.

Whoever can write the storage must not be able to run code on the workers: a joiner runs
only the engines autotune ships, plus those its own command line names (``--engine``), and
never takes from the storage an engine option naming something on its host (a cache
directory: where a pickle would be read from); it gives those itself (``--engine-option``).

This module does not create studies (``autotune run`` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from autotune.engines import BUILTIN, declared_options, engine_class
from autotune.errors import UserInputError
from autotune.measure.worker import WorkerInfo
from autotune.storage import load_study, open_storage, redact
from autotune.tune.study import RunOptions, RunResult, TrialEvent, resolve_gpu_name, run_study


def joined_options(run_options: dict[str, Any], *, storage: str, study_name: str, device: str,
                   gpus: tuple[int, ...], trials: int, engines: tuple[str, ...] = (),
                   host_options: tuple[tuple[str, Any], ...] = ()) -> RunOptions:
    """The study's stored options with this worker's storage URL, devices and host options.

    ``engines``: engines beyond the built-in ones this worker may run (its --engine)."""
    known = {f.name for f in dataclasses.fields(RunOptions)}
    kw = {k: v for k, v in run_options.items() if k in known}
    engine = kw.get("engine")
    if engine not in BUILTIN and engine not in engines:
        raise UserInputError(
            f"study {study_name!r} runs the engine {engine!r}, which this worker runs only if "
            f"its own command line allows it: autotune worker --engine {engine} ... (the "
            "storage alone never chooses code to import)")
    _, local = declared_options(engine_class(engine))
    given = [key for key, _ in host_options if key not in local]
    if given:
        raise UserInputError(
            f"--engine-option {given[0]}: a worker gives only its own host's options "
            f"({', '.join(sorted(local)) or 'none for this engine'}); the rest are the "
            "study's")
    stored = [tuple(pair) for pair in kw.get("engine_options", ()) if pair[0] not in local]
    kw["engine_options"] = (*stored, *host_options)
    kw.update(storage=storage, study_name=study_name, device=device, gpus=tuple(gpus),
              trials=trials, joined=True)
    return RunOptions(**kw)


def join_study(
    storage: str,
    study_name: str | None,
    *,
    device: str = "cuda",
    gpus: tuple[int, ...] = (),
    engines: tuple[str, ...] = (),
    host_options: tuple[tuple[str, Any], ...] = (),
    progress: Callable[[TrialEvent], None] | None = None,
    on_worker: Callable[[str, float, WorkerInfo | None], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> RunResult:
    """Runs trials of an existing study, from this host's devices, until its budget is spent
    (``progress``, ``on_worker`` and ``on_step`` as :func:`autotune.tune.study.run_study`'s)."""
    study = load_study(open_storage(storage, create=False), study_name)
    attrs = study.user_attrs
    if "run_options" not in attrs or "trials" not in attrs:
        raise UserInputError(
            f"study {study.study_name!r} in {redact(storage)} has no stored workload yet: start "
            "it with `autotune run --storage URL --study NAME`, and join once it reports its "
            "first trial"
        )
    options = joined_options(attrs["run_options"], storage=storage,
                             study_name=study.study_name, device=device, gpus=gpus,
                             trials=int(attrs["trials"]), engines=engines,
                             host_options=host_options)
    gpu_name = resolve_gpu_name(options)
    study_gpu = attrs.get("workload", {}).get("gpu")
    if gpu_name != study_gpu:
        raise UserInputError(
            f"this worker's device is {gpu_name!r} but study {study.study_name!r} measures "
            f"{study_gpu!r}; trials of one study must be comparable: join from a "
            f"{study_gpu} (--gpus/--device), or start a study of your own with `autotune run`"
        )
    return run_study(options, progress=progress, on_worker=on_worker, on_step=on_step)
