"""How a Torch-TensorRT module is built: version checks, export and compile options.

Free functions used by :mod:`autotune.engines.tensorrt`; section numbers refer to
``research/torch-tensorrt-weight-streaming.md``. Nothing here runs a model or sets a budget,
and torch_tensorrt is imported only inside :func:`import_torch_tensorrt`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from autotune.engines.base import EngineConfig
from autotune.errors import EngineUnavailableError, UserInputError
from autotune.models import ModelSpec, torch_dtype, weight_source

MIN_VERSION = (2, 6)  # weight streaming appeared in 2.6 (§0)
# Both builds serve one engine: Torch-TensorRT loads either backend behind one ``tensorrt``
# module (its _TensorRTProxyModule), and the study records which one ran.
_INSTALL = (
    "pip install 'autotune[tensorrt-rtx]' (TensorRT-RTX, from PyPI), or pip install "
    "'autotune[tensorrt]' --extra-index-url https://pypi.nvidia.com (data-center TensorRT, "
    "whose wheels come from NVIDIA's index); the torch_tensorrt build must match your torch"
)


@dataclass(frozen=True)
class BuildShapes:
    """The optimization profile one compiled module serves (§2: min/opt/max).

    ``seq`` is the tokens of one call: with the KV cache, 1 (a decode step) up to the longest
    prompt, against a static cache of ``cache_len`` slots; without it, the whole sequence so
    far (up to ``cache_len`` tokens), as Torch-TensorRT's example runs."""

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
        # The longest call: the prompt (at most the sequence less one generated token).
        prompt = config.max_prompt_len or length - 1
        max_seq = int(config.option("max_prompt_len", prompt)) if kv_cache else length
        # TensorRT tunes kernels for opt (§2). With a cache nearly every call is a decode
        # step (T = 1), so that is where the kernels should be fast.
        opt_batch = int(config.option("opt_batch", config.max_batch))
        opt_seq = int(config.option("opt_seq_len", 1 if kv_cache else max_seq))
        if not (1 <= opt_batch <= config.max_batch and 1 <= opt_seq <= max_seq < length + 1):
            raise UserInputError(
                f"opt_batch/opt_seq_len/max_prompt_len: expected 1..{config.max_batch} and "
                f"1 <= opt_seq_len <= max_prompt_len <= {length}; got {opt_batch}, {opt_seq} "
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
            def cache(batch: int) -> tuple[int, ...]:
                return (spec.num_hidden_layers, 2, batch, spec.num_key_value_heads,
                        self.cache_len, spec.head_dim)

            found.append(trt.Input(min_shape=cache(b[0]), opt_shape=cache(b[1]),
                                   max_shape=cache(b[2]), dtype=torch_dtype(dtype)))
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
    version = parse_version(torch_tensorrt.__version__)
    if version < MIN_VERSION or not hasattr(torch_tensorrt.runtime, "weight_streaming"):
        raise EngineUnavailableError(
            f"engine 'tensorrt' needs torch_tensorrt >= 2.6 (weight streaming appeared in 2.6); "
            f"found {torch_tensorrt.__version__}: {_INSTALL}"
        )
    return torch_tensorrt


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of "2.14.0a0", "2.6.0+cu124" and the like."""
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError) as e:
        raise EngineUnavailableError(f"cannot read torch_tensorrt version {text!r}") from e


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
                        shapes.cache_len if shapes.kv_cache else None, shapes.cache_len).eval()
    b = s = 2  # examples above 1: export specializes a dimension whose example is 1
    batch = torch.export.Dim("batch", min=shapes.min_batch, max=max(shapes.max_batch, 2))
    seq = torch.export.Dim("seq", min=shapes.min_seq, max=max(shapes.max_seq, 2))
    tokens = torch.randint(1, spec.vocab_size, (b, s), device=config.device)
    positions = torch.arange(s, device=config.device)
    args: tuple[Any, ...] = (tokens, positions)
    dims: tuple[Any, ...] = ({0: batch, 1: seq}, {0: seq})
    if shapes.kv_cache:
        args += (cache_tensor(spec, config.dtype, b, shapes.cache_len, config.device),)
        dims += ({2: batch},)
    with torch.no_grad():
        return torch.export.export(model, args, dynamic_shapes=dims, strict=False)


def cache_tensor(spec: ModelSpec, dtype: str, batch: int, length: int, device: Any) -> Any:
    """A zeroed static KV cache ``[L, 2, B, KV, length, d]`` (zeros: masked slots still enter
    q.k, and garbage there may be NaN)."""
    import torch

    shape = (spec.num_hidden_layers, 2, batch, spec.num_key_value_heads, length, spec.head_dim)
    return torch.zeros(shape, dtype=torch_dtype(dtype), device=device)


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
