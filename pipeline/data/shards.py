"""The one owner of the WebDataset shard format: member names, indexing, random reads, writing.

A shard is a tar whose members are ``KEY.EXT`` (img2dataset's layout: ``000000001.jpg``,
``000000001.txt``, ``000000001.json``). Every module that reads or writes one asks this module,
so there is one rule for what a key is and one check of a member's name:

- names: :func:`split_key` (the key is everything before the first dot, the extension keeps its
  spelling), :func:`is_safe_member`, :func:`is_plain_key` and :data:`KINDS` (image, txt, json);
- integrity: :func:`tar_tail_problem` (tarfile stops in silence at a corrupt header),
  :class:`HashingReader` and :func:`file_sha256`;
- indexing: :class:`TarScan`, one pass over a shard's headers (streamed and hashed, or seeked),
  the core of the filter's raw-shard index and the embed step's shard index;
- random access: :func:`read_at` reads a member at a known data offset after checking the name in
  its own 512-byte header exactly; :func:`read_after` reads the member that follows one;
- whole samples: :func:`iter_samples` (one sample at a time, in tar order);
- writing: :class:`ShardWriter`, byte-identical shards for the same samples.

Every file is opened through :mod:`pipeline.storage`, so a shard on S3 reads like a local one::

    from pipeline.data import shards
    for key, members in shards.iter_samples("s3://bucket/filtered/000000.tar"):
        members["png"], members["txt"]
    with storage.open(uri, "rb") as f:
        data = shards.read_at(f, offset, "000000001.png", size)   # None: another member is there
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

from pipeline import storage
from pipeline.data.images import IMAGE_EXTS

if TYPE_CHECKING:
    from pipeline.data.filter_registry import Sample

BLOCK = 512  # a tar header, and the unit member data is padded to
# img2dataset names members KEY.EXT with a numeric key. Anything else (a directory part, "..",
# an absolute path, a backslash, control characters, an empty key) is no sample of a download.
# The 100-character cap (is_safe_member) keeps the whole name in the ustar header, where
# read_at checks it.
_SAFE_MEMBER = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,16})+")
_NAME_FIELD = 100
# The only member extensions a sample has, spelt exactly as img2dataset writes them, and the
# kind of each: a key has at most one member of each kind. "KEY.PNG" is of no kind: readers
# match names exactly, so a case-folded match would index a member no exact reader finds.
KINDS = {**dict.fromkeys(IMAGE_EXTS, "image"), "txt": "txt", "json": "json"}


# --- names --------------------------------------------------------------------------------------

def split_key(name: str) -> tuple[str, str]:
    """``(key, ext)`` of a member name: webdataset's rule, the key is everything before the first
    dot (``dir/000001.png`` -> ``dir/000001``, ``png``); the extension keeps its spelling."""
    key, _, ext = name.partition(".")
    return key, ext


def member_name(key: str, ext: str) -> str:
    """The member name of ``key``'s ``ext`` member (the inverse of :func:`split_key`)."""
    return f"{key}.{ext}"


def is_safe_member(name: str) -> bool:
    """Whether ``name`` is a plain ``KEY.EXT`` that fits a ustar header (no path, no oddities)."""
    return len(name) <= _NAME_FIELD and _SAFE_MEMBER.fullmatch(name) is not None


def is_plain_key(key) -> bool:
    """Whether ``key`` (e.g. from a download parquet) can name a safe member."""
    return isinstance(key, str) and _SAFE_MEMBER.fullmatch(f"{key}.x") is not None


# --- integrity ----------------------------------------------------------------------------------

class HashingReader:
    """A file wrapper that hashes every byte read through it, and counts them."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def file_sha256(uri: str) -> str:
    """Hex sha256 of a file, streamed."""
    with storage.open(uri, "rb") as fh:
        reader = HashingReader(fh)
        reader.drain()
    return reader.sha.hexdigest()


def tar_tail_problem(fh, end: int, size: int) -> str | None:
    """Why a tar whose member headers stop at byte ``end`` of ``size`` lost members, or None.

    Python's tarfile ends an archive, silently, at the first header it cannot parse; only the
    archive's end (zero blocks up to the file's size) may follow the last member.
    """
    if end + BLOCK > size:
        return f"it is cut short ({size} bytes; its last member ends at byte {end})"
    fh.seek(end)
    pos = end
    while chunk := fh.read(1 << 20):
        if chunk.count(0) != len(chunk):
            at = pos + len(chunk) - len(chunk.lstrip(b"\0"))  # the first non-zero byte
            return f"a corrupt tar header at byte {at} of {size} ends the archive early"
        pos += len(chunk)
    return None


# --- indexing -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Member:
    """One tar member's header: its name split by :func:`split_key`, and where its data lies."""

    name: str
    key: str
    ext: str
    offset: int  # of the data, in the tar
    size: int
    isfile: bool


class ShardDamaged(ValueError):
    """A shard that is no readable tar, or loses members behind a corrupt header or a cut.

    The message is a phrase ("it is cut short (...), after 12 members"): callers name the shard
    and say what to redo. ``members``: headers read before the damage (None: no tar at all).
    """

    def __init__(self, problem: str, members: int | None):
        super().__init__(problem if members is None else f"{problem}, after {members} members")
        self.problem, self.members = problem, members


