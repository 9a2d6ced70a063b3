"""pipeline/ has no import cycles, keeps its layers, and every module opens with its docstring.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of a ``pipeline`` module counts, at module level and inside functions alike
(a lazy import only hides a cycle until the day someone moves it up). ``from pipeline.x import
y`` with ``y`` a submodule counts as importing ``pipeline.x.y``; importing a package counts as
importing its ``__init__``. Imports under ``if TYPE_CHECKING:`` never run and do not count.

Layers (issue 25): training never reaches release code (what both need, such as image grids,
lives below both), and only the modules in ``DEV_IMPORTERS`` import the dev tools
(``pipeline.dev``: the tiny dataset, tiny models, local services); the planner and the
calibration reach none of it, directly or through another module.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
PACKAGE = "pipeline"
DEV = "pipeline.dev"
# The only modules outside pipeline/dev/ that may import it (infra/, bench/ and tests/ may too:
# they are not part of the pipeline), each with its reason. A stale entry fails the test.
DEV_IMPORTERS = {
    "pipeline.cli": "the tiny-data verb builds the synthetic dataset and the tiny T5 for the smoke test",
    "pipeline.release.metrics": "render_references draws evaluate's tiny-data references with the "
                                "dataset's own draw_shape, so references and training images agree",
}


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
    assert "pipeline.data" in graph["pipeline.plan"]


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


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    stack = [start]
    while stack:
        for t in graph[stack.pop()] - seen:
            seen.add(t)
            stack.append(t)
    return seen


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_training_never_reaches_release_code():
    graph = import_graph()
    bad = {m: sorted(t for t in _reach(graph, m) if _in(t, "pipeline.release"))
           for m in graph if _in(m, "pipeline.train")}
    bad = {m: ts for m, ts in bad.items() if ts}
    assert not bad, f"pipeline.train reaches pipeline.release (move what both need below both): {bad}"


def test_only_the_listed_modules_import_the_dev_tools():
    graph = import_graph()
    importers = {m for m, ts in graph.items() if not _in(m, DEV) and any(_in(t, DEV) for t in ts)}
    assert importers <= set(DEV_IMPORTERS), (
        f"{sorted(importers - set(DEV_IMPORTERS))} import pipeline.dev: tools for tests and the demo "
        "are not pipeline code (move what is needed out of pipeline/dev/, or list the module here "
        "with its reason)")
    assert importers == set(DEV_IMPORTERS), f"stale DEV_IMPORTERS: {sorted(set(DEV_IMPORTERS) - importers)}"
    dags = os.path.join(ROOT, "dags")
    for name in sorted(os.listdir(dags)):
        if name.endswith(".py"):
            with open(os.path.join(dags, name)) as f:
                tree = ast.parse(f.read(), name)
            mods = [a.name for n in _imports(tree) if isinstance(n, ast.Import) for a in n.names]
            mods += [n.module or "" for n in _imports(tree) if isinstance(n, ast.ImportFrom)]
            assert not [m for m in mods if _in(m, DEV)], f"dags/{name} imports pipeline.dev"


def test_the_planner_and_calibration_reach_no_dev_tool():
    graph = import_graph()
    for module in ("pipeline.plan", "pipeline.calibrate"):
        dev = sorted(t for t in _reach(graph, module) if _in(t, DEV))
        assert not dev, f"{module} reaches {dev}: the planner measures without the dev tools"


def test_the_layer_checks_can_fail():
    graph = {"pipeline.train.trainer": {"pipeline.grids", "pipeline.x"}, "pipeline.x": {"pipeline.release.m"},
             "pipeline.grids": set(), "pipeline.release.m": set()}
    assert "pipeline.release.m" in _reach(graph, "pipeline.train.trainer")  # found through pipeline.x
    assert not _in("pipeline.devices", DEV) and _in("pipeline.dev.tinydata", DEV)
