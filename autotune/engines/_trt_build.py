"""How a Torch-TensorRT module is built: version checks, export and compile options.

Free functions used by :mod:`autotune.engines.tensorrt`; section numbers refer to
``research/torch-tensorrt-weight-streaming.md``. Nothing here runs a model or sets a budget,
and torch_tensorrt is imported only inside :func:`import_torch_tensorrt`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from autotune.engines.base import EngineConfig, int_option
from autotune.errors import EngineUnavailableError, UserInputError
from autotune.models import ModelSpec, torch_dtype, weight_source

MIN_VERSION = (2, 6)  # weight streaming appeared in 2.6 (§0)
# From 2.13 use_python_runtime is a no-op: attention=torch's contexts can no longer share one
# buffer (python_runtime_shares), so auto keeps attention in TensorRT there.
PYTHON_RUNTIME_UNTIL = (2, 13)
# Both builds serve one engine: Torch-TensorRT loads either backend behind one ``tensorrt``
# module (its _TensorRTProxyModule), and the study records which one ran.
_INSTALL = (
    "pip install 'autotune[tensorrt-rtx]' (TensorRT-RTX, from PyPI), or pip install "
    "'autotune[tensorrt]' --extra-index-url https://pypi.nvidia.com (data-center TensorRT, "
    "whose wheels come from NVIDIA's index); the torch_tensorrt build must match your torch"
)


# Tokens of the whole batch in one prefill call (batch x chunk). TensorRT sizes a context's
# activation memory for the largest shape of its profile (§2), and one profile is a box: a
# profile serving [max_batch, isl] calls reserves activations for max_batch x isl tokens
# whatever the batch run (7.3 GiB for llama2-7b at batch 32, isl 383: more than the weights
# it streams). So the batch's prompts go through in chunks of tokens, every call at most
# this many tokens, and the box's corner stays [max_batch, chunk]. A chunk costs one more
# pass over the streamed weights; at 1024 tokens a 7B call holds about 0.5 GiB and a study's
# prefill takes a few percent of its generation.
PREFILL_CALL_TOKENS = 1024


@dataclass(frozen=True)
class BuildShapes:
    """The optimization profile one compiled module serves (§2: min/opt/max).

    ``seq`` is the tokens of one call: with the KV cache, 1 (a decode step) up to the prefill
    chunk (the prompt goes through in chunks against a static cache of ``cache_len`` slots);
    without it, the whole sequence so far (up to ``cache_len`` tokens), as Torch-TensorRT's
    example runs."""

    min_batch: int
    opt_batch: int
    max_batch: int
    min_seq: int
    opt_seq: int
    max_seq: int
    cache_len: int
    kv_cache: bool

    @classmethod
    def from_config(cls, config: EngineConfig, kv_cache: bool) -> BuildShapes:
        length = config.max_seq_len
        prompt = config.max_prompt_len or length - 1
        chunk = max(1, min(prompt, PREFILL_CALL_TOKENS // config.max_batch))
        max_seq = int_option(config, "prefill_chunk", chunk) if kv_cache else length
        # TensorRT tunes kernels for opt (§2). With a cache nearly every call is a decode
        # step (T = 1), so that is where the kernels should be fast.
        opt_batch = int_option(config, "opt_batch", config.max_batch)
        opt_seq = int_option(config, "opt_seq_len", 1 if kv_cache else max_seq)
        if not (1 <= opt_batch <= config.max_batch and 1 <= opt_seq <= max_seq < length + 1):
            raise UserInputError(
                f"opt_batch/opt_seq_len/prefill_chunk: expected 1..{config.max_batch} and "
                f"1 <= opt_seq_len <= prefill_chunk <= {length}; got {opt_batch}, {opt_seq} "
                f"and {max_seq}"
            )
        return cls(1, opt_batch, config.max_batch, 1, opt_seq, max_seq, length, kv_cache)

    def as_dict(self) -> dict[str, Any]:
        return {"batch": {"min": self.min_batch, "opt": self.opt_batch, "max": self.max_batch},
                "seq": {"min": self.min_seq, "opt": self.opt_seq, "max": self.max_seq},
                "cache_len": self.cache_len, "kv_cache": self.kv_cache}

    def inputs(self, trt: Any, spec: ModelSpec, dtype: str) -> list[Any]:
        """Torch-TensorRT's ``Input`` of each argument of the exported forward."""
        import torch

        b, s = (self.min_batch, self.opt_batch, self.max_batch), (self.min_seq, self.opt_seq,
                                                                  self.max_seq)
        found = [trt.Input(min_shape=(b[0], s[0]), opt_shape=(b[1], s[1]),
                           max_shape=(b[2], s[2]), dtype=torch.int64),
                 trt.Input(min_shape=(s[0],), opt_shape=(s[1],), max_shape=(s[2],),
                           dtype=torch.int64)]
        if self.kv_cache:
            kv, d, n = spec.num_key_value_heads, spec.head_dim, self.cache_len
            for _ in range(spec.num_hidden_layers):
                for tail in ((kv, d, n), (kv, n, d)):  # keys transposed, then values
                    found.append(trt.Input(min_shape=(b[0], *tail), opt_shape=(b[1], *tail),
                                           max_shape=(b[2], *tail), dtype=torch_dtype(dtype)))
        return found


