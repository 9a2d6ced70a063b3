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
import functools
import hashlib
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


# --- plain headers -------------------------------------------------------------------------------
# Python's tarfile reads a header in ~100 us of Python; a 10,000-sample shard has 60,000 of them
# (img2dataset's writer puts a pax header before every member, for its float mtime). The headers
# img2dataset's writer and ShardWriter write are all of one shape: a ustar header with tarfile's
# own octal fields, no link name, no name prefix, type "0" (a file) or "x" (a pax header whose
# records are only times). :func:`_plain_header` reads such a header in a few microseconds and
# answers None for anything else, and every reader here then hands over to tarfile, from that
# header on: what is read, accepted or refused stays tarfile's decision, for any input.
_PLAIN = re.compile(rb"[0-7]{7}\0[0-7]{7}\0[0-7]{7}\0[0-7]{11}\0[0-7]{11}\0[0-7]{6}\0 [0x]\0{100}ustar\x0000"
                    rb"[\x00-\xff]{64}(?:[0-7]{7}\0|\0{8}){2}\0{155}")
_PAX_TIME = re.compile(rb"(\d+) (?:mtime|atime|ctime)=[0-9.]+\n")
_ZEROS = bytes(BLOCK)


def _plain_header(block: bytes) -> tuple[str, int, bytes] | None:
    """``(name, size, type)`` of a header block of the plain shape (see above) that tarfile reads
    as exactly that (its checksum right), else None."""
    if len(block) != BLOCK or _PLAIN.fullmatch(block, 100, 500) is None:
        return None
    # tarfile's checksum: every byte, the checksum field counted as 8 spaces (256)
    if int(block[148:154], 8) != sum(block[:148]) + sum(block[156:]) + 256:
        return None  # tarfile also accepts a signed sum: it decides
    return block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), int(block[124:135], 8), block[156:157]


def _plain_pax(data: bytes, size: int) -> bool:
    """Whether the padded pax data ``data`` (``size`` bytes of records) holds only well-formed
    time records and zero padding: such a pax header changes nothing a reader here uses."""
    if size <= 0 or len(data) < size or data.count(0, size) != len(data) - size:
        return False
    pos = 0
    while pos < size:
        m = _PAX_TIME.match(data, pos, size)
        if m is None or int(m.group(1)) != m.end() - pos:
            return False
        pos = m.end()
    return True


