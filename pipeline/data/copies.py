"""Which copy of a near-duplicate group the filter keeps: the facts it ranks by, and the ranking.

A URL list often holds one picture several times: a thumbnail, a re-encode, the original. The
filter's dedup (:mod:`pipeline.data.dedup`, called from :mod:`pipeline.data.reshard`) keeps one
copy per group, the best by these rules, in order:

1. the largest NATIVE short side: the size the host served, before img2dataset resized it
   (``original_width`` / ``original_height`` in the shard's parquet). It serves the most
   cascade stages: a 256x192 thumbnail is too small for a 256 px stage, its 1024x768 original
   serves every stage up to 768.
2. a lossless source over a lossy one: the format of the body as downloaded (PNG, lossless
   WebP, BMP, TIFF, ...), not the format the shard stores (img2dataset re-encodes everything to
   ``encode_format``). It is recorded at download time, because only the fetch sees the body:
   :data:`SOURCES` records it (:func:`source_format`) in the guarded fetch and writes one sidecar per shard,
   ``NNNNN_source.jsonl`` (``{"key": ..., "source": "png"}`` per fetched sample), next to
   img2dataset's ``NNNNN.parquet``.
3. URL-list order (the key): img2dataset's keys are URL-list positions.

Every rule reads a fact of the sample itself, never the order downloads finished in, so a
rerun keeps the same copies. A shard without a sidecar (downloaded before sources were
recorded, or killed between its ``_stats.json`` and the sidecar) gives its copies no lossless
preference: they rank as lossy, and the filter's manifest counts them (``dedup.no_source_record``).

    from pipeline.data.copies import best_first, read_copy_facts, sniff_format
    sniff_format(body)                       # "png", "jpeg", "webp_lossless", ...
    facts = read_copy_facts("raw/00000.tar") # {key: (native short side or None, source or None)}
    order = best_first(native_sides, lossless)  # row indices, the copy to keep first
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator

import numpy as np

from pipeline import storage
from pipeline.data.image_headers import Header, Unsized, read_header

SIDECAR_SUFFIX = "_source.jsonl"
# Sources whose encoding keeps every pixel. GIF is not among them: its 256-colour palette
# quantises a photo. TIFF may hold JPEG-compressed strips (rare on the web): taken as lossless.
LOSSLESS = frozenset({"png", "webp_lossless", "bmp", "tiff", "pnm", "pfm", "hdr", "qoi"})
# The order of the rules, for the manifest and the README.
RULES = ("native_short_side", "lossless_source", "url_order")

# Header formats (pipeline.data.image_headers) whose source name here differs from the lower case.
_SOURCE_NAMES = {"pam": "pnm", "jpeg2000": "jp2"}


def source_format(header: Header, body: bytes) -> str:
    """The name dedup ranks a body's format by: :mod:`pipeline.data.image_headers` tells the
    format from its magic bytes (one owner of them; the fetch guard has read the header
    already), lower-cased; WebP is told apart by its bitstream chunk: ``VP8L`` is lossless,
    ``VP8 `` lossy (also behind a ``VP8X`` header and inside the first frame of an animation)."""
    name = header.format.lower()
    return _webp_kind(body) if name == "webp" else _SOURCE_NAMES.get(name, name)


def sniff_format(body: bytes) -> str:
    """:func:`source_format` of a whole body ("unknown" for a body the fetch guard refuses as
    unsized or unsupported: none of those reaches a shard)."""
    try:
        return source_format(read_header(body), body)
    except Unsized:
        return "unknown"


def _webp_kind(body: bytes) -> str:
    pos = 12
    while pos + 8 <= len(body):
        fourcc, size = body[pos:pos + 4], int.from_bytes(body[pos + 4:pos + 8], "little")
        if fourcc == b"VP8L":
            return "webp_lossless"
        if fourcc == b"VP8 ":
            return "webp"
        # An animation frame (ANMF) holds its bitstream chunk after a 16-byte frame header.
        pos = pos + 8 + 16 if fourcc == b"ANMF" else pos + 8 + size + (size & 1)
    return "webp"  # no bitstream chunk found: claim nothing better than lossy


def is_lossless(source: str | None) -> bool:
    return source in LOSSLESS


def sidecar_of(tar_uri: str) -> str:
    """``NNNNN_source.jsonl`` next to raw shard ``NNNNN.tar``."""
    return tar_uri[: -len(".tar")] + SIDECAR_SUFFIX


class SourceLog:
    """The source format of every body fetched in this process, written per shard as its sidecar.

    img2dataset downloads one shard at a time per process (its threads call :meth:`record`);
    :meth:`shard` brackets that shard. The sidecar is written after img2dataset has written the
    shard (and its ``_stats.json``): a shard it failed is retried from scratch, sidecar included.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[int, str] = {}

    def record(self, key: int, source: str) -> None:
        """The :func:`source_format` of one fetched body of the current shard; ``key`` is its row
        in the shard (img2dataset's)."""
        with self._lock:
            self._sources[key] = source

    @contextlib.contextmanager
    def shard(self, downloader, shard_id: int) -> Iterator[None]:
        """Record the bodies of shard ``shard_id`` of img2dataset's ``downloader`` (its
        ``Downloader``: output folder and key layout), then write the sidecar."""
        from img2dataset.downloader import compute_key  # the keys the shard's tar and parquet carry

        with self._lock:
            self._sources = {}
        yield
        with self._lock:
            sources, self._sources = self._sources, {}
        oom_samples = int(np.ceil(np.log10(downloader.number_sample_per_shard)))
        name = f"{shard_id:0{downloader.oom_shard_count}d}.tar"
        lines = [json.dumps({"key": compute_key(k, shard_id, oom_samples, downloader.oom_shard_count),
                             "source": sources[k]}) + "\n" for k in sorted(sources)]
        with storage.atomic_write(sidecar_of(storage.join(downloader.output_folder, name)), "w") as f:
            f.writelines(lines)