def import_torch_tensorrt() -> Any:
    """torch_tensorrt, or EngineUnavailableError saying how to install it (or a newer one)."""
    # Its import logs errors about TensorRT-LLM plugins (CUDA 13 builds) and modelopt that
    # concern features autotune never uses; in a worker they read as autotune's own errors.
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        import torch_tensorrt
    except ImportError as e:
        raise EngineUnavailableError(
            f"engine 'tensorrt' needs torch_tensorrt >= 2.6, which is not installed: {_INSTALL}"
        ) from e
    finally:
        logging.disable(previous)
    _quiet(torch_tensorrt)
    version = parse_version(torch_tensorrt.__version__)
    if version < MIN_VERSION or not hasattr(torch_tensorrt.runtime, "weight_streaming"):
        raise EngineUnavailableError(
            f"engine 'tensorrt' needs torch_tensorrt >= 2.6 (weight streaming appeared in 2.6); "
            f"found {torch_tensorrt.__version__}: {_INSTALL}"
        )
    return torch_tensorrt


# Torch-TensorRT's Python loggers: its own, and the TensorRT logger it installs, whose name is
# not below "torch_tensorrt" ("torch_tensorrt [TensorRT Conversion Context]").
_LOGGERS = ("torch_tensorrt", "torch_tensorrt [TensorRT Conversion Context]")


class _DebugOnly(logging.Filter):
    """Passes a record on at DEBUG: TensorRT's and Torch-TensorRT's warnings and notes ("In JIT
    build, strongly typed is enabled", "Weight streaming is disabled" at a full budget, the
    host-memory note of deserialization) describe choices autotune made and a user cannot
    act on. Errors keep their level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # Handlers at NOTSET would print it anyway: kept only where debug logging is on.
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def _quiet(torch_tensorrt: Any) -> None:
    """Routes the libraries' notes to the debug log (see _DebugOnly). The C++ runtime prints
    to stderr itself, past Python's logging: it is told to print errors only."""
    # A logger's filter sees only records logged on it, not its children's: every one of the
    # package's loggers gets it (they are created at import).
    names = [n for n in logging.root.manager.loggerDict if n.startswith(_LOGGERS[0])]
    for name in {*_LOGGERS, *names}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DebugOnly) for f in logger.filters):
            logger.addFilter(_DebugOnly())
    try:
        import tensorrt
        import torch

        torch.ops.tensorrt.set_logging_level(int(tensorrt.ILogger.Severity.ERROR))
    except Exception as e:  # an older or partial runtime: its lines stay, nothing breaks
        logging.getLogger(__name__).debug("could not quiet the TensorRT runtime: %s", e)


