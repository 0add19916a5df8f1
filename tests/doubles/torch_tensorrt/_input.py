"""``torch_tensorrt.Input`` (real 2.11 ``_Input.py``), the fields the double's callers read.

As the real one: ``Input(shape)`` or ``Input(shape=...)`` is STATIC with ``shape`` a tuple;
``min_shape``/``opt_shape``/``max_shape`` (all three, no ``shape``) is DYNAMIC with ``shape`` a
dict of the three; min <= opt <= max is *not* checked here (TensorRT checks it at build);
``name`` defaults to ""; ``torch_tensor`` is an example tensor of the (opt) shape. Not modelled:
the ``torch_tensorrt.dtype`` enum (``dtype`` keeps what was given, default None), formats,
tensor domains, shape tensors.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch

_MISSING = ("Missing required arguments for class Input\nEither shape or all three of "
            "min_shape, opt_shape, max_shape must be defined")
_BOTH = ("Found that both shape, and one or more of min_shape, opt_shape, max_shape were "
         "specified\nclass Input expects that only either shape or all three of min_shape, "
         "opt_shape, max_shape are defined")
_RANGE = ("min_shape", "opt_shape", "max_shape")


class Input:
    class _ShapeMode(Enum):
        STATIC = 0
        DYNAMIC = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.shape: Any
        if len(args) == 1:
            if any(k in kwargs for k in _RANGE):
                raise ValueError(_BOTH.replace("both shape,", "both shape (as a positional "
                                               "argument),"))
            self.shape, self.shape_mode = tuple(args[0]), Input._ShapeMode.STATIC
        elif args:
            raise ValueError(
                "Unexpected number of positional arguments for class Input \n    Found "
                f"{len(args)} arguments, expected either zero or a single positional arguments")
        elif "shape" not in kwargs and not all(k in kwargs for k in _RANGE):
            raise ValueError(_MISSING)
        elif "shape" in kwargs and all(k in kwargs for k in _RANGE):
            raise ValueError(_BOTH)
        elif "shape" in kwargs:
            self.shape, self.shape_mode = tuple(kwargs["shape"]), Input._ShapeMode.STATIC
        else:
            self.shape = {k: tuple(kwargs[k]) for k in _RANGE}
            self.shape_mode = Input._ShapeMode.DYNAMIC
        self.dtype = kwargs.get("dtype")
        self.name = kwargs.get("name", "")
        example = self.shape["opt_shape"] if isinstance(self.shape, dict) else self.shape
        self.torch_tensor = kwargs.get("torch_tensor", torch.zeros(
            example, dtype=self.dtype if isinstance(self.dtype, torch.dtype) else torch.float32))

    def __repr__(self) -> str:
        return f"Input(shape={self.shape}, dtype={self.dtype})"
