"""Serving a recommendation: its weight-streaming budget set on the model you serve.

:func:`apply` takes a recommendation (the JSON ``autotune export`` wrote, or its dict) and a
model compiled with weight streaming (a Torch-TensorRT module built with
``enable_weight_streaming=True``, or an autotune engine), sets the recommended budget and says
which batch to serve with. It avoids Torch-TensorRT's trap: a budget set inside
``with torch_tensorrt.runtime.weight_streaming(m) as ws:`` is undone when the block exits (the
context manager re-applies the budget it found), so the budget is set outside any block and
stays.

A model whose streamable bytes differ from the tuned one's (compiled for other shapes or
another precision) gets the recommended *fraction*, with a note: the optimum was measured on
another build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.errors import UserInputError
from autotune.results import recommend
from autotune.units import format_bytes


@dataclass(frozen=True)
class Deployment:
    """What :func:`apply` did: serve ``batch`` sequences at once under ``device_budget``."""

    batch: int
    device_budget: int  # bytes kept resident, as the model applied them (read back)
    total_device_budget: int  # the model's streamable bytes
    notes: tuple[str, ...] = ()

    @property
    def budget_fraction(self) -> float:
        return self.device_budget / self.total_device_budget


def apply(recommendation: dict[str, Any] | str | Path, model: Any) -> Deployment:
    """Sets the recommendation's budget on ``model``; returns the batch and what was applied."""
    rec = (recommend.read(recommendation) if isinstance(recommendation, (str, Path))
           else recommend.validate(recommendation))
    best = rec["best"]
    handle = _budget_handle(model)
    total = int(handle.total_device_budget)
    if total <= 0:
        raise UserInputError("the model streams no weights: compile it with "
                             "enable_weight_streaming=True (Torch-TensorRT)")
    notes = []
    workload = rec.get("workload") or {}
    name = getattr(getattr(model, "spec", None), "name", None)  # an autotune engine's model
    if name and workload.get("model") and name != workload["model"]:
        notes.append(f"this is {name}; the recommendation was tuned for {workload['model']}")
    if workload.get("engine") == "landscape":
        notes.append("the recommendation's figures were replayed from a recorded landscape "
                     "(another machine's measurements), not measured with this model")
    tuned = rec.get("total_device_budget")
    if tuned == total:
        budget = int(best["device_budget_bytes"])
    else:
        budget = int(round(best["budget_fraction"] * total))
        notes.append(
            f"this model streams {format_bytes(total)}, the tuned one "
            f"{format_bytes(tuned) if tuned else 'an unknown amount'}: applied the recommended "
            f"fraction ({100 * best['budget_fraction']:.1f}%); tune this build for a figure that "
            f"holds")
    _set_budget(handle, budget)  # outside any `with`: nothing restores it
    return Deployment(batch=int(best["batch"]), device_budget=int(handle.device_budget),
                      total_device_budget=total, notes=tuple(notes))


def _set_budget(handle: Any, budget: int) -> None:
    if hasattr(handle, "rt_mods"):  # Torch-TensorRT's: its <= 2.12 trap with per-call memory
        from autotune.engines._trt_build import import_torch_tensorrt
        from autotune.engines.tensorrt import set_module_budget

        set_module_budget(import_torch_tensorrt(), handle, budget)
    else:
        handle.device_budget = budget


def _budget_handle(model: Any) -> Any:
    """What takes the budget: an autotune engine itself, else Torch-TensorRT's handle."""
    if hasattr(model, "device_budget") and hasattr(model, "total_device_budget"):
        return model
    # A Torch-TensorRT module holds its engines as _run_on_acc children; anything else
    # (None, a plain nn.Module) has no budget to set, whatever is installed.
    inner = getattr(model, "compiled_module", model)  # a CUDA-graphs wrapper's module
    children = getattr(inner, "named_children", None)
    if children is None or not any("_run_on_acc" in name for name, _ in children()):
        raise UserInputError(
            f"deploy.apply: a {type(model).__name__} has no weight-streaming budget; give a "
            "Torch-TensorRT module compiled with enable_weight_streaming=True, or an "
            "autotune engine")
    from autotune.engines._trt_build import import_torch_tensorrt

    return import_torch_tensorrt().runtime.weight_streaming(model)
