"""GPU inventory and free memory through NVML (package nvidia-ml-py, module ``pynvml``).

Works, clearly degraded, where there is no NVIDIA driver: :func:`inventory` returns an empty
list and :func:`nvml_status` says why, so ``--device cpu`` runs anywhere and ``--device cuda``
fails with a message instead of a stack trace. Never initializes CUDA (the parent process must
not: it spawns the workers that do).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from autotune.errors import EngineUnavailableError, UserInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML index (physical, ignores CUDA_VISIBLE_DEVICES)
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    driver: str
    pcie_gen: int | None
    pcie_width: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def _nvml() -> Any:
    """The initialized pynvml module, or raises EngineUnavailableError with the reason."""
    try:
        import pynvml
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise EngineUnavailableError("pynvml is missing: pip install nvidia-ml-py") from e
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise EngineUnavailableError(
            f"no NVIDIA GPU is usable here (NVML: {e}); use --device cpu to run on the CPU"
        ) from e
    return pynvml


def nvml_status() -> str | None:
    """None when NVML works, else the reason it does not."""
    try:
        _nvml()
    except EngineUnavailableError as e:
        return str(e)
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        gen = nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)
        width = nvml.nvmlDeviceGetCurrPcieLinkWidth(handle)
    except nvml.NVMLError:
        gen = width = None
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        total_bytes=int(mem.total),
        free_bytes=int(mem.free),
        driver=_text(nvml.nvmlSystemGetDriverVersion()),
        pcie_gen=gen,
        pcie_width=width,
    )


def inventory() -> list[GpuInfo]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES respected); [] without NVML."""
    try:
        nvml = _nvml()
    except EngineUnavailableError as e:
        log.debug("no GPU inventory: %s", e)
        return []
    try:
        return [_info(nvml, i) for i in _visible_nvml_indices(nvml)]
    except nvml.NVMLError as e:  # a driver that fails after init: say so, never a raw error
        raise EngineUnavailableError(f"NVML failed while reading the GPUs ({e}); check the "
                                     "driver (nvidia-smi), or use --device cpu") from e


def _visible_nvml_indices(nvml: Any) -> list[int]:
    count = nvml.nvmlDeviceGetCount()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return list(range(count)) if visible is None else []
    indices: list[int] = []
    for item in visible.split(","):
        item = item.strip()
        if item.isdigit() and int(item) < count:
            indices.append(int(item))
        elif item.startswith("GPU-"):
            for i in range(count):
                uuid = _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i)))
                if uuid.startswith(item):
                    indices.append(i)
        else:
            break  # CUDA stops at the first invalid entry
    return indices


def device_info(device: str) -> GpuInfo:
    """The GPU behind a torch device string ("cuda", "cuda:1"); clear errors otherwise."""
    if not device.startswith("cuda"):
        raise UserInputError(f"device {device!r} is not a CUDA device")
    gpus = inventory()
    if not gpus:
        raise EngineUnavailableError(
            nvml_status() or "no NVIDIA GPU is visible (CUDA_VISIBLE_DEVICES is empty); "
            "use --device cpu"
        )
    ordinal = int(device.split(":", 1)[1]) if ":" in device else 0
    if ordinal >= len(gpus):
        raise UserInputError(
            f"device {device}: only {len(gpus)} GPU(s) visible: "
            + ", ".join(f"cuda:{i} {g.name}" for i, g in enumerate(gpus))
        )
    return gpus[ordinal]


def free_bytes(device: str) -> int:
    """NVML free memory of the GPU behind ``device`` now."""
    return device_info(device).free_bytes


def process_used_bytes(device: str) -> int | None:
    """GPU memory NVML attributes to this process on ``device`` (context included)."""
    try:
        nvml = _nvml()
        info = device_info(device)
        handle = nvml.nvmlDeviceGetHandleByIndex(info.index)
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except (EngineUnavailableError, UserInputError, Exception) as e:  # NVML varies by driver
        log.debug("NVML process memory unavailable: %s", e)
        return None
    for proc in procs:
        if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
            return int(proc.usedGpuMemory)
    return None
