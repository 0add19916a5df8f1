"""On-disk cache of compiled Torch-TensorRT modules, so a resumed study does not compile again.

Format choice. ``torch_tensorrt.save`` offers an ExportedProgram and a TorchScript form, and
neither fits: a module reloaded from either holds no ``_run_on_acc`` TorchTensorRTModule
children, so ``runtime.weight_streaming`` reports ``total_device_budget == 0`` (research note
§1.1). Nor does the module's own ``get_extra_state``/``set_extra_state`` round trip: it
base64-encodes the engine (a 7B cache file was 18 GB for 13.5 GB of weights), and in 2.11
``set_extra_state`` asserts that the metadata it gets back is ``bytes`` where
``_pack_engine_info`` made it a ``str`` (an empty AssertionError: the cache never hit).

So an entry is a directory ``<dir>/<key>/``: each engine's serialized TensorRT engine as raw
bytes (``<child>.engine``, the file no larger than the engine), and ``module.pt``, the
partitioned GraphModule with empty engine placeholders plus what the public constructor
``TorchTensorRTModule(serialized_engine, input_binding_names, output_binding_names, name=,
settings=, ...)`` needs for each engine. Loading reads each engine once and builds the module
through that constructor, so the reloaded module has the original tree, weight streaming sees
every engine, and deserialization applies TensorRT's automatic budget as a fresh compile does
(§1.4). The module then drops its copy of the serialized engine (:func:`release_host_copy`):
TensorRT keeps its own host copy of the streamed weights, and a second one is 1x the weights of
host memory for nothing.

``module.pt`` is a pickle (``torch.load(weights_only=False)``): only entries this module wrote,
in a directory the user owns, are read. An entry that fails to load is reported and treated
as a miss. This module does not decide what goes into the key; :mod:`autotune.engines.tensorrt`
does.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 3
# What the constructor takes besides the engine, read from each compiled child. The weight
# name map serves refitting only (never done here) and may be large: it is not kept.
_CONSTRUCTOR_FIELDS = ("name", "input_binding_names", "output_binding_names", "settings",
                       "requires_output_allocator", "symbolic_shape_expressions")


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


def engine_children(module: Any) -> list[str]:
    return [name for name, _ in module.named_children() if "_run_on_acc" in name]


def release_host_copy(module: Any) -> None:
    """Drops each engine child's copy of its serialized engine once the engine is set up
    (nothing reads it afterwards but saving, which happens before)."""
    for name in engine_children(module):
        child = getattr(module, name)
        if getattr(child, "engine", None) is not None:
            child.serialized_engine = None


# The Python runtime's module keeps its binding names under other attribute names than the
# constructor parameters (and the C++ module's attributes) they come from.
_PYTHON_ATTRIBUTES = {"input_binding_names": "input_names", "output_binding_names": "output_names"}


def _field(child: Any, name: str) -> Any:
    """A constructor field as the compiled child holds it, whichever runtime's module it is."""
    if hasattr(child, name):
        return getattr(child, name)
    return getattr(child, _PYTHON_ATTRIBUTES.get(name, name), None)


def _build(engine_class: type, blob: bytes, fields: dict[str, Any]) -> Any:
    """An engine child through the public constructor, passing only the keywords this
    version's constructor has (``symbolic_shape_expressions`` is 2.10+)."""
    accepted = inspect.signature(engine_class.__init__).parameters
    kwargs = {k: v for k, v in fields.items()
              if k not in ("input_binding_names", "output_binding_names") and k in accepted}
    return engine_class(blob, fields["input_binding_names"], fields["output_binding_names"],
                        **kwargs)


class ModuleCache:
    """Compiled modules by key, one directory each: ``<dir>/<key>/``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / key

    def has(self, key: str) -> bool:
        """Whether an entry is there to read (it may still turn out unreadable)."""
        return (self.path(key) / "module.pt").is_file()

    def load(self, key: str, engine_class: type) -> tuple[Any, dict[str, Any]] | None:
        """The cached module and its recorded metadata, or None on a miss."""
        import torch

        if not self.has(key):
            return None
        path = self.path(key)
        try:
            blob = torch.load(path / "module.pt", weights_only=False, map_location="cpu")
            if blob.get("format") != FORMAT or blob.get("key") != key:
                log.warning("ignoring TensorRT cache entry %s: unknown format or key", path)
                return None
            module = blob["skeleton"]
            for name, fields in blob["engines"].items():
                engine = _build(engine_class, (path / f"{name}.engine").read_bytes(), fields)
                setattr(module, name, engine)
                engine.serialized_engine = None  # TensorRT holds the weights now
        except Exception as e:  # a corrupt or foreign entry is a miss, never a crash
            log.warning("ignoring unreadable TensorRT cache entry %s (%s: %s)", path,
                        type(e).__name__, e)
            return None
        return module, blob["meta"]

    def save(self, key: str, module: Any, meta: dict[str, Any]) -> Path:
        """Writes the entry atomically (a new directory renamed into place); the module is
        unchanged afterwards."""
        import torch

        names = engine_children(module)
        originals = {name: getattr(module, name) for name in names}
        fields = {name: {f: _field(child, f) for f in _CONSTRUCTOR_FIELDS}
                  for name, child in originals.items()}
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = Path(tempfile.mkdtemp(dir=self.directory, suffix=".tmp"))
        try:
            for name, child in originals.items():
                if not child.serialized_engine:
                    raise ValueError(f"{name} holds no serialized engine to cache")
                (tmp / f"{name}.engine").write_bytes(child.serialized_engine)
            # Empty placeholders keep the GraphModule's call_module targets valid while the
            # engines travel as files of their own. Plain modules: an empty Python-runtime
            # module would set up its (absent) engine when unpickled.
            for name in names:
                setattr(module, name, torch.nn.Module())
            torch.save({"format": FORMAT, "key": key, "meta": meta, "skeleton": module,
                        "engines": fields}, tmp / "module.pt")
            old = None
            if path.exists():  # replaced, not merged: a reader sees one whole entry or none
                old = Path(tempfile.mkdtemp(dir=self.directory, suffix=".old"))
                os.replace(path, old / "entry")
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            for name, child in originals.items():
                setattr(module, name, child)
        return path
