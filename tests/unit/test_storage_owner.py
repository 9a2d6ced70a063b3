"""Only ``pipeline.storage`` reads a location (issue 25): one owner, so one guard.

A read that skips storage skips the network guard too (``pipeline.netguard``: protocol checks,
the SSRF-guarded opener, size limits). The source of pipeline/, dags/ and imagen/ is read with
``ast`` (nothing is imported) and every module other than the owners below fails this test when it

- imports fsspec, urllib.request or http.client (``import``, ``from ... import``, aliased or
  inside a function alike);
- calls ``url_to_fs`` (``storage.url_to_fs`` too: an fsspec filesystem held outside storage
  lists and opens past it), ``fsspec.open`` or ``fsspec.filesystem``;
- calls the builtin ``open()`` on an argument named like a location (``uri``, ``url``,
  ``*_uri``, ``*_url``, ``location``, also inside an f-string or ``os.path.join``): a URI is
  opened with ``storage.open``.

Local files that are local by construction (a temporary file, a lock file, a model folder
checked with ``os.path.isdir``) keep ``open(path)``. ``imagen/`` never imports the pipeline: it
reads local paths itself and remote ones through an injected ``storage=`` object
(``imagen/checkpoint.py``), which calls ``storage.open``, not the builtin, and so passes.
"""

from __future__ import annotations

import ast
import os
import re

from tests.unit.source_walk import ROOT, import_aliases, python_files

SOURCE_DIRS = ("pipeline", "dags", "imagen")
# The owners: storage, the network guard below it, and img2dataset's download child (which
# patches img2dataset's fetch and reads the shard stats img2dataset wrote).
OWNERS = {"pipeline/storage.py", "pipeline/netguard.py", "pipeline/data/fetch_guard.py"}
NETWORK_MODULES = ("fsspec", "urllib.request", "http.client")
FS_CALLS = ("fsspec.open", "fsspec.filesystem", "fsspec.core.open")
URI_NAME = re.compile(r"uri|url|location|\w+_uri|\w+_url")
# (file, finding) pairs that may stay, each with its reason. A stale entry fails the test too.
EXCEPTIONS = {
    # MLflow's /health on the tracking server the operator configured (MLFLOW_TRACKING_URI or
    # --tracking-uri): the MLflow client talks to that same server anyway, unguarded by design.
    ("pipeline/tracking.py", "imports urllib.request"):
        "health probe of the operator's tracking server",
    # The dev services (tests, demo) start MLflow and Airflow on this machine and poll their
    # loopback ports, which the guard would rightly refuse.
    ("pipeline/dev/services.py", "imports urllib.request"): "polls the local dev services on loopback",
}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _is_network(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in NETWORK_MODULES)


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The network modules an import statement brings in (``from urllib import request`` too)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _is_network(a.name)]
    if node.level or not node.module:
        return []
    if _is_network(node.module):
        return [node.module]
    return [f"{node.module}.{a.name}" for a in node.names if _is_network(f"{node.module}.{a.name}")]


def _uri_names(arg: ast.AST) -> list[str]:
    """Names (variables, attributes) inside ``arg`` that say they hold a location."""
    found = []
    for node in ast.walk(arg):
        name = getattr(node, "id", None) or getattr(node, "attr", None)  # a Name or an Attribute
        if isinstance(name, str) and URI_NAME.fullmatch(name.lower()):
            found.append(name)
    return found


def _call_finding(node: ast.Call, aliases: dict[str, str]) -> str | None:
    name = _dotted(node.func)
    if name is None:
        return None
    head, _, rest = name.partition(".")
    resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
    if name.rsplit(".", 1)[-1] == "url_to_fs" or resolved.rsplit(".", 1)[-1] == "url_to_fs":
        return f"calls {name}"
    if resolved in FS_CALLS:
        return f"calls {resolved}"
    builtin_open = (name == "open" and "open" not in aliases) or resolved in ("builtins.open", "io.open")
    first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "file"), None)
    if builtin_open and first is not None and (uris := _uri_names(first)):
        return f"calls open({uris[0]})"
    return None


def findings(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, what) for each way ``source`` reads a location past ``pipeline.storage``."""
    tree = ast.parse(source, filename)
    aliases = import_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found += [(node.lineno, f"imports {m}") for m in _imported(node)]
        elif isinstance(node, ast.Call) and (what := _call_finding(node, aliases)):
            found.append((node.lineno, what))
    return sorted(found)


# --- the checker can fail --------------------------------------------------------------------

BAD = '''
import fsspec
import urllib.request as ur
from urllib import request
from http import client
import http.client
from fsspec.core import url_to_fs as split
from pipeline import storage

def read(uri, out_url, cfg, path):
    fsspec.open(uri)
    fsspec.filesystem("s3")
    split(uri)
    fs, p = storage.url_to_fs(uri)
    open(uri)
    open(out_url, "w")
    open(cfg.location)
    open(f"{uri}/x.json")
    open(file=os.path.join(out_url, "a"))
    import builtins
    builtins.open(uri)
'''


def test_the_checker_names_every_way_past_storage():
    assert findings(BAD) == [
        (2, "imports fsspec"), (3, "imports urllib.request"), (4, "imports urllib.request"),
        (5, "imports http.client"), (6, "imports http.client"), (7, "imports fsspec.core"),
        (11, "calls fsspec.open"), (12, "calls fsspec.filesystem"), (13, "calls split"),
        (14, "calls storage.url_to_fs"), (15, "calls open(uri)"), (16, "calls open(out_url)"),
        (17, "calls open(location)"), (18, "calls open(uri)"), (19, "calls open(out_url)"),
        (21, "calls open(uri)"),
    ]


def test_the_checker_accepts_storage_and_local_files():
    good = '''
import os, tempfile, json
from pipeline import storage

def read(uri, path, storage=None):
    with storage.open(uri, "rb") as f:        # imagen/checkpoint.py's injected storage= too
        data = f.read()
    with open(path, "rb") as f:                # a local path by construction
        data += f.read()
    with open(os.path.join(tempfile.gettempdir(), "lock"), "w") as f:
        f.write("x")
    uris = storage.list_files(uri)
    return storage.read_json(uri), data, uris
'''
    assert findings(good) == []


# --- the repository ---------------------------------------------------------------------------

def test_only_storage_reads_a_location():
    found, used = [], set()
    for rel, path in python_files(SOURCE_DIRS):
        if rel in OWNERS:
            continue
        with open(path) as f:
            source = f.read()
        for line, what in findings(source, path):
            if (rel, what) in EXCEPTIONS:
                used.add((rel, what))
            else:
                found.append(f"{rel}:{line} {what}")
    assert not found, ("reads past pipeline.storage (and so past the network guard): " + "; ".join(found)
                       + ". Read, list and write locations with pipeline.storage (storage.open, "
                       "storage.list_files, storage.find, storage.isdir, ...)")
    assert used == set(EXCEPTIONS), f"stale EXCEPTIONS entries: {sorted(set(EXCEPTIONS) - used)}"


def test_the_owners_exist():
    # An owner renamed away would leave its code unchecked here: the set must name real files.
    missing = [rel for rel in OWNERS if not os.path.isfile(os.path.join(ROOT, rel))]
    assert not missing, f"OWNERS names missing files: {missing}"
