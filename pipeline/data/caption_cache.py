"""Content-addressed cache of caption embeddings: each distinct caption is encoded once.

Web alt-texts repeat a lot ("image", "photo", product names, stock-photo boilerplate), and the
embed step (:mod:`pipeline.data.embed`) would otherwise run T5 over every copy. An entry is the
float16 real-token vectors of one caption under one encoder identity::

    OUTPUT/caption-cache/<encoder-slug>-<identity hash>/ab/cd/<sha256>.emb

``<sha256>`` hashes the identity key and the caption text (:func:`caption_key`), so the file name
alone says which caption under which encoder; the identity (encoder id = resolved name plus hub
commit or folder content hash, max_length, compute dtype, storage dtype) is owned by
:func:`pipeline.data.embed.encoder_identity` and only hashed here.

Why one object per caption and not Parquet batches (think 1e9 captions on S3): an entry of
T5-XXL is ~20 tokens x 4096 x 2 bytes, about 160 KB, a size at which a GET or PUT's fixed cost
is small, not the "many tiny objects" problem. One object per key needs no index: a lookup is
one GET by name, a miss is one 404, and nothing has to be merged, compacted or locked. Batches
would need a key -> (file, row) index of 1e9 entries (~32 GB of hashes) that every worker must
consult and that concurrent writers must update: a database, not a folder. Entries are
immutable and content-addressed, so concurrent writers (several embed processes, mapped Airflow
tasks) never coordinate: two of them writing one key write equivalent bytes and the last write
wins. On local disk and HDFS an entry is written to a temporary name and renamed
(:func:`pipeline.storage.write_bytes`); on an object store one PUT is already atomic (an entry,
at most 128 x 4096 x 2 bytes = 1 MiB, is one request), so it is written in place: a temporary
object and a server-side copy would triple the requests.
The two hex levels (``ab/cd``) keep local folders small and spread S3's per-prefix request
limits. Requests are latency bound, so lookups and writes run on a thread pool. The cost is one
PUT per distinct caption (1e9 PUTs, ~$5k on S3, once) against recomputing T5-XXL for it.

Every entry carries a header (magic, the key it belongs to, token count, width) and a sha256 of
header and vectors: a truncated, corrupt or misplaced file is detected on read, counted,
recomputed and rewritten, never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline import storage

log = logging.getLogger(__name__)

CACHE_DIR = "caption-cache"  # under the embed step's output root
# Bump when an entry's bytes change meaning: a new version is a new identity, so a new folder.
ENTRY_VERSION = "caption-emb-v1"
_MAGIC = b"IMGCAPE1"
_HEADER = struct.Struct("<8s32sII")  # magic, caption key, num_tokens, dim
_DIGEST = 32  # trailing sha256 of header + vectors
_IDENTITY_FIELDS = ("encoder_id", "max_length", "dtype", "storage_dtype")
IO_THREADS = 32  # concurrent GETs/PUTs: object-store requests are latency bound
# Stores where one upload becomes visible whole or not at all (below their multipart threshold).
_ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


class CorruptEntry(ValueError):
    """A cache file that is not a whole, valid entry for the key it was looked up under."""


def identity_key(identity: dict) -> str:
    """Hex sha256 of the identity fields that decide an embedding's values, plus the entry format.

    The encoder's absolute folder is left out on purpose: ``encoder_id`` already names the weights
    by content (a copied model folder hits the same entries) or by hub commit."""
    missing = [f for f in _IDENTITY_FIELDS if f not in identity]
    if missing:
        raise ValueError(f"encoder identity lacks {missing}")
    fields = {f: str(identity[f]) for f in _IDENTITY_FIELDS} | {"entry_version": ENTRY_VERSION}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def caption_key(ident_key: str, caption: str) -> bytes:
    """The 32-byte key of ``caption`` under the identity ``ident_key`` (:func:`identity_key`)."""
    return hashlib.sha256(ident_key.encode() + b"\0" + caption.encode("utf-8")).digest()


def pack_entry(key: bytes, vectors: np.ndarray) -> bytes:
    """An entry's bytes: header, little-endian float16 ``[T, D]`` vectors, sha256 of both."""
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"an entry holds [T >= 1, D] vectors, got shape {vectors.shape}")
    body = _HEADER.pack(_MAGIC, key, vectors.shape[0], vectors.shape[1]) + \
        np.ascontiguousarray(vectors, dtype="<f2").tobytes()
    return body + hashlib.sha256(body).digest()


