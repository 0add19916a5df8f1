"""The engine contract: what every engine (native, Torch-TensorRT, landscape, yours) offers.

The names mirror ``torch_tensorrt.runtime.weight_streaming`` so that its users' habits carry
over: ``total_device_budget`` (streamable bytes), ``device_budget`` (bytes kept resident;
assigning reads the applied value back) and ``get_automatic_weight_streaming_budget()``.
Generation is split into ``prefill`` (which yields the first token) and ``decode`` so that
:mod:`autotune.measure.timing`, the one place that reads clocks, can time both.

What a measurement is (:class:`Measurement`) and the random prompts it is made with are here
too: a replayed engine reports measurements itself, and engines warm up on random prompts.

This module holds no engine; see :mod:`autotune.engines` for the registry.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from autotune.engines.memory import MemoryPlan
from autotune.errors import UserInputError
from autotune.models import ModelSpec, check_dtype
from autotune.precision import parse_precisions


@dataclass(frozen=True)
class EngineConfig:
    """Everything a worker process needs to load an engine once (picklable)."""

    model: str
    engine: str = "native"
    dtype: str = "float16"
    device: str = "cuda"  # "cpu", "cuda" or "cuda:N"
    max_batch: int = 256
    max_seq_len: int = 384  # isl + osl of the study
    # The longest prompt (the study's isl); None: max_seq_len - 1. Engines that size memory
    # for the longest call (TensorRT's profile) use it.
    max_prompt_len: int | None = None
    weights: str | None = None  # local HF checkpoint dir; random weights when None
    seed: int = 0
    gpu_memory_limit: int | None = None  # bytes; caps the worker's allocator
    options: tuple[tuple[str, Any], ...] = field(default=())  # engine-specific, hashable
    # The weight precisions the engine loads (--quantization): the first is in use after
    # load; engines that offer more than "none" say so in their ``precisions`` class attribute.
    quantization: tuple[str, ...] = ("none",)

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        object.__setattr__(self, "quantization", parse_precisions(self.quantization))
        for name in ("max_batch", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserInputError(f"{name}: expected a positive integer; got {value!r}")
        prompt = self.max_prompt_len
        if prompt is not None and not (isinstance(prompt, int) and 1 <= prompt < self.max_seq_len):
            raise UserInputError(
                f"max_prompt_len: expected 1..{self.max_seq_len - 1}; got {prompt!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise UserInputError(f"device: expected cpu, cuda or cuda:N; got {self.device!r}")

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclass
class Generation:
    """State of one greedy generation: the tokens so far and the engine's own state."""

    batch: int
    isl: int
    osl: int
    tokens: Any  # [B, n] int64 on the engine's device; n grows from 1 to osl
    state: Any = None  # engine-private (KV cache, positions, ...)


