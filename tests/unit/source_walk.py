"""Reading the repository's own sources with ``ast`` (nothing imported), for the tests that hold
an owner rule (test_shard_owner, test_storage_owner, test_integrity_round3_reads)."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def python_files(dirs: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(path relative to the repository, absolute path) of every .py file under ``dirs``, sorted."""
    for top in dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, ROOT).replace(os.sep, "/"), path


def import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name for every import in ``tree`` (function level too)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names
