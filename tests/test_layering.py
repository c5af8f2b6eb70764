"""Imports only go down: pipelines -> fvlm -> anatomy -> configs (docs/architecture.md#layers-and-layout)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package -> the project packages it must not import
FORBIDDEN = {"configs": {"anatomy", "fvlm", "pipelines"}, "anatomy": {"fvlm", "pipelines"}, "fvlm": {"pipelines"}}


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_go_down(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    bad = {
        str(f.relative_to(ROOT)): sorted(_imported_roots(f) & FORBIDDEN[package])
        for f in files
        if _imported_roots(f) & FORBIDDEN[package]
    }
    assert not bad, f"{package} imports a higher layer: {bad}"


@pytest.mark.parametrize("package", ["configs", "anatomy"])
def test_lower_floors_do_not_import_torch(package: str) -> None:
    """The lower floors stay light: no training framework under configs/ or anatomy/."""
    bad = [str(f.relative_to(ROOT)) for f in (ROOT / package).rglob("*.py") if "torch" in _imported_roots(f)]
    assert not bad, f"{package} modules import torch: {bad}"


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (at any depth, relative ones made absolute)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # ``from pipelines import train``
    return out


#: the commands that share code through pipelines.cases, pipelines.inference and pipelines.config only
COMMANDS = ("pipelines.train", "pipelines.evaluate", "pipelines.predict")


@pytest.mark.parametrize("command", COMMANDS)
def test_train_evaluate_and_predict_do_not_import_one_another(command: str) -> None:
    """Issue 18: training, evaluation and prediction each import none of the other two (any import statement,
    including those inside functions); what they share lives in ``pipelines.cases`` (the data and the view),
    ``pipelines.inference`` (model loading and scoring) and ``pipelines.config`` (the recipe)."""
    files = sorted((ROOT / command.replace(".", "/")).rglob("*.py"))
    assert files, f"package {command} has no modules"
    others = [c for c in COMMANDS if c != command]
    bad = {
        str(f.relative_to(ROOT)): hits
        for f in files
        if (hits := sorted(m for m in _imported_modules(f) if any(m == o or m.startswith(o + ".") for o in others)))
    }
    assert not bad, f"{command} imports another command's package: {bad}"


#: the project's packages whose modules the import-circle test covers
PROJECT_PACKAGES = ("configs", "anatomy", "fvlm", "pipelines")


def _project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project packages (a package's ``__init__`` by its name)."""
    out: dict[str, Path] = {}
    for package in PROJECT_PACKAGES:
        for f in sorted((ROOT / package).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _import_nodes(tree: ast.AST):
    """Every ``import`` / ``from ... import`` node of ``tree`` at any depth, except under ``if TYPE_CHECKING:``
    (its ``else`` branch counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules its import statements name (see ``test_no_import_circles``)."""
    modules = _project_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # ``import fvlm.model.x.attr``: the module part
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_circle_finder_on_a_small_graph() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set(), "g": {"g"}}
    assert sorted(_circles(graph)) == [["a", "b", "c"], ["d", "e"]]


def test_no_import_circles() -> None:
    """Issue 18: no two modules of configs, anatomy, fvlm and pipelines import each other, directly or through
    others.

    The graph has an edge m -> t for every import statement of module m that names project module t: at any
    depth (imports inside functions count: a lazy import hides a circle, it does not remove it), except under
    ``if TYPE_CHECKING:``. ``import a.b`` names ``a.b``; ``from a import b`` names the module ``a.b`` when
    there is one, else the package ``a`` (its ``__init__``); relative imports are made absolute. The parent
    packages that Python runs before a module (``import a.b.c`` runs ``a/__init__`` and ``a/b/__init__``) are
    not edges, else every package whose ``__init__`` re-exports its submodules would be a circle.

    Package structure is NOT exempt: an edge from a package's ``__init__`` to its own submodule and one from a
    submodule to its package's ``__init__`` count like any other, so a submodule that imports from its own
    package's ``__init__`` while that ``__init__`` imports the submodule is a circle (import the defining
    module instead). None is needed to keep ordinary packages out of the report: no package has such a pair.
    """
    graph = _import_graph()
    circles = _circles(graph)
    detail = [f"{c}: " + ", ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c))) for c in circles]
    assert not circles, "import circles:\n" + "\n".join(detail)