SOURCES = SourceLog()  # one per download process: the guarded fetch records into it


def read_sources(tar_uri: str) -> dict[str, str] | None:
    """``{key: source format}`` of a raw shard's sidecar; None when it has none."""
    import pyarrow as pa
    import pyarrow.json as pajson

    uri = sidecar_of(tar_uri)
    if not storage.exists(uri):
        return None
    with storage.open(uri, "rb") as f:
        data = f.read()
    if not data.strip():
        return {}  # a shard whose every fetch failed
    # Arrow's JSON reader, not json.loads per line: a billion-row dataset has a billion lines.
    # The schema is explicit: keys such as "0000701" must stay strings, leading zeros and all.
    schema = pa.schema([("key", pa.string()), ("source", pa.string())])
    table = pajson.read_json(pa.BufferReader(data), parse_options=pajson.ParseOptions(explicit_schema=schema))
    return dict(zip(table["key"].to_pylist(), table["source"].to_pylist(), strict=True))


def read_native_sides(tar_uri: str) -> dict[str, int]:
    """``{key: short side before img2dataset resized it}`` from the raw shard's parquet, for the
    successes that record it (img2dataset leaves it empty with ``resize_mode="no"``)."""
    import pyarrow.parquet as pq

    columns = ["key", "status", "original_width", "original_height"]
    with storage.open(tar_uri[: -len(".tar")] + ".parquet", "rb") as f:
        parquet = pq.ParquetFile(f)
        if not set(columns) <= set(parquet.schema_arrow.names):
            return {}  # a shard written by hand (tests) or by another tool
        rows = parquet.read(columns=columns).to_pylist()
    return {str(r["key"]): min(r["original_width"], r["original_height"]) for r in rows
            if r["status"] == "success" and r["original_width"] and r["original_height"]}


def best_first(native_side: np.ndarray, lossless: np.ndarray) -> np.ndarray:
    """Row indices ordered best copy first: largest ``native_side``, then ``lossless``, then
    row position (the caller's rows are in URL-list order: raw shard, then key).

    A stable total order on facts of the rows, so walking it and keeping the first copy of each
    group (:func:`pipeline.data.dedup.find_duplicates`) keeps the best one. Memory: the two
    inputs and the int64 permutation, 8 + 1 + 8 bytes a row besides the caller's arrays."""
    native_side = np.asarray(native_side, np.int64)
    lossless = np.asarray(lossless, bool)
    # lexsort sorts by its last key first; it is stable, so equal rows keep their position.
    return np.lexsort((~lossless, -native_side)).astype(np.int64)
