"""A faithful test double of ``torch_tensorrt``'s weight-streaming surface, for CPU tests.

TensorRT cannot be installed where autotune is developed, so the Torch-TensorRT engine is
tested against this package instead. It models, from the research note
(``research/torch-tensorrt-weight-streaming.md``), what autotune relies on:

- ``dynamo.compile`` with the per-version option rules (§2): ``use_explicit_typing`` and
  ``enabled_precisions`` assertions on 2.6-2.12, their silent removal in 2.13+, partitioning
  by ``torch_executed_ops`` into ``_run_on_acc_N`` engines and ``_run_on_gpu_N`` PyTorch
  children; each engine runs the real PyTorch forward of its part of the exported graph, so
  generation is numerically right on CPU;
- the engine layer (§1.3-1.5): streamable size, the automatic budget applied at
  deserialization, budget set and read-back, context invalidation and re-creation (eager
  before 2.13, lazy in 2.13, eager again in 2.14), CUDA-graph resets;
- ``runtime.weight_streaming`` (§1.1-1.2), copied rule by rule;
- engine state through ``get_extra_state``/``set_extra_state`` (how torch.save works).

It deliberately does not model speed, device memory, or TensorRT's optimizations; the version
gates are those of §0 (2.5 has no weight streaming at all).
"""

from __future__ import annotations

from torch_tensorrt import _state, dynamo, runtime
from torch_tensorrt._input import Input

__version__ = "2.13.0"

__all__ = ["Input", "__version__", "_state", "dynamo", "runtime"]
