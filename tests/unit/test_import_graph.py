"""pipeline/ has no import cycles and every module opens with its docstring.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of a ``pipeline`` module counts, at module level and inside functions alike
(a lazy import only hides a cycle until the day someone moves it up). ``from pipeline.x import
y`` with ``y`` a submodule counts as importing ``pipeline.x.y``; importing a package counts as
importing its ``__init__``. Imports under ``if TYPE_CHECKING:`` never run and do not count.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
PACKAGE = "pipeline"


def modules() -> dict[str, str]:
    """{dotted module name: file path} for every module under pipeline/ (packages by __init__)."""
    out = {}
    base = os.path.join(ROOT, PACKAGE)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[: -len(".py")].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(dirpath, name)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _package_of(module: str, path: str) -> str:
    return module if path.endswith("__init__.py") else module.rpartition(".")[0]


def import_graph() -> dict[str, set[str]]:
    """{module: the pipeline modules it imports} (edges to modules that exist only)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative import
                    parts = _package_of(mod, path).split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base]
                targets += [f"{base}.{alias.name}" for alias in node.names
                            if f"{base}.{alias.name}" in mods]  # a submodule, not a name
            for target in targets:
                if target != PACKAGE and not target.startswith(PACKAGE + "."):
                    continue
                # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in mods and name != mod:
                        graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. A package's __init__ importing its own
    submodules is not a cycle of the submodule's making, so edges into a parent package
    from its own children are left out (Python runs the parent first either way)."""
    def parents(m: str) -> set[str]:
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    edges = {m: {t for t in ts if t not in parents(m)} for m, ts in graph.items()}
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(edges, WHITE)
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = GREY
        path.append(m)
        for t in sorted(edges[m]):
            if colour[t] == GREY:
                return path[path.index(t):] + [t]
            if colour[t] == WHITE and (found := visit(t)):
                return found
        path.pop()
        colour[m] = BLACK
        return None

    for m in sorted(edges):
        if colour[m] == WHITE and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_lazy_and_submodule_imports():
    graph = import_graph()
    # lazy (function-level) imports count
    assert "pipeline.train.trainer" in graph["pipeline.train.worker"]
    # `from pipeline.train import checkpointing as ckpt` imports the submodule
    assert "pipeline.train.checkpointing" in graph["pipeline.train.trainer"]
    # importing a submodule runs its package's __init__
    assert "pipeline.data" in graph["pipeline.data.url_list"] and "pipeline.release" in graph["pipeline.cli"]


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_pipeline_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in pipeline/: " + " -> ".join(cycle or [])


def test_every_module_opens_with_its_docstring():
    missing = []
    for mod, path in modules().items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        first = tree.body[0] if tree.body else None
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str) and first.value.value.strip()):
            missing.append(mod)
    assert not missing, f"modules without an opening docstring: {missing}"


def test_dags_import_no_private_pipeline_names():
    bad = []
    dags = os.path.join(ROOT, "dags")
    for name in sorted(os.listdir(dags)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(dags, name)
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in _imports(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE):
                bad += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, f"dags/ imports private pipeline names: {bad}"
