"""The import graph is a checked contract (DESIGN.md, issue 23).

* layers: ``service -> metanets -> merge``; no arrow upward (function-level imports included);
* no import cycle among the modules of ``merge``, ``metanets`` and ``service`` (imports under
  ``if TYPE_CHECKING:`` are annotations, not dependencies, and are left out);
* ``metanets.graph`` (parameter graphs) sits below ``metanets.base`` (the networks);
* ``bench/``, ``examples/``, ``scripts/`` and ``testkit/`` never import ``tests``.

Read from the source with ``ast`` (nothing is imported), so a violation names the file and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("merge", "metanets", "service")
LAYER = {"merge": 0, "metanets": 1, "service": 2}


def _module_name(f: Path) -> str:
    name = ".".join(f.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(f: Path, *, runtime_only: bool) -> list[tuple[str, int]]:
    """(imported name, line) for every import in ``f``, relative ones made absolute."""
    tree = ast.parse(f.read_text(), str(f))
    package = _module_name(f) if f.name == "__init__.py" else _module_name(f).rpartition(".")[0]
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node):
                skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def _sources(*folders: str) -> list[Path]:
    return sorted(p for d in folders for p in (REPO / d).rglob("*.py")
                  if "_proto" not in p.parts and not any(part.startswith(".venv") for part in p.parts))


def test_layers_point_one_way() -> None:
    bad = []
    for f in _sources(*PACKAGES):
        mine = LAYER[f.relative_to(REPO).parts[0]]
        for name, line in _imports(f, runtime_only=False):
            top = name.split(".")[0]
            if top in LAYER and LAYER[top] > mine:
                bad.append(f"{f.relative_to(REPO)}:{line} imports {name}")
    assert not bad, "upward imports (service -> metanets -> merge only):\n" + "\n".join(sorted(set(bad)))


def _graph() -> dict[str, set[str]]:
    files = {_module_name(f): f for f in _sources(*PACKAGES)}
    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        deps = set()
        for name, _line in _imports(f, runtime_only=True):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != mod:
                deps.add(name)
        graph[mod] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
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
                    out.append(sorted(comp))
    return out


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle() -> None:
    """The checker itself: a two-module cycle and a three-module one are found, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_parameter_graphs_sit_below_the_networks() -> None:
    deps = _graph()["metanets.graph"]
    assert not {d for d in deps if d == "metanets.base" or d.startswith("metanets.base.")}, deps


def test_bench_examples_scripts_and_testkit_never_import_tests() -> None:
    bad = [
        f"{f.relative_to(REPO)}:{line} imports {name}"
        for f in _sources("bench", "examples", "scripts", "testkit")
        for name, line in _imports(f, runtime_only=False)
        if name == "tests" or name.startswith("tests.")
    ]
    assert not bad, "\n".join(bad)