@contextlib.contextmanager
def warnings_to_debug(log: logging.Logger) -> Iterator[None]:
    """Python warnings raised inside (export's FutureWarnings, deprecations the libraries
    raise at themselves) go to the debug log, once each, instead of the console."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield
    for w in caught:
        log.debug("%s: %s (%s:%s)", w.category.__name__, w.message, w.filename, w.lineno)


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of "2.14.0a0", "2.6.0+cu124" and the like."""
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError) as e:
        raise EngineUnavailableError(f"cannot read torch_tensorrt version {text!r}") from e


ATTENTION_CHOICES = ("auto", "tensorrt", "torch")


SPECIALIZATION_CHOICES = ("lazy", "eager", "none")


def kernel_specialization(config: EngineConfig) -> str | None:
    """The ``kernel_specialization`` option (TensorRT-RTX's
    ``DynamicShapesKernelSpecializationStrategy``), lower case; None where it is not set."""
    given = config.option("kernel_specialization")
    if given is None:
        return None
    value = str(given).strip().lower()
    if value not in SPECIALIZATION_CHOICES:
        raise UserInputError(f"--engine-option kernel_specialization: expected lazy, eager or "
                             f"none; got {given!r}")
    return value


def attention_option(config: EngineConfig) -> str:
    """Where attention over the cache runs: ``tensorrt`` (inside the engine) or ``torch`` (custom
    ops PyTorch runs between engines; see :mod:`autotune.engines._trt_model`), ``auto`` (the
    default) resolved by :func:`resolve_attention`."""
    return resolve_attention(parse_attention(config.option("attention", "auto")))


def resolve_attention(value: str) -> str:
    """``auto``: ``torch`` where its engines can share one context buffer (the Python runtime,
    Torch-TensorRT 2.6 to 2.12: llama2-7b at 8 GiB ran batch 19 where attention in TensorRT
    ran 13, benchmarks/results/issue18), else ``tensorrt`` (from 2.13 each of attention=torch's
    engines would hold a streaming scratch of its own; where no version can be read, the
    smaller default max batch it gives is the safe one, and the load says what is wrong). Any
    other value as it is."""
    if value != "auto":
        return value
    version = installed_version()
    return ("torch" if version is not None and MIN_VERSION <= version < PYTHON_RUNTIME_UNTIL
            else "tensorrt")


def installed_version() -> tuple[int, int] | None:
    """Torch-TensorRT's (major, minor): the imported module's where it is imported (a worker),
    else its distribution's, so that the tuner, which never touches CUDA, learns it without
    importing Torch-TensorRT and TensorRT; None where none is installed or it cannot be read."""
    module = sys.modules.get("torch_tensorrt")
    found = ([module.__version__] if module is not None else
             [_dist_version(d) for d in metadata.packages_distributions().get("torch_tensorrt", [])])
    for text in filter(None, found):
        with contextlib.suppress(EngineUnavailableError):
            return parse_version(text)
    return None


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def python_runtime_shares(trt: Any) -> bool:
    """Whether this Torch-TensorRT compiles to the Python runtime, whose contexts autotune
    makes again user-managed on one buffer: up to 2.12 (from 2.13 the option is a no-op)."""
    return (parse_version(trt.__version__) < PYTHON_RUNTIME_UNTIL
            and "use_python_runtime" in inspect.signature(trt.dynamo.compile).parameters)


def parse_attention(given: Any) -> str:
    """The ``attention`` engine option's value, checked; ``auto`` as it is (see
    :func:`attention_option`)."""
    value = str(given).strip().lower()
    if value not in ATTENTION_CHOICES:
        raise UserInputError(f"--engine-option attention: expected one of "
                             f"{', '.join(ATTENTION_CHOICES)}; got {value!r}")
    return value


def compile_options(version: tuple[int, int], dtype: str) -> dict[str, Any]:
    """The version-dependent options of ``dynamo.compile`` for weight streaming (§2, §7.1).

    2.6-2.12 need explicit (strong) typing, and with it ``enabled_precisions`` may only be
    {float32}. That does not make a float16 study run in float32: under strong typing each
    layer runs in the dtype of its tensors in the exported graph, which is the study's dtype
    (the model is cast before export, as Torch-TRT's example does with ``model.half()``). What
    old versions do not offer is TensorRT picking lower precisions by itself. 2.13+ removed
    both options (always strongly typed); passing them would be silently ignored, so we don't.
    """
    import torch

    options: dict[str, Any] = {"enable_weight_streaming": True, "truncate_double": True}
    if version < (2, 13):
        options["use_explicit_typing"] = True
        options["enabled_precisions"] = {torch.float32}
    return options


