"""The layout is a contract: which part may import which, no cycles, trainables stays plain PyTorch.

Every import counts, module-level and function-level alike (a cycle hidden inside a function
is still a cycle). The table below is the one docs/design.md ("Layout") shows; a change to
the architecture changes both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# part -> the parts it may import (besides itself and trainables). Lower parts never import higher ones.
ALLOWED: dict[str, set[str]] = {
    "orchestrator.credentials": set(),
    "orchestrator.display": set(),
    "orchestrator.searchfile": {"orchestrator.credentials"},
    "orchestrator.studies": {"orchestrator.searchfile"},
    "orchestrator.tracking": {"orchestrator.credentials", "orchestrator.searchfile", "orchestrator.display"},
    "orchestrator.state": {"orchestrator.credentials", "orchestrator.searchfile", "orchestrator.tracking"},
    "orchestrator.reports": {"orchestrator.tracking", "orchestrator.studies", "orchestrator.display"},
    "orchestrator.running": {
        "orchestrator.credentials",
        "orchestrator.searchfile",
        "orchestrator.studies",
        "orchestrator.tracking",
        "orchestrator.state",
        "orchestrator.reports",
    },
    "orchestrator.ui": set(),
    "orchestrator.cli": {
        "orchestrator.credentials",
        "orchestrator.display",
        "orchestrator.searchfile",
        "orchestrator.studies",
        "orchestrator.tracking",
        "orchestrator.state",
        "orchestrator.reports",
        "orchestrator.running",
        "orchestrator.ui",
    },
}
# the modules of the flat layout, kept importable for searches saved before the move (orchestrator/moved.py)
ALIASES = "orchestrator.moved"
# trainables imports neither orchestrator nor the services; only its Ray adapter knows Ray
SERVICES = ("ray", "mlflow", "optuna")
RAY_ADAPTER = "trainables.ray_trainable"


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("orchestrator", "trainables"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports at run time, at any depth of its code (relative imports resolved)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            # `from orchestrator.tracking import links` imports a module, not a name
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return out


def _internal(imports: set[str]) -> set[str]:
    """The project's own modules among ``imports`` (a name imported from a package counts as the package)."""
    out = set()
    for imported in imports:
        while imported and imported not in MODULES:
            imported = imported.rpartition(".")[0]
        if imported:
            out.add(imported)
    return out


def part_of(module: str) -> str:
    """The part a module belongs to: its sub-package of orchestrator (or cli), or trainables."""
    pieces = module.split(".")
    if pieces[0] == "trainables":
        return "trainables"
    return ".".join(pieces[:2]) if len(pieces) > 1 else "orchestrator"


GRAPH = {name: _internal(_imports(name, path)) - {name} for name, path in MODULES.items()}


def test_every_orchestrator_module_lives_in_a_part_of_the_contract():
    loose = [m for m in MODULES if m.startswith("orchestrator.") and part_of(m) not in ALLOWED and m != ALIASES]
    assert not loose, f"modules outside the parts of the layout (docs/design.md, Layout): {loose}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("orchestrator.") and m != ALIASES))
def test_each_part_imports_only_what_the_contract_allows(module):
    part = part_of(module)
    allowed = ALLOWED.get(part, set()) | {part, "trainables", "orchestrator"}
    wrong = sorted(i for i in GRAPH[module] if part_of(i) not in allowed)
    assert not wrong, f"{module} ({part}) imports {wrong}; {part} may import {sorted(ALLOWED.get(part, set()))}"


def test_the_top_level_package_imports_nothing_but_the_aliases():
    assert GRAPH["orchestrator"] <= {ALIASES}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("trainables")))
def test_trainables_is_plain_pytorch(module):
    imports = _imports(module, MODULES[module])
    assert not any(i.split(".")[0] == "orchestrator" for i in imports), f"{module} imports orchestrator"
    services = {i for i in imports if i.split(".")[0] in SERVICES}
    if module == RAY_ADAPTER:
        services = {i for i in services if i.split(".")[0] != "ray"}
    assert not services, f"{module} imports {sorted(services)}; only {RAY_ADAPTER} may import ray"


def test_no_import_cycles_even_through_function_level_imports():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if nxt.startswith("orchestrator") and "." not in nxt:
                continue  # the package itself: importing a sub-module runs its __init__, which imports nothing
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def longest_chain() -> list[str]:
    """The longest import chain in the project (for the design doc and the note)."""
    memo: dict[str, list[str]] = {}

    def walk(node: str) -> list[str]:
        if node not in memo:
            memo[node] = [node]  # guard; the graph is acyclic (test above)
            best = max((walk(n) for n in GRAPH[node] if n != "orchestrator"), key=len, default=[])
            memo[node] = [node, *best]
        return memo[node]

    return max((walk(m) for m in GRAPH), key=len)


if __name__ == "__main__":
    chain = longest_chain()
    print(f"longest import chain: {len(chain)} modules: " + " -> ".join(chain))
    print(f"{sum(len(v) for v in GRAPH.values())} imports between {len(GRAPH)} modules")