class TarScan:
    """One pass over a shard's member headers, in tar order::

        scan = TarScan(uri)                 # hashed: streamed, every byte read once
        for member in scan:
            if member.ext == "txt":
                text = scan.read()          # the data of the member just yielded
        scan.sha256, scan.size, scan.count

    ``hashed`` streams the whole tar through sha256 (``sha256``, ``size``); without it headers
    are read and data is seeked past (``read`` still works). Once every member is yielded, the
    rest of the file is checked: :class:`ShardDamaged` if the tar ended early at a corrupt header
    or is cut short (or is no tar at all), so no member is lost in silence.
    """

    def __init__(self, uri: str, hashed: bool = True):
        self.uri, self.hashed = uri, hashed
        self.sha256, self.size, self.count = "", 0, 0
        self._tar: tarfile.TarFile | None = None
        self._info: tarfile.TarInfo | None = None

    def __iter__(self) -> Iterator[Member]:
        with storage.open(self.uri, "rb") as fh:
            reader = HashingReader(fh) if self.hashed else None
            try:
                with tarfile.open(fileobj=reader or fh, mode="r|" if self.hashed else "r:") as tar:
                    self._tar = tar
                    for info in tar:
                        self.count += 1
                        self._info = info
                        key, ext = split_key(info.name)
                        yield Member(info.name, key, ext, info.offset_data, info.size, info.isfile())
                    end = tar.offset
            except tarfile.TarError as err:
                raise ShardDamaged(f"it is not a readable tar ({err})", None) from err
            finally:
                self._tar = self._info = None
            if reader is not None:
                reader.drain()
                self.sha256, self.size = reader.sha.hexdigest(), reader.size
            else:
                self.size = storage.size(self.uri)
            problem = tar_tail_problem(fh, end, self.size)
        if problem:
            raise ShardDamaged(problem, self.count)

    def read(self) -> bytes:
        """The data of the member the iteration is at (a stream cannot go back to earlier ones)."""
        try:
            return self._tar.extractfile(self._info).read()
        except tarfile.TarError as err:
            raise ShardDamaged(f"member {self._info.name} cannot be read ({err})", self.count) from err


# --- random access ------------------------------------------------------------------------------

def _header(block: bytes) -> tarfile.TarInfo | None:
    """The member header in a 512-byte block, or None (end of archive, bad checksum, no header)."""
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.TarError:
        return None


def read_at(f: IO[bytes], offset: int, name: str, size: int) -> bytes | None:
    """The ``size`` bytes of data at ``offset`` in the open tar ``f``, if the member whose header
    precedes them is named exactly ``name``; None otherwise (a shard rewritten since the offset
    was recorded must not hand out another member's bytes). The data is returned as read: at the
    end of a cut file it is shorter than ``size``, which the caller checks (with its sha256).
    Two reads, not one block sliced: slicing would copy every image once more."""
    f.seek(offset - BLOCK)
    info = _header(f.read(BLOCK))
    if info is None or info.name != name:
        return None
    return f.read(size)


def read_after(f: IO[bytes], offset: int, size: int, name: str) -> bytes | None:
    """The data of the member named exactly ``name`` whose header directly follows the member
    with data at ``offset`` (``size`` bytes); None when another member, or none, is there. The
    filter step writes ``KEY.txt`` right after ``KEY.<image>``: a caption is one header away."""
    f.seek(offset + -(-size // BLOCK) * BLOCK)  # data is padded to whole blocks
    info = _header(f.read(BLOCK))
    if info is None or info.name != name:
        return None
    return f.read(info.size)


def iter_samples(uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: data})`` of each sample of a shard, in tar order, one sample in memory at a
    time: consecutive members with one key form a sample (webdataset's grouping); of two members
    with one key and extension the first is kept. Raises :class:`ShardDamaged` at the end of a
    damaged tar (after yielding what precedes the damage)."""
    scan = TarScan(uri, hashed=False)
    key, members = None, {}
    for m in scan:
        if not m.isfile:
            continue
        if m.key != key and members:
            yield key, members
            members = {}
        key = m.key
        if m.ext not in members:
            members[m.ext] = scan.read()
    if members:
        yield key, members


# --- writing ------------------------------------------------------------------------------------

def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed mtime/owner so the same input always gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Streams samples into named shards under ``output``, each written atomically (temp name,
    then rename). A sample (``key``, ``ext``, ``image_bytes``, ``caption``, ``meta``: the filter
    step's :class:`~pipeline.data.filter_registry.Sample`) becomes ``KEY.<ext>``, then ``KEY.txt``
    (the caption, stripped: readers find it right after the image) and ``KEY.json`` (``meta``,
    keys sorted). Shards must come one after the other: a new name finishes the open shard."""

    def __init__(self, output: str):
        self.output = output
        self._name: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._tar: tarfile.TarFile | None = None

    def write(self, sample: Sample, name: str) -> None:
        if name != self._name:
            self.close()
            self._name, self._stack = name, contextlib.ExitStack()
            f = self._stack.enter_context(storage.atomic_write(storage.join(self.output, name)))
            tar = tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by the stack
            self._tar = self._stack.enter_context(tar)
        _add_member(self._tar, member_name(sample.key, sample.ext), sample.image_bytes)
        _add_member(self._tar, member_name(sample.key, "txt"), sample.caption.strip().encode("utf-8"))
        _add_member(self._tar, member_name(sample.key, "json"),
                    json.dumps(sample.meta, sort_keys=True).encode("utf-8"))

    def close(self) -> None:
        """Finish the open shard: close the tar, then rename it into place."""
        if self._stack is not None:
            self._stack.close()
            print(f"filter: wrote {storage.join(self.output, self._name)}", flush=True)
        self._stack, self._tar, self._name = None, None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._stack is not None:
            # Hand the error to atomic_write, which deletes the half-written temporary shard.
            self._stack.__exit__(*exc)
            self._stack, self._tar, self._name = None, None, None
