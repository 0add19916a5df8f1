"""The command line: each command calls one library function and returns an exit code.

User errors print one line (``error: ...``) and exit 2; ``--debug`` shows the traceback.
Progress goes to stderr one line per trial (so logs and pipes stay readable); results go to
stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from autotune import demo, stopping
from autotune.engines.memory import MIN_AUTO_BATCH, auto_max_batch
from autotune.errors import AutotuneError, UserInputError, stop_exit_code
from autotune.stdio import hold_closed, survivable
from autotune.storage import DEFAULT_STORAGE, redact
from autotune.units import format_bytes, parse_bytes

hold_closed()  # before anything opens a file: `autotune ... >&-` must not write into it


def _no_type_on_flags() -> None:
    """typer's help shows a type beside every option, flags too (``--json <bool>``), which
    reads as if a flag took a value: flags show none."""
    from typer import core

    shown = getattr(core.TyperOption, "display_type_rich", None)
    if shown is None:  # an older typer shows no types at all
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    core.TyperOption.display_type_rich = display_type_rich


_no_type_on_flags()
app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Find the best batch size and weight-streaming budget for LLM inference.",
)
# Wide enough for the tables when piped (rich assumes 80 columns without a terminal).
# markup off: our messages are plain text, and rich would eat "[tensorrt]" in an install hint.
out = Console(width=None if sys.stdout.isatty() else 160, markup=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160, markup=False)
_state = {"debug": False, "stopped": False}


def _version(value: bool) -> None:
    if value:
        from autotune import __version__

        out.print(f"autotune {__version__}", highlight=False)
        raise typer.Exit()


# Commands that never import Optuna: they do not pay its import (~0.3 s) to quiet its logs.
_WITHOUT_OPTUNA = frozenset({"models", "bench"})


@app.callback()
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="Print the version and exit."),
) -> None:
    _state["debug"] = debug
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat(debug))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler])
    if not debug:
        if ctx.invoked_subcommand not in _WITHOUT_OPTUNA:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


class _LogFormat(logging.Formatter):
    """autotune's own warnings read as its other lines do (``warning: ...``); a library's
    keep its name, so that it is clear whose they are. ``--debug`` names every logger."""

    def __init__(self, debug: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        if self.debug or not record.name.startswith("autotune"):
            return super().format(record)
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    from autotune import gpu

    return "cuda" if gpu.inventory() else "cpu"


def _resolve_model(model: str, device: str, weights: str | None = None) -> str:
    if model != "auto":
        return model
    if weights is not None:  # a checkpoint names itself (studies and JSON carry the name)
        # Its path as given, links not followed: a loop is --weights' own error to say.
        return Path(os.path.abspath(os.path.expanduser(weights))).name or "checkpoint"
    chosen = "tiny-llama" if device == "cpu" else "llama2-7b"
    say(f"--model auto: {chosen} ({'no GPU here' if device == 'cpu' else 'GPU'})")
    return chosen


def _default_max_batch(device: str, engine: str, model: str, weights: str | None, dtype: str,
                       isl: int, osl: int, gpu_memory_limit: int | None,
                       gpus: tuple[int, ...], engine_options: tuple[tuple[str, str], ...]) -> int:
    """CPU runs are demos and tests: their time grows with the batch, and nothing caps it.
    On a GPU, the native engine searches as far as the KV cache could fit (a grouped-query
    model on a large GPU runs well past 256). The tensorrt engine builds for its batch range
    and TensorRT reserves activations for the largest batch whatever the batch run (§2 of the
    research note): as many sequences as their cache could hold, at most 256, so no memory is
    reserved for batches that cannot fit (with ``attention=torch``, no engine holds a cache
    copy). Other engines keep 256."""
    if device == "cpu":
        return 64
    if engine not in ("native", "tensorrt"):
        return MIN_AUTO_BATCH
    from autotune import gpu
    from autotune.engines.memory import trt_max_batch
    from autotune.models import get_spec

    first = f"cuda:{gpus[0]}" if gpus else device
    memory = gpu_memory_limit or gpu.device_info(first).total_bytes
    spec = get_spec(model, weights)
    if engine == "tensorrt":
        from autotune.engines._trt_build import parse_attention, resolve_attention

        # auto: by the installed Torch-TensorRT's version, read without importing it.
        attention = resolve_attention(parse_attention(dict(engine_options).get("attention",
                                                                               "auto")))
        return trt_max_batch(spec, dtype, isl + osl, memory, attention == "tensorrt")
    return auto_max_batch(spec, dtype, isl + osl, memory)


def _resolve_dtype(dtype: str, device: str) -> str:
    """auto: float16 on a GPU; float32 on CPU, where half precision is slow and inexact."""
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "float16"


def _memory(text: str | None, what: str) -> int | None:
    return parse_bytes(text, what=what) if text is not None else None


def _gpus(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError as e:
        raise UserInputError(f"--gpus: expected GPU indices such as 0,1; got {text!r}") from e
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise UserInputError(f"--gpus: expected distinct non-negative indices; got {text!r}")
    return ids


def _precisions(text: str) -> tuple[str, ...]:
    from autotune.precision import parse_precisions

    return parse_precisions(text)


def _engine_options(items: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--engine-option: expected KEY=VALUE; got {item!r}")
        pairs.append((key.strip(), value))
    return tuple(pairs)


@app.command()
def run(
    model: str = typer.Option("auto", help="Model preset (see `autotune models`); auto: "
                              "llama2-7b on a GPU; without one, the demo (a replay of a "
                              "landscape measured on an H100); with --weights, the "
                              "checkpoint's folder name."),
    engine: str = typer.Option("native", help="native, tensorrt, or package.module:Class."),
    trials: int = typer.Option(20, help="Finished trials the study should have."),
    isl: int | None = typer.Option(
        None, show_default=False, help="Input (prompt) length, tokens (default: 128; a "
        "replayed landscape's own)."),
    osl: int | None = typer.Option(
        None, show_default=False, help="Output length, tokens, exactly: no stop at EOS "
        "(default: 256; a replayed landscape's own)."),
    gpu_memory_limit: str | None = typer.Option(
        None, help="Emulate a smaller GPU: cap device memory, e.g. 8GiB (default: the GPU's; "
        "a replayed landscape's own)."),
    max_batch: int | None = typer.Option(
        None, help="Largest batch size searched (default on a GPU: as many sequences as "
                   "the KV cache could hold in the memory, 256 to 2048, native engine; "
                   "tensorrt: as many as fit with each cache counted twice (once with "
                   "attention in PyTorch, its default up to Torch-TensorRT 2.12), at most "
                   "256; 256 for others; 64 on CPU; a landscape's own)."),
    storage: str = typer.Option(DEFAULT_STORAGE, help="Optuna storage URL."),
    study: str | None = typer.Option(None, help="Study name (default: from the workload)."),
    device: str = typer.Option("auto", help="cuda, cuda:N, cpu, or auto."),
    gpus: str | None = typer.Option(None, help="GPU indices, one worker each: 0,1,2"),
    dtype: str = typer.Option("auto", help="float16, bfloat16, float32; auto: float16 on "
                              "a GPU, float32 on CPU."),
    seed: int = typer.Option(0, help="Seed of the sampler, the weights and the prompts."),
    weights: str | None = typer.Option(None, help="Local Hugging Face checkpoint dir."),
    repeats: int = typer.Option(3, help="Timed repeats per trial (median reported)."),
    trial_timeout: float = typer.Option(900.0, help="Seconds before a trial counts as hung."),
    out_file: Path | None = typer.Option(
        None, "--out", help="Recommendation JSON path (default, unless only --landscape is "
        "asked for: studies/<study>.json, where autotune run writes it)."),
    engine_option: list[str] = typer.Option(
        [], "--engine-option", metavar="KEY=VALUE", help="KEY=VALUE passed to the engine (repeatable)."),
    max_tpot_ms: float | None = typer.Option(
        None, help="Limit on time per output token (ms): a constraint, not the objective."),
    max_ttft_ms: float | None = typer.Option(None, help="Limit on time to first token (ms)."),
    max_latency_s: float | None = typer.Option(
        None, help="Limit on end-to-end latency of a request (s)."),
    sampler: str = typer.Option(
        "autotune", help="autotune (the measured-hardware prior), tpe, random, gp, or grid "
        "(batch powers of two and midpoints x budget in 10% steps: records a landscape)."),
    landscape: Path | None = typer.Option(
        None, help="Replay a recorded landscape (the landscape engine, on CPU, instantly)."),
    decode_steps: int = typer.Option(
        32, help="Decode steps timed per trial, the rest of --osl extrapolated: exact for "
        "engines whose steps are alike (native with CUDA graphs), a window centred on the "
        "generation's middle where steps grow linearly (native attention=triton*); others "
        "time every step. 0: every step."),
    early_stop: bool = typer.Option(
        True, help="Stop before --trials once the autotune sampler's model has converged."),
    confirm: bool = typer.Option(
        True, help="Measure the best over every decode step at the end, when it was estimated."),
    quantization: str = typer.Option(
        "none", help="Weight precision: none (the --dtype), int8 or fp8 (8-bit weight-only, "
        "per-channel scales; fp8 needs compute capability 8.9+; native engine only), or a "
        "comma list (none,int8,fp8) to search precision as a third parameter."),
) -> None:
    """Tune batch size x weight-streaming budget; resumes the study if it exists."""
    from autotune import jsonfile
    from autotune.results import recommend
    from autotune.tune.study import RunOptions, run_study

    if gpus and device == "auto":
        device = "cuda"  # GPUs were named: no quiet fallback to the CPU
    if landscape is None and device != "cuda" and (model, weights, engine) == (
            "auto", None, "native") and _resolve_device(device) == "cpu":
        # No GPU and nothing asked for: the demo, a replay of a GPU's landscape (demo.py).
        landscape, demo_chosen = demo.LANDSCAPE, True
        if (max_tpot_ms, max_ttft_ms, max_latency_s) == (None, None, None):
            max_tpot_ms = demo.MAX_TPOT_MS
    else:
        demo_chosen = False
    recorded = None
    if landscape is not None:  # shorthand for --engine landscape --engine-option landscape=F
        engine = "landscape" if engine == "native" else engine
        engine_option = [*engine_option, f"landscape={landscape}"]
        device = "cpu" if device == "auto" else device
        from autotune.landscape import read

        recorded = read(landscape)
        wl = recorded.workload
        model = wl.get("model", model) if model == "auto" else model
        dtype = wl.get("dtype", dtype) if dtype == "auto" else dtype
        isl = recorded.isl if isl is None else isl
        osl = recorded.osl if osl is None else osl
        if gpu_memory_limit is None and wl.get("gpu_memory_limit"):
            gpu_memory_limit = str(wl["gpu_memory_limit"])  # the edge it was recorded with
        if max_batch is None:  # the recorded grid's reach
            max_batch = wl.get("max_batch")
    isl = 128 if isl is None else isl
    osl = 256 if osl is None else osl
    device = _resolve_device(device)
    model = _resolve_model(model, device, weights)
    dtype = _resolve_dtype(dtype, device)
    limit, gpu_ids = _memory(gpu_memory_limit, "--gpu-memory-limit"), _gpus(gpus)
    options = RunOptions(
        model=model, engine=engine, trials=trials, isl=isl, osl=osl, gpu_memory_limit=limit,
        max_batch=max_batch if max_batch is not None else _default_max_batch(
            device, engine, model, weights, dtype, isl, osl, limit, gpu_ids,
            _engine_options(engine_option)),
        storage=storage, study_name=study, device=device, gpus=gpu_ids, dtype=dtype,
        seed=seed, weights=weights, repeats=repeats, trial_timeout_s=trial_timeout,
        engine_options=_engine_options(engine_option), max_tpot_ms=max_tpot_ms,
        max_ttft_ms=max_ttft_ms, max_latency_s=max_latency_s, sampler=sampler,
        decode_steps=_decode_steps(decode_steps), early_stop=early_stop, confirm=confirm,
        quantization=_precisions(quantization),
    )
    # Before any trial: an export that cannot be written, or would be written over one of the
    # run's inputs, is found now, not after the study.
    from autotune.tune.study import check_study_name, default_study_name, resolve_gpu_name

    name = study or default_study_name(options, resolve_gpu_name(options))
    check_study_name(name)
    target = jsonfile.check_writable(out_file or recommend.default_path(name))
    replayed = dict(options.engine_options).get("landscape")  # --landscape, or its option
    jsonfile.check_outputs({"--out": target}, _inputs(storage, replayed, weights))
    tag = demo.label(options.workload(""))
    if recorded is not None:
        say(demo.first_line(recorded, limit=limit, chosen=demo_chosen))
        if demo_chosen and max_tpot_ms == demo.MAX_TPOT_MS:
            say(f"{tag}with --max-tpot-ms {demo.MAX_TPOT_MS:g}, so that the best lies inside the "
                "space; on a GPU, autotune run tunes llama2-7b itself")
    else:
        say(f"autotune: {model} on {device} ({engine} engine, {dtype}, isl {isl}, osl {osl})"
            + ("; no GPU here: CPU figures demonstrate the tool, not a GPU" if device == "cpu"
               else ""))
    say(f"{tag}loading the model in a worker...")
    with _stoppable(storage, name):
        result = run_study(options, progress=lambda e: _print_progress(e, tag),
                           on_worker=lambda *a: _print_worker(*a, tag=tag),
                           on_step=lambda text: _print_step(tag + text))
    for note in result.notes:
        say(tag + note)
    from autotune.storage import close_storage, load_study, open_storage

    stored = load_study(open_storage(storage, create=False), result.study_name)
    try:
        rec = recommend.build(stored)
        path = recommend.write(rec, target)  # first: it is the result, stdout only shows it
        _print_trials(stored, limit=10, title=f"best configurations of {result.study_name}")
        _print_edge(stored)
    finally:
        close_storage(stored._storage)
    best = rec["best"]
    out.print(
        f"{tag}best: batch {best['batch']}, budget {format_bytes(best['device_budget_bytes'])} "
        f"({100 * best['budget_fraction']:.0f}%), {best['throughput_tok_s']:.1f} tok/s"
        + (_precision_note(best) if "by_precision" in rec else ""),
        highlight=False)
    out.print(f"{tag}why: {rec['explanation']['text']}", highlight=False, soft_wrap=True)
    out.print(f"{tag}recommendation written to {path}; every trial is stored in "
              f"{redact(storage)} (study {result.study_name})", highlight=False, soft_wrap=True)
    out.print(f"{tag}to serve it: autotune.deploy.apply({str(path)!r}, model) sets its budget on "
              f"your weight-streaming model; serve batch {best['batch']} "
              "(docs/python-api.md)", highlight=False, soft_wrap=True)


@app.command()
def worker(
    storage: str = typer.Option(..., help="The study's storage URL (PostgreSQL across hosts)."),
    study: str | None = typer.Option(None, help="Study name (default: the only one)."),
    device: str = typer.Option("auto", help="cuda, cuda:N, cpu, or auto."),
    gpus: str | None = typer.Option(None, help="GPU indices, one worker each: 0,1,2"),
    engine: list[str] = typer.Option(
        [], "--engine", help="An engine beyond the built-in ones (package.module:Class) this "
        "worker may run when the study names it (repeatable): the storage never chooses code "
        "to import on its own."),
    engine_option: list[str] = typer.Option(
        [], "--engine-option", metavar="KEY=VALUE", help="KEY=VALUE of this host (a cache directory: "
        "trt_cache_dir), never taken from the storage (repeatable)."),
) -> None:
    """Join a study that `autotune run` started, and run its trials until its budget is spent."""
    from autotune.tune.join import join_study

    with _stoppable(storage, study):
        device = "cuda" if gpus and device == "auto" else _resolve_device(device)
        result = join_study(storage, study, device=device, gpus=_gpus(gpus),
                            engines=tuple(engine), host_options=_engine_options(engine_option),
                            progress=_print_progress, on_worker=_print_worker, on_step=say)
    for note in result.notes:
        err.print(note)
    out.print(f"worker done: ran {result.ran} trials of {result.study_name}")


def _inputs(storage: str, landscape: str | Path | None = None,
            weights: str | None = None) -> dict[str, Path]:
    """What a command reads, by what it is: its outputs must not be any of these."""
    from autotune.storage import sqlite_files

    inputs = sqlite_files(storage)
    if landscape is not None:
        inputs["the landscape"] = Path(landscape)
    if weights is not None:
        inputs["the checkpoint folder"] = Path(weights)
    return inputs


def _replayed(study: Any) -> str | None:
    """The landscape file a study replays, if it does (its export must not overwrite it)."""
    options = study.user_attrs.get("run_options")
    pairs = options.get("engine_options") if isinstance(options, dict) else None
    found = [p[1] for p in pairs or [] if isinstance(p, list) and len(p) == 2
             and p[0] == "landscape" and isinstance(p[1], str)]
    return found[0] if found else None


def _decode_steps(steps: int) -> int | None:
    if steps < 0:
        raise UserInputError(f"--decode-steps: expected 0 (every step) or more; got {steps}")
    return steps or None


@contextlib.contextmanager
def _stoppable(storage: str, study: str | None) -> Iterator[None]:
    """Ctrl-C stops a study cleanly: say what is kept and how to go on (typer would exit 130
    without a word)."""
    try:
        yield
    except KeyboardInterrupt as e:
        # After this line, threads still winding down (a worker's query cut short) have
        # nothing to tell: their words would read as if the run went on.
        _state["stopped"] = True
        logging.disable(logging.CRITICAL)
        err.print(stopping.stop_line(e, storage, study), highlight=False, soft_wrap=True)
        raise typer.Exit(stop_exit_code(e)) from None


def say(text: str) -> None:
    """A progress line (stderr), as written: no highlighting, no wrapping of long lines."""
    err.print(text, highlight=False, soft_wrap=True)


def _print_step(text: str) -> None:
    if not _state.get("stopped"):
        say(text)


def _print_worker(device: str, seconds: float, info: Any, tag: str = "") -> None:
    if _state.get("stopped"):
        return
    if info is None:
        say(f"{tag}{device}: still loading the model ({seconds:.0f} s)...")
        return
    link = info.environment.get("h2d_gb_s")
    totals = getattr(info, "total_device_budgets", None) or {}
    weights = (", ".join(f"{p} {format_bytes(v)}" for p, v in totals.items())
               if len(totals) > 1 or set(totals) - {"none"}
               else format_bytes(info.total_device_budget))
    say(f"{tag}{device}: engine loaded in {info.load_s:.1f} s, "
        f"{weights} of streamable weights"
        + (f"; host-to-device {link:.1f} GB/s" if link else ""))
    summary = info.engine.get("summary")
    if summary:  # the engine's own line: how it was built or loaded
        say(f"{tag}{device}: {summary}")


def _print_progress(event: Any, tag: str = "") -> None:
    if _state.get("stopped"):
        return
    o, p = event.outcome, event.params
    asked = 100 * p["budget_fraction"]
    line = f"{tag}trial {event.done}/{event.total} (#{event.number}): batch {p['batch']}, budget {asked:.0f}%"
    if "precision" in p:  # precision searched as a parameter
        line += f", {p['precision']}"
    if o.applied_budget is not None and event.total_device_budget:
        applied = 100 * o.applied_budget / event.total_device_budget
        if round(applied) != round(asked):  # engines round budgets down to whole units
            line += f" ({applied:.0f}% applied)"
    line += " -> "
    if o.status == "ok":
        line += f"{o.measurement['throughput_tok_s']:.1f} tok/s"
        if o.measurement.get("estimated"):
            line += f" (est. from {o.measurement['decode_steps_timed']} steps)"
    else:
        line += f"{o.status}: {o.reason}"
    if o.budget_changed and (o.budget_change_s or 0) >= 0.5:  # what the trial paid besides
        line += f" (+{o.budget_change_s:.1f} s to change the budget)"
    if event.best:
        line += (f"  | best #{event.best['number']}: {event.best['throughput_tok_s']:.1f} tok/s "
                 f"(batch {event.best['batch']}, {event.best['budget_pct']:.0f}%"
                 + (f", {event.best['precision']}" if "precision" in event.best else "") + ")")
    say(line)


def _print_edge(study: Any) -> None:
    """Where the memory limit cuts the space: the largest batch that fits at each budget,
    from the engine's memory plans (the prior's; absent without one)."""
    from autotune.results import recommend

    edge = recommend.edge_by_tenths(study.user_attrs.get("memory_edge"))
    if not edge:
        return
    tag = demo.label(study.user_attrs.get("workload"))
    cells = [(f"{pct:g}%", str(b) if b else "-")
             for pct, b in zip(edge["budget_pct"], edge["max_batch"], strict=True)]
    width = max(len(x) for c in cells for x in c)
    out.print(f"{tag}memory plan: the largest batch that fits at each budget "
              f"({format_bytes(edge['available_bytes'])} available)", highlight=False)
    out.print(f"{tag}  budget " + " ".join(c[0].rjust(width) for c in cells), highlight=False)
    out.print(f"{tag}  batch  " + " ".join(c[1].rjust(width) for c in cells), highlight=False)


def _budget_cell(attrs: dict[str, Any]) -> str:
    """A trial's budget as applied ("71% 3.00 MiB"); empty for a trial that has none."""
    from autotune.tune.study import budget_shown

    if "budget_pct" not in attrs:
        return ""
    nbytes, pct = budget_shown(attrs)
    return f"{pct:.0f}% {format_bytes(nbytes)}"


