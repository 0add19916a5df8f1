"""A test double of ``torch_tensorrt``'s weight-streaming surface, for CPU tests.

TensorRT cannot be installed where autotune is developed, so the Torch-TensorRT engine is
tested against this package instead. Each rule cites the real file it follows (the 2.11 wheel
source, or the v2.6/v2.7/v2.13 tags and main where versions differ):

- ``dynamo.compile`` (``dynamo/_compiler.py``): per-version option rules, then decompositions
  (``dynamo/lowering.py``), lowering passes, and torch's splitter as the fast partitioner
  (``dynamo/partitioning.py``) into ``_run_on_acc_N`` engines and ``_run_on_gpu_N`` PyTorch
  children; the result keeps the exported program's args/kwargs and output pytree;
- the engine layer (``dynamo/runtime/_modules.py``): streamable size, the automatic budget
  applied at deserialization, budget set and read-back, context lifetime per version (eager
  2.6-2.12, lazy 2.13 and main), per-call context memory (``dynamically_allocate_resources``,
  which a budget change undoes up to 2.12), extra state in the real 11-field shape;
- the CUDA-graph wrapper and ``runtime.weight_streaming`` per version.

It deliberately does not model speed, device memory (it only counts the contexts that hold
their own), converter coverage or TensorRT's
optimizations; 2.5 has no weight streaming at all.
"""

from __future__ import annotations

import os

from torch_tensorrt import _state, dynamo, runtime
from torch_tensorrt._input import Input

# A test in this process sets it (doubles.install_torch_tensorrt); a study's worker processes
# read it from the environment their test gave them.
__version__ = os.environ.get("AUTOTUNE_TEST_TRT_VERSION", "2.13.0")

__all__ = ["Input", "__version__", "_state", "dynamo", "runtime"]
