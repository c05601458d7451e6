"""The package's import structure: no cycles, and the library never imports the applications.

Every module of `onepeace` is parsed with ast; its imports at module level AND inside functions
(absolute and relative, `import a.b` and `from .x import y`, with `from pkg import name` resolved to
the submodule pkg.name when that is a module) are the edges of a module graph. The implicit edges
to parent packages (importing onepeace.x.y runs onepeace/__init__ and onepeace/x/__init__) are not
counted: they are Python's mechanics, not a dependency the code chose.
"""
from __future__ import annotations

import ast
from pathlib import Path

import onepeace

PACKAGE_DIR = Path(onepeace.__file__).resolve().parent
LIBRARY = ("onepeace.modeling", "onepeace.data", "onepeace.losses")  # may not import the packages below
ABOVE_LIBRARY = ("onepeace.train", "onepeace.demo", "onepeace.serve", "onepeace.index", "onepeace.cli")
APPS = ("onepeace.demo", "onepeace.serve", "onepeace.cli")  # nothing outside them imports them


def _module_files() -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The onepeace modules `name` imports anywhere in its file (module level and in functions)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 = this package, 2 = its parent, ...
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            found.update(subs)
            if len(subs) < len(node.names):  # a name defined in target itself (not only its submodules)
                found.add(target)
    # keep onepeace modules only; `import a.b.c` of a non-module name resolves to its module prefix
    edges = set()
    for target in found:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target.startswith("onepeace") and target != name:
            edges.add(target)
    return edges


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    return {name: _imports(name, path, set(files)) for name, path in files.items()}


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of the graph (Tarjan), each sorted."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per strongly connected component of more than one module."""
    return [_one_cycle(graph, comp) for comp in _components(graph) if len(comp) > 1]


def _one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A concrete cycle inside a strongly connected component: a path from its first module back to it."""
    start, members = comp[0], set(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return comp


def _subpackage(module: str) -> str:
    """onepeace.index.build -> onepeace.index; onepeace.cli.embed -> onepeace.cli; onepeace.x -> onepeace.x."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed to sub-packages (and top-level modules), without self-edges."""
    deps: dict[str, set[str]] = {}
    for module, edges in graph.items():
        if module != "onepeace":
            deps.setdefault(_subpackage(module), set()).update(
                _subpackage(e) for e in edges if e != "onepeace" and _subpackage(e) != _subpackage(module))
    return deps


def _layers(packages: dict[str, set[str]]) -> list[list[str]]:
    """The sub-packages in dependency layers: each imports only earlier layers (packages that import
    each other, a package-level cycle, share one entry written {a, b})."""
    comps = _components(packages)
    comp_of = {p: i for i, comp in enumerate(comps) for p in comp}
    deps = {i: {comp_of[d] for p in comp for d in packages[p]} - {i} for i, comp in enumerate(comps)}
    layers, placed = [], set()
    while len(placed) < len(comps):
        ready = sorted(i for i in deps if i not in placed and deps[i] <= placed)
        names = [[p.removeprefix("onepeace.") for p in comps[i]] for i in ready]
        layers.append(sorted(n[0] if len(n) == 1 else "{" + ", ".join(n) + "}" for n in names))
        placed.update(ready)
    return layers


def _under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    # the known shapes: a relative `from ..x import y` inside a function of a package module
    files = _module_files()
    graph = _graph()
    assert "onepeace.cli" in graph and "onepeace.train.loop" in files
    # onepeace.train.loop imports onepeace.eval.zero_shot inside Trainer.evaluate (a function)
    assert "onepeace.eval.zero_shot" in graph["onepeace.train.loop"]
    # and the parser resolves `from . import x` (a submodule) and `from .x import y` (a name)
    mods = set(files)
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from . import inference\n    from .data.files import find_inputs\n")
    assert _imports("onepeace.fake", src, mods) == {"onepeace.inference", "onepeace.data.files"}
    # and a cycle is found and printed as a path
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _layers({"x": set(), "y": {"x"}, "z": {"y", "w"}, "w": {"z"}}) == [["x"], ["y"], ["{w, z}"]]


def test_no_import_cycles_and_the_library_below_the_applications():
    graph = _graph()
    layers = _layers(_package_graph(graph))
    print("package layers (each imports only layers above it):")
    for i, layer in enumerate(layers):
        print(f"  {i}: {', '.join(layer)}")
    cycles = _cycles(graph)
    for cycle in cycles:
        print("import cycle:", " -> ".join(cycle))
    upward = sorted((m, e) for m, edges in graph.items() if _under(m, LIBRARY) for e in edges if _under(e, ABOVE_LIBRARY))
    for m, e in upward:
        print(f"library module {m} imports {e}")
    into_apps = sorted((m, e) for m, edges in graph.items() if not _under(m, APPS) and m != "onepeace.__main__"
                       for e in edges if _under(e, APPS))
    for m, e in into_apps:
        print(f"{m} imports the application module {e}")
    assert not cycles, f"{len(cycles)} import cycle(s): " + "; ".join(" -> ".join(c) for c in cycles)
    assert not upward, f"the library imports training/apps: {upward}"
    assert not into_apps, f"library modules import the applications: {into_apps}"
