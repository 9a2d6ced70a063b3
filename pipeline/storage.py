"""Small fsspec helpers shared by the data steps: one storage API for local disk, S3 and GCS.

Every data step reads and writes through these functions so that a local path and an
``s3://`` / ``gs://`` URI take the same code path (img2dataset's ``writer.py`` does the same).

    from pipeline import storage
    with storage.atomic_write("s3://bucket/out/000000.tar") as f:
        f.write(data)
    storage.list_shards("out", r"\\d{6}\\.tar")

Not a script; imported by pipeline.download, pipeline.filters and friends.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Split a URI into its filesystem and the path that filesystem understands."""
    return fsspec.core.url_to_fs(uri)


def _to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Local paths stay plain ("/data/x", not "file:///data/x") so manifests read naturally.
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    """Join URI parts with "/", keeping the protocol of ``base``."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def open(uri: str, mode: str = "rb", **kwargs: Any) -> IO:
    """Open a file on any fsspec filesystem; use as a context manager.

    Shadows the builtin on purpose: callers write ``storage.open(uri)``.
    """
    fs, path = url_to_fs(uri)
    return fs.open(path, mode, **kwargs)


def exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)


def remove(uri: str) -> None:
    """Delete one file if it is there (object stores have no directories to clean up)."""
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path)


def size(uri: str) -> int:
    fs, path = url_to_fs(uri)
    return int(fs.size(path))


@contextlib.contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary sibling, then rename it onto ``uri``.

    Readers never see a half-written file: either the old one, none, or the new one. On
    local disk and HDFS the rename is atomic; on object stores it is a copy whose
    temporary name no reader globs for. A failure removes the temporary file.
    """
    fs, path = url_to_fs(uri)
    parent, _, name = path.rpartition("/")
    if parent:
        fs.makedirs(parent, exist_ok=True)
    # Hidden, unique temporary name: shard globs such as "*.tar" never match it.
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}" if parent else f".{name}.tmp"
    try:
        with fs.open(tmp, mode) as f:
            yield f
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_json(uri: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON (stable bytes for stable input)."""
    with atomic_write(uri, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(uri: str) -> Any:
    with open(uri, "r") as f:
        return json.load(f)


def list_files(uri: str, pattern: str = r".*") -> list[str]:
    """Sorted URIs of the files directly under ``uri`` whose name fully matches ``pattern``."""
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        return []
    regex = re.compile(pattern)
    names = [p for p in fs.ls(path, detail=False) if regex.fullmatch(p.rstrip("/").rsplit("/", 1)[-1])]
    return sorted(_to_uri(fs, p) for p in names)


def list_shards(uri: str, pattern: str = r"\d+\.tar") -> list[str]:
    """Sorted URIs of the shards under ``uri`` (``00000.tar``, ``000001.tar``, ...)."""
    return list_files(uri, pattern)


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
