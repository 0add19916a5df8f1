"""Whether this process can run our Triton kernels (:mod:`autotune.streaming.attention`,
:mod:`autotune.streaming.gemv`) and TorchInductor's on a device."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import torch


def unavailable(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` here; None where they can."""
    try:
        import triton
    except ImportError:
        return "triton is not installed (it comes with CUDA builds of torch)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"device {device}: it runs on CUDA (on CPU only with TRITON_INTERPRET=1)"
    if device.type == "cuda":
        return _cannot_build(triton)
    return None


def _cannot_build(triton: object) -> str | None:
    """Why Triton could not build its kernels' launcher here (it compiles a small C module
    against Python's headers at a kernel's first launch, in the middle of a trial); None where
    it can, or where a build of the user's own is set (``triton.knobs.build.impl``)."""
    knobs = getattr(triton, "knobs", None)
    if getattr(getattr(knobs, "build", None), "impl", None) is not None:
        return None
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return ("triton needs a C compiler to build its kernels' launcher: install gcc or "
                "clang, or name one in CC")
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":  # Debian's, which Triton reads as posix_prefix
        scheme = "posix_prefix"
    headers = Path(sysconfig.get_paths(scheme=scheme)["include"]) / "Python.h"
    if not headers.is_file():
        return (f"triton builds its kernels' launcher against Python's headers, and {headers} "
                "is missing: install your Python's development package (python3-dev)")
    return None
