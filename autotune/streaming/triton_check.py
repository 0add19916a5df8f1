"""Whether this process can run our Triton kernels (:mod:`autotune.streaming.attention`,
:mod:`autotune.streaming.gemv`) on a device."""

from __future__ import annotations

import os

import torch


def unavailable(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` here; None where they can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (it comes with CUDA builds of torch)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device {device}: it runs on CUDA (on CPU only with TRITON_INTERPRET=1)"
    return None