def _bound_cell(attrs: dict[str, Any]) -> str:
    """The trial's fraction of its bound and what sets it ("99 link"); empty without one."""
    if attrs.get("bound_fraction") is None:
        return ""
    return f"{100 * attrs['bound_fraction']:.0f} {attrs.get('bound_by', '')}".strip()


def _print_trials(study: Any, limit: int | None = None, title: str = "") -> None:
    trials = study.get_trials(deepcopy=False)

    def over(t: Any) -> list[str]:  # latency limits a measured trial broke
        return [k.removesuffix("_ms").removesuffix("_s") for k, v in (t.constraints or {}).items()
                if k != "memory_gib" and v > 0]

    # Feasible trials first, fastest first: the first row is the recommendation.
    ranked = sorted(trials, key=lambda t: (t.value is None, bool(over(t)), -(t.value or 0)))
    tag = demo.label(study.user_attrs.get("workload"))
    table = Table(title=tag + (title or study.study_name),
                  caption=f"{tag}figures replayed from a landscape measured on a GPU, not measured "
                          "here" if tag else None)
    quantized = _quantized(study)
    cols = ["#", "batch", "budget", "status", "tok/s", "TTFT ms", "TPOT ms",
            "bound %", "peak GiB", "pred GiB", "reason"]
    if quantized:
        cols.insert(3, "weights")
    for col in cols:
        table.add_column(col, justify="right" if col not in ("status", "reason", "weights")
                         else "left")
    for t in ranked[:limit]:
        a = t.user_attrs
        table.add_row(
            str(t.number), str(a.get("batch", "")),
            _budget_cell(a),
            *([a.get("precision", "none")] if quantized else []),
            tag + a.get("status", t.state.name.lower())
            + (f" (over {', '.join(over(t))} limit)" if over(t) else ""),
            f"{a['throughput_tok_s']:.1f}" if "throughput_tok_s" in a else "",
            f"{a['ttft_ms']:.1f}" if "ttft_ms" in a else "",
            f"{a['tpot_ms']:.2f}" if "tpot_ms" in a else "",
            _bound_cell(a),
            f"{a['peak_memory_gib']:.2f}" if "peak_memory_gib" in a else "",
            f"{a['predicted_peak_gib']:.2f}" if "predicted_peak_gib" in a else "",
            (a.get("reason") or "")[:60],
        )
    out.print(table)
    if quantized:
        _print_precisions(study)


