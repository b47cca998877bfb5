"""The import graph of the accel package has no cycle, and no class is built at run time.

The graph is read from the source (ast), not by importing: every `.py` under accel/, patches/,
calibrate/ and eval/ (mapped to accel.*, accel.patches.*, accel.calibrate.*, accel.eval.* as in
pyproject's package-dir), one edge per `import accel...` / `from ... import ...` that names an
accel module. Imports inside functions count too: a deferred import is how a cycle is usually
dodged (it then bites whoever calls the function during an import), so it is still a cycle.
Only `if TYPE_CHECKING:` blocks are skipped. A plain import of a module's own ancestor package is
not counted (Python initialises the ancestors first anyway), but reading a name from it is
(`from accel import __version__` inside accel.artifact needs accel/__init__.py to have run).
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"accel": "accel", "patches": "accel.patches", "calibrate": "accel.calibrate", "eval": "accel.eval"}


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """{module name: (file, is a package __init__)}."""
    mods = {}
    for d, pkg in PACKAGE_DIRS.items():
        for p in sorted((ROOT / d).rglob("*.py")):
            parts = list(p.relative_to(ROOT / d).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = (p, is_pkg)
    return mods


def _resolve(name: str, mods) -> str | None:
    """The accel module `name` refers to: itself, or the nearest enclosing module that exists."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _edges(name: str, path: pathlib.Path, is_pkg: bool, mods) -> dict[str, int]:
    """{imported accel module: line of the first import}."""
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: dict[str, int] = {}

    def add(target, line, reads_names=False):
        # An ancestor package is initialised before this module anyway; it is a dependency only
        # when names are read from it (`from accel import x` inside accel.y).
        if target is None or target == name or (name.startswith(target + ".") and not reads_names):
            return
        out.setdefault(target, line)

    def visit(node):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                continue
            if isinstance(ch, ast.Import):
                for a in ch.names:
                    if a.name == "accel" or a.name.startswith("accel."):
                        add(_resolve(a.name, mods), ch.lineno)
            elif isinstance(ch, ast.ImportFrom):
                if ch.level:
                    base = here[: len(here) - (ch.level - 1)]
                    src = ".".join(base + ([ch.module] if ch.module else []))
                else:
                    src = ch.module or ""
                if src != "accel" and not src.startswith("accel."):
                    continue
                for a in ch.names:
                    sub = f"{src}.{a.name}"
                    if sub in mods:
                        add(sub, ch.lineno)
                    else:
                        add(_resolve(src, mods), ch.lineno, reads_names=True)
            visit(ch)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return out


def import_graph() -> dict[str, dict[str, int]]:
    mods = _modules()
    return {m: _edges(m, p, pkg, mods) for m, (p, pkg) in mods.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        comps.append(sorted(comp))
                continue
            if w not in graph:
                continue
            if w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(graph[w])))
            elif w in on:
                low[v] = min(low[v], index[w])
    return comps


def _describe(comp, graph) -> str:
    return "; ".join(f"{m} -> {t} (line {graph[m][t]})" for m in comp for t in sorted(graph[m]) if t in comp)


def test_graph_sees_known_edges():
    """The parser must find real imports, or the no-cycle test below proves nothing."""
    g = import_graph()
    assert "accel.configs.base" in g["accel.configs.double_sparsity"]
    assert "accel.patches.core" in g["accel.patches.double_sparsity"]
    assert "accel.kernels.dispatch" in g["accel.kernels.ds_attention"]
    # A deferred (function-level) import is an edge too.
    assert "accel.patches.core" in g["accel.calibrate.runner"]
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    g = import_graph()
    cycles = find_cycles(g)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, g) for c in cycles)


def test_no_class_built_at_runtime():
    """A class statement inside a function (a class built per call, e.g. to dodge an import
    cycle) is refused in the runtime packages: subclass at module level instead."""
    found = []
    for m, (p, _) in _modules().items():
        if not (m.startswith("accel.patches") or m.startswith("accel.kernels") or m.startswith("accel.configs")
                or m.startswith("accel.offload")):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{m}:{c.lineno} class {c.name} inside {node.name}()" for c in ast.walk(node)
                          if isinstance(c, ast.ClassDef)]
    assert not found, "\n".join(found)