@runtime_checkable
class Engine(Protocol):
    """A loaded model that generates under a weight-streaming budget."""

    name: ClassVar[str]
    spec: ModelSpec
    config: EngineConfig
    # Optional class attributes, read with getattr: ``uniform_decode_steps`` (True when every
    # decode step does the same work, so a measurement may time a few and extrapolate; see
    # autotune.measure.timing), ``linear_decode_steps`` with the method ``skip(gen, steps)``
    # (a step costs in proportion to its position, and steps can be skipped uncomputed: a
    # measurement times a few in the generation's middle), ``budget_change_cost`` ("high" when a change reloads the engine) and
    # the class method ``host_bytes(config)`` (peak host memory one loaded worker holds, checked
    # against the host before a run starts: autotune.measure.host) and ``applied_budget(budget)`` (what
    # assigning ``budget`` would apply, without applying it: engines that round budgets to
    # whole units say so, and the search never measures one configuration twice), and
    # ``learn_peak(planned, measured)`` (engines whose memory lies outside PyTorch's allocator
    # take each trial's measured peak, so that later plans include what the first missed).
    # Weight precisions (--quantization): ``precisions``, the class's tuple of the ones it can
    # load (absent: "none" only); an engine loaded with several has a ``precision``
    # attribute (get/set: setting it switches the weights in use, the budget then applies to
    # them), ``total_device_budgets`` (precision -> streamable bytes), the keyword
    # ``precision`` on ``memory_plan``, ``applied_budget`` and ``streamed_bytes_at`` (planned
    # without switching), and optionally ``accuracy(isl, osl, seed)`` (how far each 8-bit
    # precision's output is from 16-bit: autotune.engines.native).
    # Engine options (``--engine-option KEY=VALUE``): ``engine_options``, a dict of the keys
    # the engine takes -> what each does (any other key is refused by name), and
    # ``host_options``, the keys that name something on the worker's own host (a cache
    # directory): a joining worker never takes those from the study's storage. An engine that
    # declares no ``engine_options`` gets its options unchecked. ``resolved_options``: the
    # options whose default the engine resolves at load (``auto``), option -> (the
    # ``describe()`` key of what it resolved to, that fact's value before the option existed);
    # a study compares those facts, not the typed options (autotune.tune.study.check_resolved),
    # and the class method ``options_giving(facts)`` names the options that give them;
    # ``resolved_before_load(engine_options)``, optional: those facts where the engine knows
    # them without loading, else None (a resumed study is then checked before any compile).

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Builds or compiles the model once per worker process."""
        ...

    @property
    def total_device_budget(self) -> int:
        """Bytes of streamable weights; a budget equal to it streams nothing."""
        ...

    @property
    def device_budget(self) -> int:
        """Bytes of streamable weights kept resident on the device, as applied."""
        ...

    @device_budget.setter
    def device_budget(self, value: int) -> None: ...

    def get_automatic_weight_streaming_budget(self) -> int:
        """The engine's own choice of budget from the free memory now."""
        ...

    def prefill(self, prompt: Any, osl: int) -> Generation:
        """Runs the prompt ``[B, isl]`` and produces the first new token."""
        ...

    def decode(self, gen: Generation, steps: int) -> None:
        """Greedily generates ``steps`` more tokens (no stop at EOS)."""
        ...

    def synchronize(self) -> None:
        """Waits for the device (a no-op on CPU)."""
        ...

    def memory_plan(self, batch: int, isl: int, osl: int, budget: int) -> MemoryPlan:
        """Predicted peak device memory of a configuration, without running it."""
        ...

    def streamed_bytes_per_step(self) -> int:
        """Bytes copied host-to-device per forward pass at the current budget."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts about the loaded engine worth recording with each trial."""
        ...

    def close(self) -> None:
        """Frees device and pinned memory."""
        ...


def declared_options(cls: type) -> tuple[dict[str, str] | None, frozenset[str]]:
    """The option keys an engine class takes (None: undeclared, unchecked) and its host-local
    ones (see the Engine protocol)."""
    options = getattr(cls, "engine_options", None)
    host = getattr(cls, "host_options", ())
    return (dict(options) if options is not None else None), frozenset(host)


def check_options(cls: type, options: tuple[tuple[str, Any], ...]) -> None:
    """Refuses option keys the engine does not declare, naming the ones it takes."""
    declared, _ = declared_options(cls)
    if declared is None:
        return
    for key, _value in options:
        if key not in declared:
            takes = ", ".join(sorted(declared)) or "no options"
            raise UserInputError(
                f"--engine-option {key}: the {getattr(cls, 'name', cls.__name__)} engine does "
                f"not take it; it takes {takes}")


def check_precisions(cls: type, config: EngineConfig) -> None:
    """Refuses precisions the engine class cannot load, in one line."""
    offered = tuple(getattr(cls, "precisions", ("none",)))
    name = getattr(cls, "name", cls.__name__)
    for p in config.quantization:
        if p not in offered:
            if name == "tensorrt":
                raise UserInputError(
                    f"--quantization {p}: the tensorrt engine streams 16-bit weights only "
                    "(8-bit weight streaming with Torch-TensorRT is not yet measured; see "
                    "docs/tensorrt.md); use --engine native for int8 or fp8")
            raise UserInputError(
                f"--quantization {p}: the {name} engine offers "
                f"{', '.join(offered)} only")