def _precision_note(best: dict[str, Any]) -> str:
    """The best's weights and, for 8-bit ones, their accuracy against 16-bit."""
    note = f", {best.get('precision', 'none')} weights"
    acc = best.get("accuracy") or {}
    if "top1_agreement" in acc:
        note += (f" (top-1 agreement with 16-bit {100 * acc['top1_agreement']:.1f}%, "
                 f"first-step logits error {acc['logits_rel_error']:.3g}, on "
                 f"{acc.get('weights', 'these')} weights)")
    return note


def _quantized(study: Any) -> bool:
    """Whether the study measured 8-bit weights (--quantization other than none)."""
    from autotune.results.recommend import quantized

    return quantized(study.user_attrs)


def _print_precisions(study: Any) -> None:
    """The best per precision, with its accuracy beside it (the recommendation's
    ``by_precision``)."""
    from autotune.results import recommend

    rows = recommend.by_precision(study)
    if not rows:
        return
    table = Table(title="best per precision (accuracy: vs 16-bit on the same prompts)")
    for col in ("weights", "#", "batch", "budget", "tok/s", "x 16-bit", "bound %",
                "top-1 agree", "logits err", "accuracy"):
        table.add_column(col, justify="left" if col in ("weights", "accuracy") else "right")
    for p, row in rows.items():
        acc = row.get("accuracy") or {}
        best = row.get("best")
        table.add_row(
            p, str(best["trial"]) if best else "", str(best["batch"]) if best else "",
            f"{100 * best['budget_fraction']:.0f}%" if best else "",
            f"{best['throughput_tok_s']:.1f}" if best else "none feasible",
            f"{row['speedup_vs_none']:.2f}" if row.get("speedup_vs_none") else "",
            f"{100 * best['bound_fraction']:.0f}" if best and best.get("bound_fraction") else "",
            f"{100 * acc['top1_agreement']:.1f}%" if "top1_agreement" in acc else "",
            f"{acc['logits_rel_error']:.3g}" if "logits_rel_error" in acc else "",
            acc.get("status", "") if acc.get("status") != "ok" else
            ("16-bit itself" if p == "none" else f"{acc.get('weights', '')} weights"),
        )
    out.print(table)


