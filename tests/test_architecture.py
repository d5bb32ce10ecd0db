"""Imports point one way: down the layers of docs/architecture.md, never in a circle.

Every `import` of a project module counts, wherever it stands: at the top of a module,
inside a function, or under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT_TOP = ("fl_app", "strategies", "deploy", "scripts", "run_simulation", "examples")

# Lowest first. A module may import modules of a lower layer, or of its own unit; units
# that share a layer (ml and strategies; server and client) do not import each other.
LAYERS: list[tuple[str, list[str]]] = [
    ("schema · flower internals", ["fl_app", "fl_app.schema", "fl_app.flower_internals"]),
    ("wire", ["fl_app.wire", "fl_app.codecs"]),
    ("protocol", ["fl_app.protocol"]),
    ("data", ["fl_app.data"]),
    ("ml · strategies", ["fl_app.ml", "strategies"]),
    ("server · client", ["fl_app.server", "fl_app.client"]),
    ("app · worker", ["fl_app.app", "fl_app.worker"]),
    ("cli", ["fl_app.cli"]),
    ("api", ["fl_app.api"]),
    ("entry points · deploy · scripts · examples",
     ["run_simulation", "deploy", "scripts", "examples"]),
]
PACKAGE_ROOTS = {"fl_app"}  # a root unit holds the package's __init__ only

Graph = Mapping[str, set[str]]


def unit_of(module: str) -> str | None:
    """The declared unit (e.g. `fl_app.data`) that `module` belongs to, or None."""
    units = [unit for _, layer in LAYERS for unit in layer]
    matches = [unit for unit in units if module == unit or (
        module.startswith(unit + ".") and unit not in PACKAGE_ROOTS)]
    return max(matches, key=len, default=None)


def rank_of(unit: str) -> int:
    """The position of `unit`'s layer, lowest 0."""
    return next(i for i, (_, layer) in enumerate(LAYERS) if unit in layer)


def module_name(path: Path) -> str:
    """`fl_app/data/sources.py` -> `fl_app.data.sources`; a package's `__init__` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The project modules a parsed module imports, anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, for every module of the project."""
    paths = {module_name(p): p for top in PROJECT_TOP
             for p in ([ROOT / f"{top}.py"] if (ROOT / f"{top}.py").is_file()
                       else sorted((ROOT / top).rglob("*.py")))}
    modules = set(paths)
    return {name: project_imports(ast.parse(path.read_text(encoding="utf-8")), modules) - {name}
            for name, path in paths.items()}


def layer_violations(graph: Graph) -> list[str]:
    """Imports of an undeclared module, upward, or across units of one layer."""
    problems = []
    for module, imported in sorted(graph.items()):
        unit = unit_of(module)
        if unit is None:
            problems.append(f"{module} belongs to no layer: add it to LAYERS and "
                            "docs/architecture.md")
            continue
        for target in sorted(imported):
            target_unit = unit_of(target)
            if target_unit is None or target_unit == unit:
                continue
            if rank_of(target_unit) >= rank_of(unit):
                direction = "across" if rank_of(target_unit) == rank_of(unit) else "up"
                problems.append(f"{module} ({unit}) imports {target} ({target_unit}): "
                                f"{direction}, not down the layers")
    return problems


def cycles(graph: Graph) -> list[list[str]]:
    """Every import circle found by a depth-first walk (each reported once, as a path)."""
    found: list[list[str]] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append([*stack[stack.index(target):], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def _format(paths: Iterable[list[str]]) -> str:
    return "; ".join(" -> ".join(path) for path in paths)


def test_imports_point_down_the_layers():
    violations = layer_violations(import_graph())
    assert not violations, "\n".join(violations)


def test_no_module_imports_itself_through_a_circle():
    circles = cycles(import_graph())
    assert not circles, _format(circles)


CLIENT_SIDE = ("fl_app.client", "fl_app.worker", "fl_app.ml", "fl_app.data")


def server_imports_on_the_client_side(graph: Graph) -> list[str]:
    """Client-side modules that import the server's strategies (what both sides compute
    lives in `fl_app.protocol`)."""
    return [f"{module} imports {target}" for module, imported in sorted(graph.items())
            if unit_of(module) in CLIENT_SIDE
            for target in sorted(imported) if unit_of(target) == "strategies"]


def test_the_client_side_never_imports_the_servers_strategies():
    found = server_imports_on_the_client_side(import_graph())
    assert not found, "\n".join(found)
    assert server_imports_on_the_client_side(
        {"fl_app.client.keras_client": {"strategies.clipping"}})  # a planted one is caught


def test_the_walk_sees_imports_inside_functions_and_type_checking_blocks():
    graph = import_graph()
    assert "fl_app.data.sources" in graph["fl_app.data.settings"]  # inside a function
    assert "fl_app.ml.models" in graph["fl_app.ml.settings"]  # inside a function
    assert "fl_app.cli.simulate" in graph["run_simulation"]


@pytest.mark.parametrize("graph, expected", [
    ({"fl_app.schema": {"fl_app.wire"}, "fl_app.wire": set()}, "up, not down"),
    ({"strategies.dp": {"fl_app.ml.trainer"}, "fl_app.ml.trainer": set()}, "across"),
    ({"fl_app.server.runner": {"fl_app.app.config"}, "fl_app.app.config": set()}, "up"),
    ({"fl_app.newthing": set()}, "belongs to no layer"),
])
def test_a_planted_upward_or_sideways_import_is_caught(graph, expected):
    assert any(expected in problem for problem in layer_violations(graph))


def test_a_planted_circle_is_caught():
    graph = {"fl_app.data.sources": {"fl_app.data.partitioning"},
             "fl_app.data.partitioning": {"fl_app.data.node_files"},
             "fl_app.data.node_files": {"fl_app.data.sources"}}
    assert not layer_violations(graph)  # all in one unit: only the circle is wrong
    (circle,) = cycles(graph)
    assert circle[0] == circle[-1] and set(circle) == set(graph)


def test_layers_in_the_architecture_doc_match_the_declared_order():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    positions = [doc.index(f"`{unit}`") for _, layer in reversed(LAYERS) for unit in layer
                 if unit not in PACKAGE_ROOTS]
    assert positions == sorted(positions), "docs/architecture.md lists the layers top-down"
