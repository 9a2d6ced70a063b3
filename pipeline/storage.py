"""The one storage API for local disk, S3 and GCS: every read or listing of a location goes here.

Every step reads, lists and writes through these functions so that a local path and an
``s3://`` / ``gs://`` URI take the same code path (img2dataset's ``writer.py`` does the same).
Nothing outside this module (and the network guard below it) opens a URI with fsspec or urllib:
tests/unit/test_storage_owner.py walks the source for it.

Remote reads are guarded like image fetches (:mod:`pipeline.netguard`): an ``http(s)://``
file is read by :func:`open` through the SSRF guard (address checks after every redirect, pinned
connection, wall-clock budget, size limit), never by fsspec; it cannot be listed, written or
chained. Other network protocols (ftp, sftp, smb, webdav, ...) are refused unless the deployment
allows private networks (``IMAGEN_ALLOW_PRIVATE_NETWORKS=1``); so is an ``hdfs://`` URI that names
its namenode (``hdfs://HOST:PORT/...``, any host), while ``hdfs:///path`` reaches the cluster the
deployment configured (``fs.defaultFS``). Local paths and object stores (s3, gs, az: endpoints the
deployment configures) go through fsspec as before. A compressed file (``compression=``) is
inflated under the same size limit as a remote body, so a small gzip bomb cannot fill memory.

    from pipeline import storage
    with storage.atomic_write("s3://bucket/out/000000.tar") as f:
        f.write(data)
    storage.list_shards("out", r"\\d{6}\\.tar")
    storage.find("s3://bucket/lists", lambda name: name.endswith(".parquet"))   # recursive

Not a script; imported by pipeline.data.download, pipeline.data.filters and friends. It imports
only :mod:`pipeline.netguard` of the pipeline.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.netguard import (
    FetchPolicy,
    FetchRejected,
    RemoteReadRefused,
    Resolver,
    build_opener,
    deployment_policy,
    literal_reason,
)

# fsspec protocols that stay on this machine or reach storage the deployment configured (object
# stores, with their endpoints and credentials), and wrappers around another URL (whose inner URL
# is checked in turn). Anything else is a network protocol an attacker could point at an internal
# host (ftp, sftp, smb, webdav, webhdfs, git, reference, ...).
SAFE_PROTOCOLS = frozenset({
    "file", "local", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss",
    "simplecache", "filecache", "blockcache", "cached", "zip", "tar", "libarchive",
})
# HDFS takes its namenode (and user) from the URL: hdfs://10.0.0.5:8020/x connects there. Only the
# deployment's own cluster is safe: no host, or "default" (pyarrow then reads fs.defaultFS).
HDFS_PROTOCOLS = frozenset({"hdfs", "arrow_hdfs"})
_CONFIGURED_HDFS = ("", "default")
REMOTE_TIMEOUT = 600.0  # seconds for a whole http(s) file read (a URL list can be large)
REMOTE_MAX_BYTES = 16 << 30
_SPOOL_BYTES = 64 << 20  # http(s) files larger than this are held in a temporary file on disk


def protocols(uri: str) -> list[str]:
    """Every protocol of an fsspec URI, chained ones included (``zip://a::s3://b`` -> zip, s3)."""
    found = []
    for part in str(uri).split("::"):
        scheme, sep, _ = part.partition("://")
        found.append(scheme.lower() if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+._-]*", scheme) else "file")
    return found


def is_http(uri: str) -> bool:
    """An http(s) URL (``[::1]`` literals included): read with :func:`open` through the fetch guard."""
    return re.match(r"(?i)https?://", str(uri)) is not None


def check_protocols(uri: str, policy: FetchPolicy | None = None) -> None:
    """Refuse a URI that fsspec would read over a network the guard does not cover."""
    for part, protocol in zip(str(uri).split("::"), protocols(uri), strict=True):
        if protocol in ("http", "https"):
            raise RemoteReadRefused("unsupported_scheme", uri, "an http(s) location is read one file at a "
                                    "time through the fetch guard; it cannot be listed, written or chained")
        host = part.partition("://")[2].split("/", 1)[0]
        if protocol in HDFS_PROTOCOLS and host not in _CONFIGURED_HDFS:
            why = (f"{protocol}://{host} names its own namenode: write {protocol}:///PATH for the cluster the "
                   "deployment configured (fs.defaultFS)")
        elif protocol not in SAFE_PROTOCOLS | HDFS_PROTOCOLS:
            why = f"the {protocol}:// protocol is not guarded"
        else:
            continue
        if not (policy or deployment_policy()).allow_private_networks:
            raise RemoteReadRefused("unsupported_scheme", uri, why)


def url_to_fs(uri: str, policy: FetchPolicy | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Split a URI into its filesystem and the path that filesystem understands.

    Refuses http(s) and unguarded network protocols (:func:`check_protocols`) before fsspec
    makes any request; ``policy`` defaults to the deployment's (the environment).
    """
    check_protocols(uri, policy)
    return fsspec.core.url_to_fs(uri)


def open_url(url: str, policy: FetchPolicy | None = None, *, timeout: float = REMOTE_TIMEOUT,
             max_bytes: int = REMOTE_MAX_BYTES, resolver: Resolver = socket.getaddrinfo) -> IO[bytes]:
    """GET an http(s) file through the fetch guard; returns a seekable binary file of its body.

    The same checks as image fetches: scheme, every address (after every redirect), the pinned
    connection, no proxies, a wall-clock budget for the whole exchange and a size limit. The
    body is read in full (to memory, or to disk past 64 MiB), so Parquet readers can seek.
    Raises :class:`RemoteReadRefused` (a ValueError) when refused, FileNotFoundError on 404/410.
    """
    policy = policy or deployment_policy()
    reason = literal_reason(url, policy)
    if reason is not None:
        raise RemoteReadRefused(reason, url, "refused before any connection")
    request = urllib.request.Request(url, headers={"User-Agent": "imagen-pipeline"})
    request.deadline = time.monotonic() + timeout
    out = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 - returned open
    try:
        with build_opener(policy, resolver).open(request, timeout=timeout) as r:
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise RemoteReadRefused("response_too_large", url, f"Content-Length {length} > {max_bytes} bytes")
            while chunk := r.read(1 << 20):
                if out.tell() + len(chunk) > max_bytes:
                    raise RemoteReadRefused("response_too_large", url, f"body over {max_bytes} bytes")
                out.write(chunk)
    except BaseException as err:
        out.close()
        if isinstance(err, RemoteReadRefused):
            raise
        if isinstance(err, FetchRejected):
            raise RemoteReadRefused(err.reason, url, str(err).split(": ", 1)[1]) from None
        if isinstance(err, urllib.error.HTTPError):
            error = FileNotFoundError if err.code in (404, 410) else OSError
            raise error(f"{url}: HTTP {err.code} {err.reason}") from None
        if isinstance(err, OSError):  # timeouts, refused connections, DNS: name the URL
            raise OSError(f"{url}: {getattr(err, 'reason', None) or err}") from None
        raise
    out.seek(0)
    return out


def _to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Local paths stay plain ("/data/x", not "file:///data/x") so manifests read naturally.
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def join(base: str, *parts: str) -> str:
    """Join URI parts with "/", keeping the protocol of ``base``."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def open(uri: str, mode: str = "rb", *, policy: FetchPolicy | None = None, max_bytes: int | None = None,
         **kwargs: Any) -> IO:
    """Open a file on any fsspec filesystem; use as a context manager.

    Shadows the builtin on purpose: callers write ``storage.open(uri)``. An http(s) file is read
    (``"rb"``/``"r"``, ``compression=``, ``encoding=``) through the fetch guard under ``policy``
    (default: the deployment's, :func:`pipeline.netguard.deployment_policy`). A compressed
    file read with ``compression=`` (``"infer"``: from the name) is inflated whole into a seekable
    file, refused past ``max_bytes`` of output (default :data:`REMOTE_MAX_BYTES`, the limit on an
    http(s) body): its compressed size says nothing of what it inflates to.
    """
    compression = kwargs.pop("compression", None)
    if compression == "infer":
        compression = fsspec.utils.infer_compression(uri)
    reading = mode in ("rb", "r")
    if not is_http(uri) and not (compression and reading):
        fs, path = url_to_fs(uri, policy)
        return fs.open(path, mode, compression=compression, **kwargs)
    if not reading:
        raise ValueError(f"{uri}: http(s) locations are read-only (mode {mode!r})")
    limit = REMOTE_MAX_BYTES if max_bytes is None else max_bytes
    if is_http(uri):
        f = open_url(uri, policy, max_bytes=limit)
    else:
        fs, path = url_to_fs(uri, policy)
        f = fs.open(path, "rb")
    if compression:
        f = _inflate(f, compression, uri, limit)
    return io.TextIOWrapper(f, encoding=kwargs.get("encoding") or "utf-8") if mode == "r" else f


def _inflate(f: IO[bytes], compression: str, uri: str, max_bytes: int) -> IO[bytes]:
    """The decompressed content of ``f`` (closed here) as a seekable file: in memory, or on disk
    past 64 MiB; RemoteReadRefused once it passes ``max_bytes``."""
    if compression not in fsspec.compression.compr:
        f.close()
        raise ValueError(f"{uri}: unknown compression {compression!r}; choose one of "
                         f"{', '.join(sorted(c for c in fsspec.compression.compr if c))}")
    out = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 - returned open
    try:
        with f, fsspec.compression.compr[compression](f, mode="rb") as z:
            while chunk := z.read(1 << 20):
                if out.tell() + len(chunk) > max_bytes:
                    raise RemoteReadRefused("response_too_large", uri, f"inflates to more than {max_bytes} "
                                            f"bytes ({compression}): split the list into smaller files")
                out.write(chunk)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def is_local(uri: str) -> bool:
    """A path on this machine (plain or ``file://``), not an object-store or other remote URI."""
    return not is_http(uri) and protocols(uri) == ["file"]


def normalize(uri: str) -> str:
    """An absolute local path (``file://`` stripped), or the remote URI without a trailing "/":
    the spelling recorded in checkpoints and markers (never ``abspath`` on a URI)."""
    uri = str(uri)
    if is_local(uri):
        return os.path.abspath(uri.removeprefix("file://"))
    return uri.rstrip("/")


def parent(uri: str) -> str:
    """The folder holding ``uri`` (``s3://b/run/filtered`` -> ``s3://b/run``)."""
    if is_local(uri):
        return os.path.dirname(os.path.abspath(str(uri).removeprefix("file://").rstrip(os.sep)))
    head, _, _ = str(uri).rstrip("/").rpartition("/")
    return head


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


def isdir(uri: str, policy: FetchPolicy | None = None) -> bool:
    """Whether ``uri`` is a folder; refuses what :func:`url_to_fs` refuses (http(s) included)."""
    fs, path = url_to_fs(uri, policy)
    return fs.isdir(path)


def rmtree(uri: str) -> None:
    """Delete a folder and everything under it, if it is there."""
    fs, path = url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def read_bytes(uri: str, attempts: int = 3) -> bytes:
    """The whole file. An object replaced while it is read (s3fs raises ``FileExpired``, an
    OSError with errno EBUSY, when the ETag changes between its ranged reads: another process
    rewrote a small JSON file such as a lock lease) is read again, whole, up to ``attempts``
    times; the reader never sees half of each version."""
    for attempt in range(attempts):
        try:
            with open(uri, "rb") as f:
                return f.read()
        except OSError as err:
            if err.errno != errno.EBUSY or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def write_bytes(uri: str, data: bytes) -> None:
    """Write one whole file atomically (:func:`atomic_write`)."""
    with atomic_write(uri) as f:
        f.write(data)


def copy(src: str, dst: str) -> None:
    """Copy one file, within or across filesystems (remote ones through memory: weights-sized
    files); a local copy keeps its modification time."""
    if is_local(src) and is_local(dst):
        shutil.copy2(normalize(src), normalize(dst))
        return
    write_bytes(dst, read_bytes(src))


def move_dir(src: str, dst: str) -> None:
    """Rename a folder onto ``dst`` (replacing it): atomic on local disk; on object stores a
    copy of each object, which is why checkpoints also write their own completion markers."""
    rmtree(dst)
    fs, path = url_to_fs(src)
    if isinstance(fs, LocalFileSystem):
        os.replace(path, url_to_fs(dst)[1])
        return
    # Object by object (fs.mv would also try to copy the "directory" placeholder keys, which
    # do not exist on S3), then the source's objects are deleted.
    target = url_to_fs(dst)[1].rstrip("/")
    files = fs.find(path)
    for f in files:
        fs.copy(f, target + f[len(path.rstrip("/")):])
    fs.rm(files)
    fs.invalidate_cache()


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[str]:
    """A local folder with the files directly under ``uri``: the folder itself when local, else
    a temporary download (for libraries that take only local paths: mlflow.log_model, ...)."""
    if is_local(uri):
        yield normalize(uri)
        return
    with tempfile.TemporaryDirectory(prefix="imagen-fetch-") as tmp:
        for src in list_files(uri):
            with open(src, "rb") as f_in, builtins.open(os.path.join(tmp, basename(src)), "wb") as f_out:
                f_out.write(f_in.read())
        yield tmp


@contextlib.contextmanager
def local_file(uri: str) -> Iterator[str]:
    """A local path with the contents of ``uri``: the file itself when local, else a temporary copy."""
    if is_local(uri):
        yield normalize(uri)
        return
    with tempfile.TemporaryDirectory(prefix="imagen-fetch-") as tmp:
        path = os.path.join(tmp, basename(uri))
        with builtins.open(path, "wb") as f:
            f.write(read_bytes(uri))
        yield path


def info(uri: str) -> dict[str, Any]:
    """The filesystem's facts about one file (size, and ETag or mtime where it has them)."""
    fs, path = url_to_fs(uri)
    return dict(fs.info(path))


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


def write_json_if_changed(uri: str, obj: Any) -> bool:
    """:func:`write_json` unless ``uri`` already holds ``obj``, so that a rerun writes nothing
    (on S3 each write is three requests); whether it wrote."""
    if exists(uri):
        try:
            if read_json(uri) == obj:
                return False
        except ValueError:  # damaged: rewrite it
            pass
    write_json(uri, obj)
    return True


def read_json(uri: str) -> Any:
    """A JSON file, read whole (:func:`read_bytes`: again if it was replaced while read)."""
    return json.loads(read_bytes(uri))


def list_files(uri: str, pattern: str = r".*") -> list[str]:
    """Sorted URIs of the files directly under ``uri`` whose name fully matches ``pattern``.

    Always a fresh listing: fsspec's object stores cache folder listings (s3fs's dircache), and
    a listing cached before another process wrote (img2dataset's ``_stats.json``, another run's
    lease) would hide those files from a completeness check."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    regex = re.compile(pattern)
    names = [p for p in fs.ls(path, detail=False) if regex.fullmatch(p.rstrip("/").rsplit("/", 1)[-1])]
    return sorted(_to_uri(fs, p) for p in names)


def list_dirs(uri: str) -> list[str]:
    """Sorted URIs of the folders directly under ``uri`` ([] when ``uri`` is no folder)."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        return []
    return sorted(_to_uri(fs, p["name"]) for p in fs.ls(path, detail=True) if p["type"] == "directory")


def find(uri: str, keep: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Sorted URIs of every file under the folder ``uri``, at any depth, whose name (the last
    part of its path) ``keep`` accepts. A fresh listing, like :func:`list_files`."""
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    return sorted(_to_uri(fs, p) for p in fs.find(path) if keep(p.rstrip("/").rsplit("/", 1)[-1]))


def list_shards(uri: str, pattern: str = r"\d+\.tar") -> list[str]:
    """Sorted URIs of the shards under ``uri`` (``00000.tar``, ``000001.tar``, ...)."""
    return list_files(uri, pattern)


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]
