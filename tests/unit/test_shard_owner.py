"""One owner of the WebDataset shard format: only pipeline/data/shards.py parses tar members.

The source of pipeline/, dags/, imagen/ and infra/ is read with ``ast`` (nothing is imported),
as tests/unit/test_import_graph.py reads imports. Outside the owner, a module fails this test if it

- imports ``tarfile`` or ``webdataset`` (at module level or inside a function);
- splits something named like a member name on a dot (``member.name.partition(".")``,
  ``info.name.split(".")``, ``member_name.rsplit(".")``...): key splitting is
  :func:`pipeline.data.shards.split_key`'s;
- defines its own key splitter (a function named ``*split_key*``);
- does tar-header arithmetic (``offset - 512``, ``offset + 512``): reading at a member's offset is
  :func:`pipeline.data.shards.read_at`'s, which checks the member's name in its header.

Two readers of one format drift apart (the loader once accepted ``1.png`` for ``000001.png``);
this keeps there being one. The checks are by name and shape, so they are tested on synthetic
sources below: the old readers this module replaced fail them.
"""

from __future__ import annotations

import ast
import os
import re

from tests.unit.source_walk import ROOT, python_files

SOURCE_DIRS = ("pipeline", "dags", "imagen", "infra")
OWNER = "pipeline/data/shards.py"
FORMAT_LIBRARIES = ("tarfile", "webdataset")
# (file, finding) pairs that may stay, each with the reason. Empty: every shard reader and writer
# (the filter, embed, loader, evaluation references, the smoke test) goes through the owner.
# bench/ is outside the walk: its scripts write their own synthetic shards to time the readers.
EXCEPTIONS: dict[tuple[str, str], str] = {}
_SPLITS = ("partition", "rpartition", "split", "rsplit")
_MEMBER_LIKE = re.compile(r"member|tarinfo|\b(info|m|header)\.name$", re.IGNORECASE)


def _is_tar_block(node: ast.AST) -> bool:
    """512, or a multiple of it (``blocks * 512``): a tar header's size, member data's padding."""
    if isinstance(node, ast.UnaryOp):
        return _is_tar_block(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _is_tar_block(node.left) or _is_tar_block(node.right)
    return isinstance(node, ast.Constant) and node.value == 512


def _names_offset(node: ast.AST) -> bool:
    return "offset" in ast.unparse(node).lower()


def violations(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, finding) for each place in ``source`` that parses the shard format itself."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"imports {a.name}") for a in node.names
                      if a.name.split(".")[0] in FORMAT_LIBRARIES]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] in FORMAT_LIBRARIES:
                found.append((node.lineno, f"imports from {node.module}"))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "split_key" in node.name:
            found.append((node.lineno, f"defines {node.name}"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _SPLITS
              and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "."
              and _MEMBER_LIKE.search(ast.unparse(node.func.value))):
            found.append((node.lineno, f"splits a member name: {ast.unparse(node)}"))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub) and (
                (_is_tar_block(node.right) and _names_offset(node.left))
                or (_is_tar_block(node.left) and _names_offset(node.right))):
            found.append((node.lineno, f"tar header arithmetic: {ast.unparse(node)}"))
    return sorted(found)


# --- the checker fails on the readers it replaced ------------------------------------------------

OLD_FILTER = '''
import tarfile

def _split_key(name):
    stem, _, ext = name.partition(".")
    return stem, ext

def index(fileobj):
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        return tar.getmembers()
'''

OLD_EMBED = '''
import posixpath

def split_key(member_name):
    directory, base = posixpath.split(member_name)
    return base.partition(".")
'''

OLD_LOADER = '''
def read_image(self, offset, size):
    self.fh.seek(offset - 512)
    name = self.fh.read(512)[:100].rstrip(b"\\0").decode()
    self.fh.seek(offset + -(-size // 512) * 512)
    return name
'''

OLD_REFERENCES = '''
def load_references(path):
    import webdataset
    from tarfile import TarInfo
    for info in members:
        key, ext = info.name.split(".", 1)
        stem = member.name.rpartition(".")[0]
'''

NOT_THE_FORMAT = '''
def stem(uri):
    return storage.basename(uri).split(".", 1)[0]  # a shard file's name, not a member's

def infer(name, src):
    ext = name.rsplit(".", 1)[-1]
    dup = "dup." + src["name"].rsplit(".", 1)[1]
    pixels = image_size * 512 + width
    end = offset + size
    return shards.read_at(f, offset, shards.member_name(key, ext), size)
'''


def test_the_checker_fails_on_the_old_readers():
    assert violations(OLD_FILTER, "filters.py") == [(2, "imports tarfile"), (4, "defines _split_key")]
    assert violations(OLD_EMBED, "embed.py") == [(4, "defines split_key")]
    assert violations(OLD_LOADER, "loader.py") == [
        (3, "tar header arithmetic: offset - 512"),
        (5, "tar header arithmetic: offset + -(-size // 512) * 512")]
    assert violations(OLD_REFERENCES, "eval_data.py") == [
        (3, "imports webdataset"), (4, "imports from tarfile"),
        (6, "splits a member name: info.name.split('.', 1)"),
        (7, "splits a member name: member.name.rpartition('.')")]


def test_the_checker_passes_file_names_and_calls_into_the_owner():
    assert violations(NOT_THE_FORMAT, "x.py") == []


def test_only_the_owner_parses_tar_members():
    found, used = [], set()
    for rel, path in python_files(SOURCE_DIRS):
        if rel == OWNER:
            continue
        with open(path) as f:
            source = f.read()
        for line, what in violations(source, path):
            if (rel, what) in EXCEPTIONS:
                used.add((rel, what))
            else:
                found.append(f"{rel}:{line} {what}")
    assert not found, ("modules that parse the WebDataset shard format themselves: " + ", ".join(found)
                       + f"; use {OWNER} (split_key, TarScan, read_at, iter_samples, ShardWriter)")
    assert used == set(EXCEPTIONS), f"stale EXCEPTIONS entries: {sorted(set(EXCEPTIONS) - used)}"


def test_the_owner_is_where_the_format_is_parsed():
    with open(os.path.join(ROOT, OWNER)) as f:
        found = violations(f.read(), OWNER)
    assert "imports tarfile" in [what for _, what in found]  # the walk sees it, and skips only it