@app.command()
def models() -> None:
    """The model presets and their sizes."""
    out.print(_models_table())


def _models_table() -> Table:
    from autotune.models import PRESETS

    # Narrow enough for an 80-column terminal: sizes in fp16, GQA = grouped-query attention.
    table = Table(title="models (public configs; random weights unless --weights)",
                  caption="sizes in fp16; GQA: grouped-query attention")
    for col in ("name", "params", "weights", "layer", "KV/token", "about"):
        table.add_column(col, justify="left" if col in ("name", "about") else "right",
                         no_wrap=True)
    for spec in PRESETS.values():
        table.add_row(
            spec.name, _count(spec.distinct_params()), format_bytes(spec.weight_bytes("float16")),
            format_bytes(spec.layer_params() * 2), format_bytes(spec.kv_bytes_per_token("float16")),
            spec.description,
        )
    return table


@app.command()
def bench(
    model: str = typer.Option(..., help="Model preset (see `autotune models`)."),
    batch: int = typer.Option(..., help="Batch size (sequences generated at once)."),
    budget: str | None = typer.Option(None, help="Device budget: bytes or a size (4GiB)."),
    budget_fraction: float | None = typer.Option(None, help="Budget as a fraction 0..1."),
    engine: str = typer.Option("native", help="native, tensorrt, or package.module:Class."),
    isl: int = typer.Option(128, help="Input (prompt) length, tokens."),
    osl: int = typer.Option(256, help="Output length, tokens (exactly; no stop at EOS)."),
    dtype: str = typer.Option("auto", help="float16, bfloat16, float32, or auto."),
    device: str = typer.Option("auto", help="cuda, cuda:N, cpu, or auto."),
    gpu_memory_limit: str | None = typer.Option(
        None, help="Emulate a smaller GPU: cap device memory, e.g. 8GiB."),
    weights: str | None = typer.Option(None, help="Local Hugging Face checkpoint dir "
                                       "(default: random weights, the same speed)."),
    seed: int = typer.Option(0, help="Seed of the weights and the prompts."),
    repeats: int = typer.Option(3, help="Timed repeats (median reported)."),
    warmup: int = typer.Option(1, help="Untimed warm-up generations before timing."),
    as_json: bool = typer.Option(False, "--json", help="Print the measurement as JSON."),
    quantization: str = typer.Option(
        "none", help="Weight precision: none (the --dtype), int8 or fp8 (8-bit weight-only; "
        "native engine)."),
    engine_option: list[str] = typer.Option(
        [], "--engine-option", metavar="KEY=VALUE", help="KEY=VALUE passed to the engine (repeatable), as in run."),
) -> None:
    """Measure one configuration (prints a SHA-256 of the generated token ids)."""
    from autotune.measure.bench import run_bench

    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    if (budget is None) == (budget_fraction is None):
        raise UserInputError("bench: give exactly one of --budget BYTES or --budget-fraction F")
    if budget_fraction is not None and not 0.0 <= budget_fraction <= 1.0:
        raise UserInputError(f"--budget-fraction: expected 0..1; got {budget_fraction}")
    result = run_bench(
        model=model, engine=engine, batch=batch, isl=isl, osl=osl, dtype=dtype,
        device=device, seed=seed, weights=weights, repeats=repeats,
        warmup=warmup, gpu_memory_limit=_memory(gpu_memory_limit, "--gpu-memory-limit"),
        budget=None if budget is None else _budget_bytes(budget),
        budget_fraction=budget_fraction, quantization=_one_precision(quantization),
        options=_engine_options(engine_option),
    )
    if as_json:
        out.print_json(json.dumps(result))
        return
    m = result["measurement"]
    out.print(
        f"{model} batch {m['batch']} budget {format_bytes(m['device_budget'])} "
        f"({100 * m['budget_fraction']:.1f}% of {format_bytes(m['total_device_budget'])}): "
        f"{m['throughput_tok_s']:.2f} tok/s, TTFT {1e3 * m['ttft_s']:.1f} ms, "
        f"TPOT {1e3 * m['tpot_s']:.2f} ms, streamed {format_bytes(m['streamed_bytes_per_step'])}"
        f"/step at {m['stream_gb_s']:.1f} GB/s"
    )
    plan = result["memory_plan"]
    peak = m.get("peak_device_bytes") or m["peak_reserved_bytes"]
    out.print(f"memory: predicted {format_bytes(plan['total'])}"
              + (f", measured peak {format_bytes(peak)}" if peak else ""))
    out.print(f"tokens sha256 {m['tokens_sha256']}")


