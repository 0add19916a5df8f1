"""Test doubles of packages that cannot be installed here, and how to put them in place.

``install_torch_tensorrt(monkeypatch, version, package)`` makes ``import torch_tensorrt`` and
``import tensorrt`` resolve to the doubles in this folder at the given Torch-TensorRT version,
with TensorRT's version set to the one that release pins (research note §0) and
``tensorrt._package_name`` to ``package`` ("tensorrt" or "tensorrt_rtx"), and registers the
preset ``TRT_MODEL`` that the double's tests build; call ``uninstall_torch_tensorrt()`` after
the test. The doubles never ship in the package.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

DOUBLES_DIR = Path(__file__).resolve().parent

# The model the double's tests build: tiny-llama with two layers, a preset while the double is
# installed. Exporting and decomposing a model costs CPU in proportion to its layers (tiny-llama's
# six: about 11 s of a CI core per export; two: about 5 s), and two still give layer 0 and one
# after it, each with its own cache inputs, engines and attention.
TRT_MODEL = "tiny-llama-2l"

# Torch-TensorRT release -> the TensorRT it pins (research note §0).
TENSORRT_FOR = {
    "2.5": "10.3.0", "2.6": "10.7.0", "2.7": "10.9.0", "2.8": "10.12.0", "2.9": "10.13.3",
    "2.10": "10.14.1", "2.11": "10.15.1", "2.12": "10.16.1", "2.13": "11.0.0", "2.14": "11.1.0",
}


def _forget() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in ("torch_tensorrt", "tensorrt"):
            del sys.modules[name]
    # Loggers outlive modules: what an engine load attached to the package's loggers goes
    # with the package, as in a fresh process.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch_tensorrt"):
            logging.getLogger(name).filters.clear()


# Exporting a model and decomposing the export take seconds of CPU each, the same
# work for every load of one model, dtype, seed and profile: the tests' processes keep both
# (the engine's export code still runs once per key; nothing the tests check depends on
# whether a result was kept). Keyed by what export_model reads.
_EXPORTS: dict[str, Any] = {}
_DECOMPOSED: dict[int, tuple[Any, Any]] = {}  # id(exported program) -> (it, decomposed)


def _kept_export(spec: Any, config: Any, shapes: Any) -> Any:
    import dataclasses
    import json

    from autotune.engines import _trt_build

    key = json.dumps([dataclasses.asdict(spec), config.dtype, config.device, config.seed,
                      config.weights, shapes.as_dict(), _trt_build.attention_option(config)],
                     sort_keys=True, default=str)
    if key not in _EXPORTS:
        _EXPORTS[key] = _trt_build.export_model(spec, config, shapes)
    return _EXPORTS[key]


def _kept_decomposition(exported_program: Any) -> Any:
    from torch_tensorrt.dynamo import lowering

    kept = _DECOMPOSED.get(id(exported_program))
    if kept is None or kept[0] is not exported_program:
        kept = (exported_program,
                exported_program.run_decompositions(lowering.get_decompositions()))
        _DECOMPOSED[id(exported_program)] = kept
    return kept[1]


def install_torch_tensorrt(monkeypatch: Any, version: str = "2.13.0",
                           package: str = "tensorrt", keep_exports: bool = True) -> Any:
    """Imports the doubles at ``version``; undone with the monkeypatch (modules forgotten).
    ``keep_exports``: exports and decompositions are reused across tests (see _EXPORTS)."""
    if package not in ("tensorrt", "tensorrt_rtx"):
        raise ValueError(f"package: expected 'tensorrt' or 'tensorrt_rtx'; got {package!r}")
    import dataclasses

    from autotune import models

    _forget()
    tiny = models.PRESETS["tiny-llama"]
    monkeypatch.setitem(models.PRESETS, TRT_MODEL, dataclasses.replace(
        tiny, name=TRT_MODEL, num_hidden_layers=2, description="tests of the double"))
    monkeypatch.syspath_prepend(str(DOUBLES_DIR))
    import tensorrt
    import torch_tensorrt

    torch_tensorrt._state.reset()
    monkeypatch.setattr(torch_tensorrt, "__version__", version)
    monkeypatch.setattr(tensorrt, "__version__", TENSORRT_FOR[".".join(version.split(".")[:2])])
    monkeypatch.setattr(tensorrt, "_package_name", package)
    if package == "tensorrt":  # TensorRT-RTX's alone
        monkeypatch.delattr(tensorrt, "DynamicShapesKernelSpecializationStrategy")
    if keep_exports:
        from autotune.engines import tensorrt as engine

        monkeypatch.setattr(engine, "export_model", _kept_export)
        monkeypatch.setattr(torch_tensorrt.dynamo._compiler, "_decompose", _kept_decomposition)
    return torch_tensorrt


def uninstall_torch_tensorrt() -> None:
    """Forgets the doubles, so that a later test without them sees no torch_tensorrt."""
    _forget()
