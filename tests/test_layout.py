"""The package's layout: each folder is one stage of a study, and imports only go down.

Every ``import`` of every module counts, wherever it stands (a function's lazy import, a
``TYPE_CHECKING`` block): a module may import modules of its own layer and of the layers below
it, never one above, and no chain of imports comes back to where it started.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "autotune"

# Top first: how a study flows, from the command down to what everything uses.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # What users run or import: the command line, and the Python names the README documents.
    ("entry points", ("autotune.__main__", "autotune.cli", "autotune.demo", "autotune.stdio",
                      "autotune.stopping", "autotune.deploy")),
    ("results", ("autotune.results",)),  # what a study leaves: recommendation, report, ...
    ("tune", ("autotune.tune",)),  # the study, its sampler and prior, its trial budget
    ("measure", ("autotune.measure",)),  # the worker process, the trial, the timed path
    ("engines", ("autotune.engines",)),  # engines behind one contract, their memory plans
    ("streaming", ("autotune.streaming",)),  # the native weight-streaming runtime
    ("utilities", ("autotune", "autotune.errors", "autotune.gpu", "autotune.jsonfile",
                   "autotune.landscape", "autotune.models", "autotune.precision",
                   "autotune.storage", "autotune.units")),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The index of the module's layer in LAYERS (None: in none of them). A name that is a
    folder's covers the modules below it; an exact name wins over its folder."""
    best: tuple[int, int] | None = None  # (length of the name matched, layer)
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            exact = module == name
            below = module.startswith(name + ".") and name != "autotune"
            if (exact or below) and (best is None or len(name) + exact > best[0]):
                best = (len(name) + exact, index)
    return None if best is None else best[1]


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The autotune modules ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "autotune")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            if base.split(".")[0] != "autotune":
                continue
            for alias in node.names:  # `from pkg import module` imports that module
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a layer above the importer's, in words."""
    out = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb < la:
                out.append(f"{a} ({LAYERS[la][0]}) imports {b} ({LAYERS[lb][0]})")
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (each as the modules along it, the first repeated at the end)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                found.append([*path[path.index(n):], n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_every_module_is_in_a_layer() -> None:
    unplaced = [m for m in modules() if layer_of(m) is None]
    assert not unplaced, f"put these in a layer of LAYERS (tests/test_layout.py): {unplaced}"


def test_every_import_names_a_module_of_the_tree() -> None:
    """Internal code imports modules where they are, never by a name that is gone."""
    known = set(modules())
    stray = {f"{a} imports {b}" for a, bs in graph().items() for b in bs if b not in known}
    assert not stray, "\n".join(sorted(stray))


def test_imports_only_go_down() -> None:
    edges = graph()
    assert edges["autotune.tune.study"], "the parser found no import at all"
    assert not upward(edges), "imports of a layer above:\n" + "\n".join(upward(edges))


def test_no_import_cycle() -> None:
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize(("edges", "up", "cyclic"), [
    ({"autotune.engines.base": {"autotune.measure.timing"}}, 1, False),  # engines -> measure
    ({"autotune.models": {"autotune.tune.study"}}, 1, False),  # a utility -> tune
    ({"autotune.tune.search": {"autotune.tune.study"},
      "autotune.tune.study": {"autotune.tune.search"}}, 0, True),  # one layer, a cycle
    ({"autotune.cli": {"autotune.tune.study"}, "autotune.tune.study": {"autotune.units"}},
     0, False),
])
def test_the_checks_can_fail(edges: dict[str, set[str]], up: int, cyclic: bool) -> None:
    assert len(upward(edges)) == up
    assert bool(cycles(edges)) == cyclic


def test_lazy_and_from_imports_are_seen(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from autotune.tune import study\n    import autotune.gpu\n"
                      "from autotune.engines.base import Engine\n")
    known = {"autotune.tune.study", "autotune.gpu", "autotune.engines.base"}
    assert imports_of("autotune.measure.m", source, known) == known