def _one_precision(text: str) -> str:
    precisions = _precisions(text)
    if len(precisions) != 1:
        raise UserInputError(f"--quantization: bench measures one precision; got {text!r}")
    return precisions[0]


def _count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M"


def _budget_bytes(text: str) -> int:
    if text.strip() == "0":
        return 0
    return parse_bytes(text, what="--budget")


@app.command()
def show(
    storage: str = typer.Option(DEFAULT_STORAGE, help="Optuna storage URL."),
    study: str | None = typer.Option(None, help="Study name (default: the only one)."),
    as_json: bool = typer.Option(False, "--json", help="Print the study and its trials as "
                                 "JSON (every attribute) instead of a table."),
) -> None:
    """The trials of a stored study, best first."""
    from autotune.storage import load_study, open_storage

    stored = load_study(open_storage(storage, create=False, read_only=True), study)
    if as_json:
        from autotune import jsonfile

        sys.stdout.write(jsonfile.dumps(_study_json(stored), indent=1) + "\n")
        return
    _print_trials(stored)


def _study_json(study: Any) -> dict[str, Any]:
    """A study as plain JSON: its attributes and every trial, in trial order."""
    from autotune import __version__

    trials = [{
        "number": t.number, "state": t.state.name,
        "value": t.value, "params": t.params, "constraints": t.constraints,
        "started": t.datetime_start.isoformat() if t.datetime_start else None,
        "completed": t.datetime_complete.isoformat() if t.datetime_complete else None,
        "attrs": t.user_attrs,
    } for t in study.get_trials(deepcopy=False)]
    return {"autotune_version": __version__, "study": study.study_name,
            "attrs": study.user_attrs, "trials": trials}


