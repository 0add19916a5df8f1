"""How a Torch-TensorRT module is built: version checks, export and compile options.

Free functions used by :mod:`autotune.engines.tensorrt`; section numbers refer to
``research/torch-tensorrt-weight-streaming.md``. Nothing here runs a model or sets a budget,
and torch_tensorrt is imported only inside :func:`import_torch_tensorrt`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autotune.engines.base import EngineConfig
from autotune.errors import EngineUnavailableError, UserInputError
from autotune.models import ModelSpec, build_hf_model, weight_source

MIN_VERSION = (2, 6)  # weight streaming appeared in 2.6 (§0)
_INSTALL = (
    "pip install 'autotune[tensorrt]' (TensorRT's wheels come from NVIDIA's index: add "
    "--extra-index-url https://pypi.nvidia.com if pip cannot find them)"
)


@dataclass(frozen=True)
class BuildShapes:
    """The optimization profile one compiled module serves (§2: min/opt/max)."""

    min_batch: int
    opt_batch: int
    max_batch: int
    min_seq: int
    opt_seq: int
    max_seq: int

    @classmethod
    def from_config(cls, config: EngineConfig) -> BuildShapes:
        # TensorRT tunes kernels for opt, which is the example shape seen at export (§2).
        opt_batch = int(config.option("opt_batch", config.max_batch))
        opt_seq = int(config.option("opt_seq_len", config.max_seq_len))
        if not (1 <= opt_batch <= config.max_batch and 1 <= opt_seq <= config.max_seq_len):
            raise UserInputError(
                f"opt_batch/opt_seq_len: expected 1..{config.max_batch} and "
                f"1..{config.max_seq_len}; got {opt_batch} and {opt_seq}"
            )
        return cls(1, opt_batch, config.max_batch, 1, opt_seq, config.max_seq_len)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"batch": {"min": self.min_batch, "opt": self.opt_batch, "max": self.max_batch},
                "seq": {"min": self.min_seq, "opt": self.opt_seq, "max": self.max_seq}}


def import_torch_tensorrt() -> Any:
    """torch_tensorrt, or EngineUnavailableError saying how to install it (or a newer one)."""
    try:
        import torch_tensorrt
    except ImportError as e:
        raise EngineUnavailableError(
            f"engine 'tensorrt' needs torch_tensorrt >= 2.6, which is not installed: {_INSTALL}"
        ) from e
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


class _Logits:
    """``input_ids, position_ids -> logits [B, S, vocab]``: a plain-tensor signature to export."""

    @staticmethod
    def wrap(model: Any) -> Any:
        import torch

        class LogitsOnly(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: Any, position_ids: Any) -> Any:
                return self.model(
                    input_ids=input_ids, position_ids=position_ids, use_cache=False
                ).logits

        return LogitsOnly().eval()


def export_model(spec: ModelSpec, config: EngineConfig, shapes: BuildShapes) -> Any:
    """The ExportedProgram of the model with batch and sequence dynamic on both inputs (§2)."""
    import torch

    model = build_hf_model(spec, config.dtype, config.device, weight_source(spec, config.seed))
    model.config.use_cache = False
    model.set_attn_implementation("eager")  # as Torch-TRT's example; sdpa does not convert
    example = torch.randint(1, spec.vocab_size, (shapes.opt_batch, shapes.opt_seq),
                            device=config.device)
    positions = torch.arange(shapes.opt_seq, device=config.device).expand(shapes.opt_batch, -1)
    dims: dict[int, Any] = {}
    # A dimension whose example is 1 would be specialized to 1 by export: keep it static.
    if shapes.max_batch > 1 and shapes.opt_batch > 1:
        dims[0] = torch.export.Dim("batch", min=shapes.min_batch, max=shapes.max_batch)
    if shapes.max_seq > 1 and shapes.opt_seq > 1:
        dims[1] = torch.export.Dim("seq_len", min=shapes.min_seq, max=shapes.max_seq)
    with torch.no_grad():
        return torch.export.export(
            _Logits.wrap(model), (example, positions.contiguous()),
            dynamic_shapes=(dims, dims), strict=False,
        )


def versions(trt: Any) -> dict[str, str]:
    import torch

    try:
        import tensorrt

        trt_version = str(tensorrt.__version__)
    except ImportError:
        trt_version = "unknown"
    return {"torch": torch.__version__, "torch_tensorrt": str(trt.__version__),
            "tensorrt": trt_version}


def device_identity(device: str) -> str:
    """Engines are specific to the GPU architecture they were built on."""
    if not device.startswith("cuda"):
        return device
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