def unpack_entry(data: bytes, key: bytes, dim: int) -> np.ndarray:
    """float16 ``[T, dim]`` of an entry, after checking it whole; :class:`CorruptEntry` if not."""
    if len(data) < _HEADER.size + _DIGEST:
        raise CorruptEntry(f"{len(data)} bytes, shorter than an entry's header")
    magic, stored_key, tokens, width = _HEADER.unpack_from(data)
    if magic != _MAGIC or stored_key != key or width != dim or tokens < 1:
        raise CorruptEntry(f"header says magic {magic!r}, {tokens} x {width}, another key: "
                           f"{stored_key != key}; expected {_MAGIC!r}, T x {dim}")
    if len(data) != _HEADER.size + 2 * tokens * width + _DIGEST:
        raise CorruptEntry(f"{len(data)} bytes for {tokens} x {width} float16 (truncated or padded)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptEntry("checksum mismatch")
    return np.frombuffer(body, dtype="<f2", offset=_HEADER.size).reshape(tokens, width).astype(np.float16,
                                                                                             copy=False)


@dataclass
class DedupStats:
    """Encoder work of the shards embedded now: captions (rows with one) and their real tokens,
    how many of them the encoder ran, and why the rest did not (same caption earlier in the
    shard, or a cache hit). ``corrupt_entries``: cache files found bad, recomputed."""

    captions: int = 0
    distinct: int = 0  # distinct captions, summed over shards
    cache_hits: int = 0  # distinct captions read from the cache
    captions_encoded: int = 0
    tokens: int = 0
    tokens_encoded: int = 0
    corrupt_entries: int = 0

    def add(self, other: DedupStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self, cache: str | None) -> dict:
        """The embed result's ``caption_dedup``; ``saving`` is token-weighted (T5's cost grows with
        tokens), ``captions_saving`` counts captions."""
        return {**{name: getattr(self, name) for name in self.__dataclass_fields__}, "cache": cache,
                "saving": _share_saved(self.tokens_encoded, self.tokens),
                "captions_saving": _share_saved(self.captions_encoded, self.captions)}


def _share_saved(done: int, total: int) -> float:
    return round(1 - done / total, 4) if total else 0.0


def caption_dedup_saving(result: dict) -> float:
    """Share of the encoder's work (real tokens) saved by caption dedup in an embed result (the
    dict :func:`pipeline.data.embed.embed_shards` returns, or the ``embed`` CLI's JSON): 0.0 when
    nothing was encoded now (every shard skipped as done), 1.0 when every caption came from an
    earlier copy or the cache. ``bench/ingest.py`` reports this figure."""
    return float(result.get("caption_dedup", {}).get("saving", 0.0))


def write_entry(uri: str, data: bytes) -> None:
    """Write one entry so that no reader sees part of it (see the module doc)."""
    if storage.protocols(uri)[-1] in _ATOMIC_PUT:
        with storage.open(uri, "wb") as fh:
            fh.write(data)
    else:
        storage.write_bytes(uri, data)


class CaptionCache:
    """The entries of one encoder identity under ``root`` (``OUTPUT/caption-cache``)."""

    def __init__(self, root: str, identity: dict, slug: str, dim: int, threads: int = IO_THREADS):
        self.ident_key = identity_key(identity)
        self.dir = storage.join(root, f"{slug}-{self.ident_key[:12]}")
        self.dim = dim
        self.threads = threads

    def uri(self, key: bytes) -> str:
        name = key.hex()
        return storage.join(self.dir, name[:2], name[2:4], f"{name}.emb")

    def _get(self, caption: str) -> tuple[np.ndarray | None, bool]:
        key = caption_key(self.ident_key, caption)
        uri = self.uri(key)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            return None, False
        try:
            return unpack_entry(data, key, self.dim), False
        except CorruptEntry as err:
            log.warning("caption cache entry %s is corrupt (%s): recomputing it", uri, err)
            return None, True

    def get_many(self, captions: list[str]) -> tuple[dict[int, np.ndarray], int]:
        """``({i: float16 [T, D]} for the captions found whole, corrupt entries seen)``."""
        found, corrupt = {}, 0
        with ThreadPoolExecutor(self.threads) as pool:
            for i, (vectors, bad) in enumerate(pool.map(self._get, captions)):
                corrupt += bad
                if vectors is not None:
                    found[i] = vectors
        return found, corrupt

    def put_many(self, captions: list[str], vectors: list[np.ndarray]) -> None:
        """Store each caption's vectors (atomic per entry; an existing entry is replaced)."""
        def put(item: tuple[str, np.ndarray]) -> None:
            key = caption_key(self.ident_key, item[0])
            write_entry(self.uri(key), pack_entry(key, item[1]))

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(put, zip(captions, vectors, strict=True)))