@app.command()
def export(
    storage: str = typer.Option(DEFAULT_STORAGE, help="Optuna storage URL."),
    study: str | None = typer.Option(None, help="Study name (default: the only one)."),
    out_file: Path | None = typer.Option(
        None, "--out", help="Recommendation JSON path (default, unless only --landscape is "
        "asked for: studies/<study>.json, where autotune run writes it)."),
    landscape: Path | None = typer.Option(
        None, "--landscape", help="Also (or instead) write the study's grid as a landscape "
        "file (a grid study: autotune run --sampler grid)."),
) -> None:
    """Write the JSON recommendation of a stored study, or its landscape."""
    from autotune import jsonfile
    from autotune.results import recommend
    from autotune.storage import load_study, open_storage

    stored = load_study(open_storage(storage, create=False, read_only=True), study)
    if out_file is None and landscape is None:
        out_file = recommend.default_path(stored.study_name)
    outputs = {flag: jsonfile.check_writable(path, flag)
               for flag, path in (("--out", out_file), ("--landscape", landscape)) if path}
    jsonfile.check_outputs(outputs, _inputs(storage, _replayed(stored)))
    if landscape is not None:
        from autotune import landscape as landscape_mod
        from autotune.results.landscape import from_study

        command = "autotune " + " ".join(sys.argv[1:]) if sys.argv else None
        data = from_study(stored, command=command)
        ok = sum(p["status"] == "ok" for p in data["points"])
        out.print(f"landscape written to {landscape_mod.write(data, landscape)} "
                  f"({len(data['batches'])} batches x {len(data['budget_fractions'])} budgets, "
                  f"{ok} measured)")
    if out_file is not None:
        rec = recommend.build(stored)
        out.print(f"recommendation written to {recommend.write(rec, out_file)}")


