"""The code's shape, checked from its source: no import cycles (function-level imports included), each
constant of `degrade` defined once, and the shards package small, one job per module, without module state."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("degrade", "dasr_model")
SHARDS_MODULES = ["strings", "format", "sample", "sources", "generate", "executor", "write", "read", "verify"]  # import order


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports, anywhere in the file (module level, inside functions,
    try blocks), except under `if TYPE_CHECKING:`. `from P import name` is an edge to P.name when that is a
    module, else to P. A package's implicit import of its parent is not an edge."""
    files = {_module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges: set[str | None] = set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for other in child.orelse:
                        visit(other)
                    continue
                if isinstance(child, ast.Import):
                    edges.update(known(alias.name) for alias in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        anchor = package
                        for _ in range(child.level - 1):
                            anchor = anchor.rpartition(".")[0]
                        base = f"{anchor}.{base}".strip(".")
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        edges.add(full if full in files else known(base))
                visit(child)

        visit(ast.parse(path.read_text(), str(path)))
        graph[module] = {e for e in edges if e is not None and e != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n\ndef f():\n    return b.g()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def g():\n    from pkg import a  # late, still a cycle\n    return a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.c"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_cycles_in_degrade_and_dasr_model():
    graph = import_graph(ROOT, PACKAGES)
    assert "degrade.shards.write" in graph and "dasr_model.data" in graph
    assert cycles(graph) == []


def test_the_shards_modules_import_only_the_ones_before_them():
    order = SHARDS_MODULES
    graph = import_graph(ROOT, ("degrade",))
    for i, name in enumerate(order):
        inside = {m.removeprefix("degrade.shards.") for m in graph[f"degrade.shards.{name}"]
                  if m.startswith("degrade.shards")}
        assert inside <= set(order[:i]), (name, inside)
        assert "degrade" not in graph[f"degrade.shards.{name}"]  # never the package's __init__ (it imports us)


def _module_constants(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        else:
            targets = [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name) and name.id.strip("_").replace("_", "").isupper():
                    names.append(name.id)
    return names


def test_each_constant_of_degrade_is_defined_once():
    where = defaultdict(list)
    for path in sorted((ROOT / "degrade").rglob("*.py")):
        for name in _module_constants(path):
            where[name].append(str(path.relative_to(ROOT)))
    assert "IMAGE_SUFFIXES" in where and "FORMAT_NAME" in where
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_the_shards_package_is_small_modules_without_module_state():
    modules = sorted((ROOT / "degrade" / "shards").glob("*.py"))
    assert {p.stem for p in modules} == {"__init__", *SHARDS_MODULES}
    assert not (ROOT / "degrade" / "dataset.py").exists()
    for path in modules:
        assert len(path.read_text().splitlines()) <= 400, path.name
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], f"{path.name} rebinds a module global"
