"""On-disk cache of compiled Torch-TensorRT modules, so a resumed study does not compile again.

Format choice. ``torch_tensorrt.save`` offers an ExportedProgram and a TorchScript form, and
neither fits: a module reloaded from the ExportedProgram form holds its engines as constants
of ``execute_engine`` nodes, and one reloaded from TorchScript holds ScriptModules, so in both
``runtime.weight_streaming`` finds no ``_run_on_acc`` TorchTensorRTModule children and reports
``total_device_budget == 0`` (research note §1.1). We therefore store each engine through
``TorchTensorRTModule.get_extra_state()`` (its serialized engine, bindings and settings: the
state ``torch.save``/``load_state_dict`` of that module round-trip) beside the partitioned
GraphModule with empty engine placeholders, and on load put each engine back with
``set_extra_state``. The reloaded module has the original tree, so weight streaming sees every
engine, and deserialization applies TensorRT's automatic budget as a fresh compile does (§1.4).

The file is a pickle (``torch.load(weights_only=False)``): only files this module wrote, in a
directory the user owns, are read. A file that fails to load is reported and treated as a
miss. This module does not decide what goes into the key; :mod:`autotune.engines.tensorrt`
does.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 2
_ENGINE_IDX = 3  # where Torch-TensorRT's engine info list holds the serialized engine


def default_cache_dir() -> Path:
    """``$AUTOTUNE_TRT_CACHE``, else ``$XDG_CACHE_HOME/autotune/trt`` (``~/.cache/...``)."""
    if os.environ.get("AUTOTUNE_TRT_CACHE"):
        return Path(os.environ["AUTOTUNE_TRT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autotune" / "trt"


def cache_key(fields: dict[str, Any]) -> str:
    """A stable digest of everything the compiled module depends on."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _engine_state(child: Any) -> Any:
    """``child.get_extra_state()``, which Torch-TensorRT 2.11 cannot give for a live C++
    engine: its ``if self.engine:`` asks a TorchScript object for ``__len__`` (raising
    NotImplementedError). Then the tuple ``set_extra_state`` reads is built from the engine's
    serialized engine, which the module keeps (``_pack_engine_info``), as its own
    ``get_extra_state`` does for a module whose engine is not set up."""
    try:
        return child.get_extra_state()
    except NotImplementedError:
        # What get_extra_state gives for a module holding its serialized engine: the packed
        # engine info, the engine base64-encoded (set_extra_state decodes it).
        info = child._pack_engine_info()
        info[_ENGINE_IDX] = base64.b64encode(info[_ENGINE_IDX])
        return (child.name, info, child.input_binding_names, child.output_binding_names)


def _engine_children(module: Any) -> list[str]:
    return [name for name, _ in module.named_children() if "_run_on_acc" in name]


class ModuleCache:
    """Compiled modules by key, one file each: ``<dir>/<key>.trtcache``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.trtcache"

    def load(self, key: str) -> tuple[Any, dict[str, Any]] | None:
        """The cached module and its recorded metadata, or None on a miss."""
        import torch

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            blob = torch.load(path, weights_only=False, map_location="cpu")
            if blob.get("format") != FORMAT or blob.get("key") != key:
                log.warning("ignoring TensorRT cache file %s: unknown format or key", path)
                return None
            module = blob["skeleton"]
            for name, state in blob["engines"].items():
                getattr(module, name).set_extra_state(state)
        except Exception as e:  # a corrupt or foreign file is a miss, never a crash
            log.warning("ignoring unreadable TensorRT cache file %s (%s)", path, e)
            return None
        return module, blob["meta"]

    def save(self, key: str, module: Any, engine_class: type, meta: dict[str, Any]) -> Path:
        """Writes the module atomically; the module is unchanged afterwards."""
        import torch

        names = _engine_children(module)
        engines = {name: _engine_state(getattr(module, name)) for name in names}
        originals = {name: getattr(module, name) for name in names}
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        try:
            # Empty placeholders keep the GraphModule's call_module targets valid while the
            # engines travel separately as their extra state.
            for name in names:
                setattr(module, name, engine_class())
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            os.close(fd)
            # Protocol 4: a 7B engine in base64 is an 18 GB string (protocol 2 stops at 4 GiB).
            torch.save({"format": FORMAT, "key": key, "meta": meta, "skeleton": module,
                        "engines": engines}, tmp, pickle_protocol=4)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new
        except Exception:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)
            raise
        finally:
            for name, child in originals.items():
                setattr(module, name, child)
        return path