@app.command()
def dashboard(
    storage: str = typer.Option(DEFAULT_STORAGE, help="Optuna storage URL."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (loopback by default)."),
    port: int = typer.Option(8080, help="Port."),
) -> None:
    """Serve optuna-dashboard on the study storage (readable while a study runs)."""
    from autotune.results.dashboard import serve

    # The server holds no trial, so SIGTERM/SIGHUP keep their default (exit at once): raised as
    # an exception inside optuna-dashboard's request code, a stop could be swallowed there, and
    # the server, now ignoring the signal, would never stop.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # every press stops it
    serve(storage, host=host, port=port, log=err.print)


@app.command()
def report(
    storage: str = typer.Option(DEFAULT_STORAGE, help="Optuna storage URL."),
    study: str | None = typer.Option(None, help="Study name (default: the only one)."),
    out_dir: Path = typer.Option(..., "--out", help="Directory for the PNGs and report.html."),
) -> None:
    """Draw a stored study: throughput landscape, Pareto front, progress (PNG + one HTML)."""
    from autotune import jsonfile
    from autotune.results.report import report_paths, write_report
    from autotune.storage import load_study, open_storage

    for path in report_paths(out_dir):
        jsonfile.check_outputs({"--out": path}, _inputs(storage))
    stored = load_study(open_storage(storage, create=False, read_only=True), study)
    files = write_report(stored, out_dir)
    for path in files.pngs.values():
        out.print(f"wrote {path}")
    out.print(f"report written to {files.html}")


def main(argv: list[str] | None = None) -> int:
    stopping.install()
    _state["stopped"] = False
    logging.disable(logging.NOTSET)
    with survivable():  # a reader gone from stdout or stderr ends nothing: the work goes on
        return _main_command(argv)


def _main_command(argv: list[str] | None) -> int:
    try:
        # Standalone mode: typer reports its own usage errors (exit code 2) and --help.
        app(args=argv, standalone_mode=True, prog_name="autotune")
    except AutotuneError as e:
        if _state["debug"]:
            raise
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as e:
        err.print("interrupted; completed trials are stored, rerun the command to resume")
        return stop_exit_code(e)
    except Exception as e:  # a database's own words (locked, disk full...) made clear
        from autotune.storage import explain

        known = explain(e)
        if known is None or _state["debug"]:
            raise
        err.print(f"error: {known}", highlight=False, soft_wrap=True)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