def _blocks(size: int) -> int:
    return -(-size // BLOCK) * BLOCK  # data is padded to whole blocks


class _PlainScan:
    """The members of a tar read through :func:`_plain_header`, from the file's start, in order.

    Stops at the archive's end (``end``: the offset of its first zero block) or, before yielding
    it, at the first member whose headers, or whose data's presence, is anything else (``bail``:
    the offset of its first header; ``pending``: the bytes from there on already read). With
    ``size`` (a seekable file's size) data is seeked past; without, it is read (the caller
    hashes the stream) and ``data`` holds the last member's, padded.
    """

    def __init__(self, fh, size: int | None):
        self.fh, self.size = fh, size
        self.end: int | None = None
        self.bail: int | None = None
        self.pending, self.data = b"", b""

    def __iter__(self) -> Iterator[Member]:
        pos, read = 0, self.fh.read
        while True:
            taken = [read(BLOCK)]
            if taken[0] == _ZEROS:
                self.end = pos
                return
            head = _plain_header(taken[0])
            data_at = pos + BLOCK
            if head is not None and head[2] == b"x":
                taken += [read(_blocks(head[1])), read(BLOCK)]
                whole = len(taken[1]) == _blocks(head[1]) and _plain_pax(taken[1], head[1])
                head = _plain_header(taken[2]) if whole else None
                data_at += len(taken[1]) + BLOCK
            if head is not None and head[2] == b"0":
                name, size = head[0], head[1]
                after = data_at + _blocks(size)  # tarfile reads the byte before it, to know the data is there
                if self.size is None:
                    taken.append(read(after - data_at))
                    present = len(taken[-1]) == after - data_at
                else:
                    present = after <= self.size
                    if present and after > data_at:
                        self.fh.seek(after)
                if present:
                    if self.size is None:
                        self.data = taken[-1]
                    key, ext = split_key(name)
                    yield Member(name, key, ext, data_at, size, True)
                    pos = after
                    continue
            self.bail, self.pending = pos, b"".join(taken)
            return


class _Replay:
    """A reader giving ``head`` first, then what ``fh`` gives."""

    def __init__(self, head: bytes, fh):
        self.head, self.fh = head, fh

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.fh.read(n)
        if n < 0:
            out, self.head = self.head + self.fh.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + self.fh.read(n - len(out))


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

    Plain headers (see :func:`_plain_header`) are read here; from the first other one on, Python's
    tarfile reads the rest, as it would have read the whole (it alone decides what is damaged).
    """

    def __init__(self, uri: str, hashed: bool = True):
        self.uri, self.hashed = uri, hashed
        self.sha256, self.size, self.count = "", 0, 0
        self._tar: tarfile.TarFile | None = None
        self._info: tarfile.TarInfo | None = None
        self._plain: _PlainScan | None = None
        self._member: Member | None = None

    def __iter__(self) -> Iterator[Member]:
        with storage.open(self.uri, "rb") as fh:
            reader = HashingReader(fh) if self.hashed else None
            plain = _PlainScan(reader or fh, None if self.hashed else storage.size(self.uri))
            self._plain = plain
            try:
                for member in plain:
                    self.count += 1
                    self._member = member
                    yield member
            finally:
                self._plain = self._member = None
            end = plain.end
            if end is None:
                end = yield from self._tarfile(fh, reader, plain)
            if reader is not None:
                reader.drain()
                self.sha256, self.size = reader.sha.hexdigest(), reader.size
            else:
                self.size = storage.size(self.uri)
            problem = tar_tail_problem(fh, end, self.size)
        if problem:
            raise ShardDamaged(problem, self.count)

    def _tarfile(self, fh, reader: HashingReader | None, plain: _PlainScan):
        """tarfile reads on from ``plain.bail``, where it would be had it read the plain headers
        before (a seekable file positioned there); yields its members, returns the archive's end."""
        with contextlib.ExitStack() as stack:
            if plain.bail == 0 and reader is not None:  # nothing plain: tarfile streams it all, as ever
                source, mode = _Replay(plain.pending, reader), "r|"
            elif plain.bail == 0:
                source, mode = fh, "r:"
                fh.seek(0)
            else:
                # A second handle when hashing: the stream goes on being hashed where it stopped.
                source = fh if reader is None else stack.enter_context(storage.open(self.uri, "rb"))
                source.seek(plain.bail)
                mode = "r:"
            try:
                with tarfile.open(fileobj=source, mode=mode) as tar:
                    self._tar = tar
                    for info in tar:
                        self.count += 1
                        self._info = info
                        key, ext = split_key(info.name)
                        yield Member(info.name, key, ext, info.offset_data, info.size, info.isfile())
                    return tar.offset
            except tarfile.TarError as err:
                raise ShardDamaged(f"it is not a readable tar ({err})", None) from err
            finally:
                self._tar = self._info = None

    def read(self) -> bytes:
        """The data of the member the iteration is at (a stream cannot go back to earlier ones)."""
        if self._member is not None:
            m = self._member
            if self._plain.size is None:
                return self._plain.data[:m.size]
            self._plain.fh.seek(m.offset)
            data = self._plain.fh.read(m.size)
            self._plain.fh.seek(m.offset + _blocks(m.size))
            return data
        try:
            return self._tar.extractfile(self._info).read()
        except tarfile.TarError as err:
            raise ShardDamaged(f"member {self._info.name} cannot be read ({err})", self.count) from err


# --- random access ------------------------------------------------------------------------------

def _header(block: bytes) -> tuple[str, int] | None:
    """``(name, size)`` of the member header in a 512-byte block, or None (end of archive, bad
    checksum, no header): :func:`_plain_header` for the plain shape, tarfile for any other."""
    plain = _plain_header(block)
    if plain is not None:
        return plain[0], plain[1]
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.TarError:
        return None
    return info.name, info.size


def read_at(f: IO[bytes], offset: int, name: str, size: int) -> bytes | None:
    """The ``size`` bytes of data at ``offset`` in the open tar ``f``, if the member whose header
    precedes them is named exactly ``name``; None otherwise (a shard rewritten since the offset
    was recorded must not hand out another member's bytes). The data is returned as read: at the
    end of a cut file it is shorter than ``size``, which the caller checks (with its sha256).
    Two reads, not one block sliced: slicing would copy every image once more."""
    f.seek(offset - BLOCK)
    info = _header(f.read(BLOCK))
    if info is None or info[0] != name:
        return None
    return f.read(size)


def read_after(f: IO[bytes], offset: int, size: int, name: str) -> bytes | None:
    """The data of the member named exactly ``name`` whose header directly follows the member
    with data at ``offset`` (``size`` bytes); None when another member, or none, is there. The
    filter step writes ``KEY.txt`` right after ``KEY.<image>``: a caption is one header away."""
    f.seek(offset + _blocks(size))
    info = _header(f.read(BLOCK))
    if info is None or info[0] != name:
        return None
    return f.read(info[1])


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

def _tarfile_header(name: str, size: int) -> bytes:
    """The header(s) Python's tarfile (PAX format) writes for a member: fixed mtime and owner, so
    the same input always gives byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _file_header(name: str, size: int) -> bytes:
    """:func:`_tarfile_header` for a plain ASCII name of up to 100 characters and a size under
    8 GiB (one ustar block, no pax header), built without tarfile's ~40 us of Python."""
    head = b"".join((name.encode("ascii").ljust(100, b"\0"), b"0000444\0", b"0000000\0" * 2, b"%011o\0" % size,
                     b"00000000000\0", b"        ", b"0", bytes(100), b"ustar\x0000", bytes(64 + 16 + 155 + 12)))
    return head[:148] + b"%06o\0" % sum(head) + head[155:]  # the checksum, counted over 8 spaces


@functools.cache
def _file_header_agrees() -> bool:
    """Whether :func:`_file_header` writes what this Python's tarfile writes (checked once: a
    Python that writes other bytes, e.g. device numbers as digits, keeps tarfile's)."""
    cases = (("000000001.png", 0), ("k.json", 511), ("x" * 95 + ".txt", 8 ** 11 - 1), ("y" * 96 + ".txt", 513))
    return all(_file_header(n, size) == _tarfile_header(n, size) for n, size in cases)


class _TarOut:
    """A tar written the way tarfile writes :class:`ShardWriter`'s members, byte for byte."""

    def __init__(self, f):
        self.f, self.offset = f, 0

    def finish(self) -> None:
        # tarfile's close(): two zero blocks, then zeros up to a whole record (tar -b20)
        self.offset += 2 * BLOCK
        self.f.write(bytes(2 * BLOCK + -self.offset % tarfile.RECORDSIZE))


def _add_member(tar: _TarOut, name: str, data: bytes) -> None:
    plain = name.isascii() and len(name) <= 100 and len(data) < 8 ** 11 and _file_header_agrees()
    header = _file_header(name, len(data)) if plain else _tarfile_header(name, len(data))
    pad = -len(data) % BLOCK
    tar.f.write(header)
    tar.f.write(data)
    if pad:
        tar.f.write(bytes(pad))
    tar.offset += len(header) + len(data) + pad


@contextlib.contextmanager
def _tar_out(f) -> Iterator[_TarOut]:
    out = _TarOut(f)
    yield out
    out.finish()  # not after an error: the temporary shard is deleted


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
        self._tar: _TarOut | None = None

    def write(self, sample: Sample, name: str) -> None:
        if name != self._name:
            self.close()
            self._name, self._stack = name, contextlib.ExitStack()
            f = self._stack.enter_context(storage.atomic_write(storage.join(self.output, name)))
            self._tar = self._stack.enter_context(_tar_out(f))
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