def export_model(spec: ModelSpec, config: EngineConfig, shapes: BuildShapes) -> Any:
    """The ExportedProgram of :class:`ExportLlama`, batch and call length dynamic (§2).

    Built on the engine's device: Torch-TensorRT's constant folding wants the weights where
    the engine will run (it moves them to the host afterwards, ``offload_module_to_cpu``)."""
    import torch

    from autotune.engines._trt_model import ExportLlama

    model = ExportLlama(spec, config.dtype, config.device, weight_source(spec, config.seed),
                        shapes.cache_len if shapes.kv_cache else None, shapes.cache_len,
                        attention_option(config)).eval()
    b = s = 2  # examples above 1: export specializes a dimension whose example is 1
    batch = torch.export.Dim("batch", min=shapes.min_batch, max=max(shapes.max_batch, 2))
    seq = torch.export.Dim("seq", min=shapes.min_seq, max=max(shapes.max_seq, 2))
    tokens = torch.randint(1, spec.vocab_size, (b, s), device=config.device)
    positions = torch.arange(s, device=config.device)
    args: tuple[Any, ...] = (tokens, positions)
    dims: tuple[Any, ...] = ({0: batch, 1: seq}, {0: seq})
    if shapes.kv_cache:
        keys, values = cache_tensors(spec, config.dtype, b, shapes.cache_len, config.device)
        layers = cache_inputs(keys, values)
        args += tuple(layers)
        if attention_option(config) == "torch":
            # Only the attention op reads the cache: a batch of its own, or export may read
            # the batch size off a cache tensor, which makes it an engine's input.
            batch = torch.export.Dim("cache_batch", min=shapes.min_batch,
                                     max=max(shapes.max_batch, 2))
        dims += (({0: batch},) * len(layers),)  # export groups the *cache varargs in one tuple
    with torch.no_grad():
        return torch.export.export(model, args, dynamic_shapes=dims, strict=False)


def cache_tensors(spec: ModelSpec, dtype: str, batch: int, length: int,
                  device: Any) -> tuple[Any, Any]:
    """A zeroed static KV cache: keys ``[L, B, KV, d, length]`` (transposed) and values
    ``[L, B, KV, length, d]``; layer i's are ``keys[i]`` and ``values[i]`` (contiguous), the
    engine's inputs (see :mod:`autotune.engines._trt_model`). Zeros: masked slots still enter
    q.k, and garbage there may be NaN."""
    import torch

    lead = (spec.num_hidden_layers, batch, spec.num_key_value_heads)
    t = torch_dtype(dtype)
    return (torch.zeros((*lead, spec.head_dim, length), dtype=t, device=device),
            torch.zeros((*lead, length, spec.head_dim), dtype=t, device=device))


def cache_inputs(keys: Any, values: Any) -> list[Any]:
    """The engine's cache arguments: k_0, v_0, k_1, v_1, ..."""
    return [t for i in range(keys.shape[0]) for t in (keys[i], values[i])]


def versions(trt: Any) -> dict[str, str]:
    """What ran: torch, torch_tensorrt, and the TensorRT backend behind Torch-TensorRT's
    ``tensorrt`` alias (``_package_name``: 'tensorrt' or 'tensorrt_rtx') with its version."""
    import torch

    try:
        import tensorrt

        backend = str(getattr(tensorrt, "_package_name", "") or "tensorrt")
        trt_version = str(tensorrt.__version__)
    except ImportError:
        backend, trt_version = "unknown", "unknown"
    return {"torch": torch.__version__, "torch_tensorrt": str(trt.__version__),
            "tensorrt_backend": backend, "tensorrt": trt_version}


def device_identity(device: str) -> str:
    """Engines are specific to the GPU architecture they were built on."""
    if not device.startswith("cuda"):
        return device
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
