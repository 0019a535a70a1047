"""The import arrows between our modules (docs/architecture.md, "Import arrows").

Read from the source with ``ast``, so an import inside a function counts as much as
one at the top of a module: both are an arrow a reader follows. Imports under
``if TYPE_CHECKING:`` do not count (they never run; they name types only).
"""

from __future__ import annotations

import ast
from pathlib import Path

from django.conf import settings

PACKAGES = ("access", "console", "monitoring", "rollout", "stagegate", "tuning")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every dotted name ``module`` imports, at any depth of its code, outside
    ``if TYPE_CHECKING:``; ``from a import b`` gives ``a.b`` (a module or a name in
    ``a``), relative imports resolved against ``module``."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return names


def import_graph() -> dict[str, set[str]]:
    """Our module -> the modules of ours it imports (itself left out)."""
    root = Path(settings.BASE_DIR)
    paths = {
        module_name(path, root): path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
    }

    def ours(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in paths.items():
        names = imported_names(path.read_text(), module, is_package=path.name == "__init__.py")
        graph[module] = {found for name in names if (found := ours(name))} - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each
    sorted: every import cycle lies inside one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def arrows(graph: dict[str, set[str]], source: str, target: str) -> list[str]:
    """``a -> b`` for every module of package ``source`` importing one of ``target``."""
    return sorted(
        f"{module} -> {imported}"
        for module, imports in graph.items()
        if module.split(".")[0] == source
        for imported in imports
        if imported.split(".")[0] == target
    )


# --- the reader itself ------------------------------------------------------------------------


def test_imported_names_sees_function_level_imports_and_skips_type_checking():
    source = """
from typing import TYPE_CHECKING

import rollout.models
from access import keys
from monitoring.audit import ObjectType

if TYPE_CHECKING:
    from console.views import orgs
else:
    from stagegate import errors


def later():
    from rollout.tasks import check_tripwires
    from . import sibling
    from ..plans import plan_doc
"""
    names = imported_names(source, "rollout.sub.module")

    assert names == {
        "typing.TYPE_CHECKING",
        "rollout.models",
        "access.keys",
        "monitoring.audit.ObjectType",
        "stagegate.errors",
        "rollout.tasks.check_tripwires",
        "rollout.sub.sibling",
        "rollout.plans.plan_doc",
    }


def test_cycles_finds_a_cycle_through_three_modules_and_nothing_in_a_chain():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}

    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_reads_our_packages():
    graph = import_graph()

    assert set(PACKAGES) <= {module.split(".")[0] for module in graph}
    assert "monitoring.audit" in graph["access.keys"]


# --- the arrows -----------------------------------------------------------------------------


def test_no_import_cycle_between_our_modules():
    found = cycles(import_graph())

    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_rollout_imports_nothing_of_access():
    """Access reads rollout's plans and releases; rollout never reads access."""
    offenders = arrows(import_graph(), "rollout", "access")

    assert offenders == [], "rollout imports access: " + ", ".join(offenders)


def test_monitoring_imports_nothing_of_access():
    """Monitoring is below access: the proxy hands it what it records. The assertion
    lists every offending import."""
    offenders = arrows(import_graph(), "monitoring", "access")

    assert offenders == [], "monitoring imports access: " + ", ".join(offenders)
