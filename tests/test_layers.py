"""The house rules of ``core/``, read from the source: no import loops, and every module imports only
its own layer or the layers below it.

Layers, lowest first: contract < blocks < backbone < evaluation < running < testing
(``core/contract/``, ``core/blocks/``, ..., ``core/testing/``). Every import counts — at module
level and inside functions (a function-level import still makes the two modules depend on each
other, it only hides the loop until run time) — relative ones and absolute ``tokenloom.*`` ones, with
the old ``tokenloom.<module>`` paths resolved through :data:`tokenloom.LAYOUT`. ``core/__init__.py``
and ``core/__main__.py`` are exempt from the layer rule (the package front door and the CLI entry);
they still count for loops.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tokenloom

CORE = Path(tokenloom.__file__).resolve().parent
PACKAGE = "tokenloom"
LAYERS = ("contract", "blocks", "backbone", "evaluation", "running", "testing")
EXEMPT = {PACKAGE, f"{PACKAGE}.__main__"}
#: ``tokenloom.<module>`` -> ``tokenloom.<layer>.<module>`` (the lazy aliases of tokenloom/__init__)
ALIASES = {f"{PACKAGE}.{m}": f"{PACKAGE}.{layer}.{m}" for layer, mods in tokenloom.LAYOUT.items() for m in mods}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CORE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(CORE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """The layer index of a ``tokenloom.*`` module (None: the package itself or ``__main__``)."""
    parts = module.split(".")
    if len(parts) < 2 or module in EXEMPT:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The core module ``target`` names (aliases resolved), or None when it is not part of core."""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return None
    if target.startswith(f"{PACKAGE}.plugins"):
        return None  # plugins/ is a separate tree: core never imports it (checked below)
    for alias, real in ALIASES.items():
        if target == alias or target.startswith(alias + "."):
            target = real + target[len(alias):]
            break
    while target not in modules and "." in target:
        target = target.rsplit(".", 1)[0]  # tokenloom.blocks.sampling.SamplerChain -> the module
    return target if target in modules else None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported core module, line)`` for every import in the file, at any depth."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from X import Y``: Y may be a submodule of X (``from ..backbone import dist``)
            targets = [f"{stem}.{a.name}" for a in node.names]
        for t in targets:
            mod = resolve(t, modules)
            if mod is not None and mod != name:
                found.append((mod, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = core_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        graph[name] = {}
        for mod, line in imports_of(name, path, modules):
            graph[name].setdefault(mod, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


GRAPH = import_graph()


def test_the_graph_is_read():
    # the parser sees what it must: module-level, function-level, relative, absolute and aliased imports
    assert f"{PACKAGE}.contract.errors" in GRAPH[f"{PACKAGE}.contract.registry"]
    assert f"{PACKAGE}.contract.registry" in GRAPH[f"{PACKAGE}.contract.config"]
    assert f"{PACKAGE}.backbone.dist" in GRAPH[f"{PACKAGE}.running.pipeline"]  # from ..backbone import dist
    assert f"{PACKAGE}.running.cli" in GRAPH[f"{PACKAGE}.__main__"]
    assert len(GRAPH) >= 30
    assert all(layer_of(m) is not None for m in GRAPH if m not in EXEMPT and m.count(".") >= 2)


def test_resolution_of_aliases_and_function_level_imports(tmp_path):
    mods = core_modules()
    src = ("import tokenloom.sampling\nfrom tokenloom.pipeline import run\n"
           "def f():\n    from .. import __version__\n    from ..blocks import rng\n")
    (tmp_path / "x.py").write_text(src)
    found = {m for m, _ in imports_of(f"{PACKAGE}.running.x", tmp_path / "x.py", mods)}
    assert found == {f"{PACKAGE}.blocks.sampling", f"{PACKAGE}.running.pipeline", PACKAGE,
                     f"{PACKAGE}.blocks.rng"}


def test_cycle_finder_finds_a_loop():
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_loops():
    cycles = find_cycles(GRAPH)
    lines = [" <-> ".join(c) + ": " + "; ".join(f"{a} imports {b} (line {GRAPH[a][b]})"
                                                for a in c for b in GRAPH[a] if b in c)
             for c in cycles]
    assert not cycles, "import loops in core:\n" + "\n".join(lines)


def test_layer_rule():
    wrong = []
    for mod, deps in GRAPH.items():
        mine = layer_of(mod)
        if mine is None:
            continue
        for dep, line in deps.items():
            theirs = layer_of(dep)
            if theirs is not None and theirs > mine:
                wrong.append(f"{mod} (layer {LAYERS[mine]}) imports {dep} (layer {LAYERS[theirs]}), line {line}")
    assert not wrong, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(wrong)


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_layer_packages_are_plain(layer):
    # a layer's __init__ imports nothing: importing one module never drags in its neighbours
    assert GRAPH[f"{PACKAGE}.{layer}"] == {}


def test_core_never_imports_plugins():
    hits = []
    for name, path in core_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            hits += [f"{name}: {n}" for n in names if n.startswith(f"{PACKAGE}.plugins")]
    assert not hits, hits