def flag(config: EngineConfig, key: str, default: bool) -> bool:
    """A yes/no engine option, given as a bool (Python) or as text (``--engine-option``)."""
    value = config.option(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserInputError(f"--engine-option {key}: expected true or false; got {value!r}")


def int_option(config: EngineConfig, key: str, default: int, least: int = 1) -> int:
    """A whole-number engine option, given as an int (Python) or as text."""
    value = config.option(key, default)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            pass  # refused below, as given
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise UserInputError(f"--engine-option {key}: expected an integer of {least} or more; "
                             f"got {value!r}")
    return value


def check_option_values(cls: type, config: EngineConfig) -> None:
    """The options' values, where the engine class can check them before anything loads
    (its ``check_config``): a bad one would otherwise cost a model load first."""
    check = getattr(cls, "check_config", None)
    if check is not None:
        check(config)


# Whoever loads an engine hears what a long load is doing (a worker passes it to the tuner's
# progress line): set around ``load`` by :func:`loading_said_to`, said by the engine. A
# context variable: loads in two threads each tell their own listener.
_loading_hook: contextvars.ContextVar[Any] = contextvars.ContextVar("loading_hook",
                                                                    default=None)


def say_loading(text: str) -> None:
    """Says what the load is doing now (``compiling with Torch-TensorRT``); nothing where no
    one listens. For phases that take more than a few seconds."""
    hook = _loading_hook.get()
    if hook is not None:
        hook(text)


@contextlib.contextmanager
def loading_said_to(hook: Any) -> Iterator[None]:
    """Within it, :func:`say_loading` calls ``hook(text)``."""
    token = _loading_hook.set(hook)
    try:
        yield
    finally:
        _loading_hook.reset(token)


def clamp_budget(requested: int, total: int, log: Any) -> int:
    """The budget rules of Torch-TensorRT: negative is an error, above the total is clamped
    with a logged error (which turns streaming off)."""
    if int(requested) < 0:
        raise UserInputError(f"device_budget: expected 0..{total} bytes; got {requested}")
    if int(requested) > total:
        log.error(
            "Requested budget %d is greater than total device budget %d; using %d", requested,
            total, total,
        )
        return total
    return int(requested)


@dataclass(frozen=True)
class Measurement:
    """What one configuration did, medians over the timed repeats (times in seconds)."""

    batch: int
    isl: int
    osl: int
    device_budget: int
    total_device_budget: int
    throughput_tok_s: float  # batch * osl / median end-to-end time
    e2e_s: float
    ttft_s: float  # prefill: prompt in, first new token out
    tpot_s: float  # mean time per output token after the first
    streamed_bytes_per_step: int
    stream_gb_s: float  # streamed bytes per step / tpot, in GB/s (1e9)
    peak_allocated_bytes: int | None  # torch allocator peak over the timed runs
    peak_reserved_bytes: int | None
    nvml_used_bytes: int | None  # this process's GPU memory by NVML after the runs
    tokens_sha256: str  # of the generated ids [B, 1 + decode_steps_timed] (int64, row-major)
    e2e_samples_s: list[float] = field(default_factory=list)
    ttft_samples_s: list[float] = field(default_factory=list)
    warmup: int = 1
    decode_steps_timed: int = 0  # per repeat; osl - 1 unless estimated
    estimated: bool = False  # e2e and throughput extrapolated from decode_steps_timed steps
    # The peak the engine's memory plan predicts: PyTorch's reserved peak, or for an engine
    # whose memory lies outside PyTorch's allocator (TensorRT), what NVML sees it hold.
    peak_device_bytes: int | None = None

    @property
    def budget_fraction(self) -> float:
        total = self.total_device_budget
        return self.device_budget / total if total else 1.0

    @property
    def e2e_spread_s(self) -> float:
        return max(self.e2e_samples_s) - min(self.e2e_samples_s)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "budget_fraction": self.budget_fraction}


def random_prompt(batch: int, isl: int, vocab_size: int, seed: int, device: Any) -> Any:
    """Random token ids ``[batch, isl]`` (int64), never all equal."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    prompt = torch.randint(1, vocab_size, (batch, isl), generator=gen, dtype=torch.long)
    return prompt.to(device)
