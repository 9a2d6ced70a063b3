"""What the filter needs to know of a stored image, computed in the download from the pixels it stores.

img2dataset decodes every body and encodes the pixels it stores (PNG by default: lossless). The
filter step used to decode each stored PNG again only to learn that it decodes, its pHash and
8x8 thumbnail (dedup) and each channel's extremes (the blank filter): half its time. All of
these are functions of the pixels, so the download process computes them from the very array
img2dataset hands OpenCV's encoder, and writes them per shard, beside ``NNNNN.tar``, as
``NNNNN_facts.arrow`` (an Arrow IPC file), one row per stored image:

    sha256          of the stored image bytes (the tar member's data): what a fact is looked up by
    width, height   of the stored image
    phash, thumb    :func:`pipeline.data.dedup.perceptual_hashes` of its 8-bit RGB pixels
    extrema         each RGB channel's (min, max), as PIL's ``getextrema()`` (6 bytes)

Exact, not approximate: PNG is lossless, so decoding the stored bytes gives the array back, and
the RGB image built from it here is, pixel for pixel, the one the filter's decode gives
(:func:`pipeline.data.images.to_rgb` of a PNG OpenCV wrote from an 8-bit grey or BGR array: no
alpha, palette, EXIF or depth left to convert). Only such arrays encoded as PNG get facts; a
lossy ``encode_format`` (JPEG, WebP) records none.

The filter (:mod:`pipeline.data.filters`) uses a fact only for a member whose bytes hash to its
``sha256`` and whose header gives its size; every other image is decoded as before: shards
downloaded before facts existed, shards without a sidecar or with an unreadable one (a download
killed between its ``_stats.json`` and the sidecar), members rewritten since. A fact keyed by
the hash of the bytes is a function of those bytes, so a stale sidecar can miss images, never
give a wrong fact.

How the array is seen: :func:`watch` wraps img2dataset's ``Resizer`` of the download process
(:class:`FactsResizer`) and puts a stand-in for the ``cv2`` module in front of its resizer
module, whose ``imencode`` notes (per thread) the array it encodes. :data:`FACTS` collects the
facts of a shard and writes its sidecar after it (:meth:`FactsLog.shard`, bracketed by
:class:`pipeline.data.fetch_guard.GuardedDownloader`, so the multiprocessing, Spark and retry
paths all record them).

    from pipeline.data.facts import read_facts
    facts = read_facts("raw/00000.tar")   # {sha256 digest: ImageFacts}; {} without a sidecar
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
import warnings
from collections.abc import Iterator

import numpy as np

from pipeline import storage

SIDECAR_SUFFIX = "_facts.arrow"  # not .parquet: readers of img2dataset output glob *.parquet
COLUMNS = ("sha256", "width", "height", "phash", "thumb", "extrema")


@dataclasses.dataclass(frozen=True)
class ImageFacts:
    """One stored image's facts (see the module docstring)."""

    sha256: bytes
    width: int
    height: int
    phash: int
    thumb: bytes
    extrema: tuple[tuple[int, int], ...]  # per RGB channel: (min, max)


def facts_of_pixels(pixels: np.ndarray, encoded: bytes) -> ImageFacts | None:
    """The facts of ``encoded``, the PNG OpenCV wrote from ``pixels`` (grey, or BGR as img2dataset
    hands arrays to OpenCV); None for an array that is no 8-bit grey or 3-channel image."""
    import cv2
    from PIL import Image

    from pipeline.data.dedup import perceptual_hashes

    if pixels.dtype != np.uint8 or not pixels.size:
        return None
    height, width = pixels.shape[:2]
    pixels = np.ascontiguousarray(pixels)
    # Pillow unpacks the array itself (a third of the time of a numpy flip and copy); OpenCV's
    # min/max per channel takes a third of Pillow's getextrema. Both exact on 8-bit data.
    if pixels.ndim == 2:
        rgb = Image.frombuffer("L", (width, height), pixels, "raw", "L", 0, 1).convert("RGB")  # as to_rgb does
        extrema = (tuple(int(v) for v in cv2.minMaxLoc(pixels)[:2]),) * 3
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        rgb = Image.frombuffer("RGB", (width, height), pixels, "raw", "BGR", 0, 1)
        extrema = tuple(tuple(int(v) for v in cv2.minMaxLoc(cv2.extractChannel(pixels, c))[:2]) for c in (2, 1, 0))
    else:
        return None
    phash, thumb = perceptual_hashes(rgb)
    return ImageFacts(hashlib.sha256(encoded).digest(), width, height, phash, thumb, extrema)


# --- in the download process --------------------------------------------------------------------

_SEEN = threading.local()  # .encoded: (ext, array, imencode's result) of the last encode in this thread


class _EncodeWatch:
    """Stands in for the ``cv2`` module in img2dataset's resizer module: every attribute is
    cv2's, but ``imencode`` notes what it encoded, for :class:`FactsResizer`."""

    def __init__(self, cv2):
        self._cv2 = cv2

    def __getattr__(self, name: str):
        return getattr(self._cv2, name)

    def imencode(self, ext, img, *args, **kwargs):
        result = self._cv2.imencode(ext, img, *args, **kwargs)
        _SEEN.encoded = (ext, img, result)
        return result


class FactsResizer:
    """img2dataset's ``Resizer``, unchanged in what it returns, recording into :data:`FACTS` the
    facts of each image it encodes as PNG. A fact that cannot be computed is left out (the
    filter decodes that image); it never fails a sample."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, img_stream, *args, **kwargs):
        _SEEN.encoded = None
        out = self.inner(img_stream, *args, **kwargs)  # (img_str, width, height, ow, oh, error)
        seen, _SEEN.encoded = getattr(_SEEN, "encoded", None), None
        if seen is not None and out[0] is not None and out[-1] is None and str(seen[0]).lower() == ".png":
            try:
                ok, buffer = seen[2]
                # the bytes returned must be the ones this array was encoded into
                facts = facts_of_pixels(seen[1], out[0]) if ok and buffer.tobytes() == out[0] else None
            except Exception:  # noqa: BLE001 - the filter decodes what has no facts
                facts = None
            if facts is not None:
                FACTS.record(facts)
        return out


def watch(downloader) -> None:
    """Make img2dataset's ``downloader`` (its ``Downloader``, in this process) record the facts of
    the images it stores as PNG. Idempotent."""
    if getattr(downloader, "encode_format", None) != "png":
        return  # lossy encodes: the stored pixels are not the array's
    import img2dataset.resizer as i2d_resizer

    if not isinstance(i2d_resizer.cv2, _EncodeWatch):
        i2d_resizer.cv2 = _EncodeWatch(i2d_resizer.cv2)
    if not isinstance(downloader.resizer, FactsResizer):
        downloader.resizer = FactsResizer(downloader.resizer)


def sidecar_of(tar_uri: str) -> str:
    """``NNNNN_facts.arrow`` next to raw shard ``NNNNN.tar``."""
    return tar_uri[: -len(".tar")] + SIDECAR_SUFFIX


def _schema():
    import pyarrow as pa

    from pipeline.data.dedup import THUMB_BYTES

    return pa.schema([("sha256", pa.binary(32)), ("width", pa.int32()), ("height", pa.int32()),
                      ("phash", pa.uint64()), ("thumb", pa.binary(THUMB_BYTES)), ("extrema", pa.binary(6))])


def write_facts(tar_uri: str, facts: list[ImageFacts]) -> None:
    """Write ``facts`` as ``tar_uri``'s sidecar, atomically."""
    import pyarrow as pa

    columns = {"sha256": [f.sha256 for f in facts], "width": [f.width for f in facts],
               "height": [f.height for f in facts], "phash": [f.phash for f in facts],
               "thumb": [f.thumb for f in facts],
               "extrema": [bytes(v for pair in f.extrema for v in pair) for f in facts]}
    table = pa.table(columns, schema=_schema())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with storage.atomic_write(sidecar_of(tar_uri)) as fh:
        fh.write(sink.getvalue().to_pybytes())


class FactsLog:
    """The facts of the images stored in this process, written per shard as its sidecar.

    Like :class:`pipeline.data.copies.SourceLog`: img2dataset downloads one shard at a time per
    process, and :meth:`shard` brackets it; the sidecar is written after the shard (and its
    ``_stats.json``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._facts: dict[bytes, ImageFacts] = {}

    def record(self, facts: ImageFacts) -> None:
        with self._lock:
            self._facts[facts.sha256] = facts

    @contextlib.contextmanager
    def shard(self, downloader, shard_id: int) -> Iterator[None]:
        """Record the images of shard ``shard_id`` of img2dataset's ``downloader``, then write
        the sidecar (none when no image has facts)."""
        with self._lock:
            self._facts = {}
        yield
        with self._lock:
            facts, self._facts = self._facts, {}
        if facts:
            name = f"{shard_id:0{downloader.oom_shard_count}d}.tar"
            write_facts(storage.join(downloader.output_folder, name), list(facts.values()))


FACTS = FactsLog()  # one per download process: FactsResizer records into it


# --- in the filter ------------------------------------------------------------------------------

def read_facts(tar_uri: str) -> dict[bytes, ImageFacts]:
    """``{sha256 digest: facts}`` of a raw shard's sidecar; {} when it has none, or one that
    cannot be read (with a warning): the filter then decodes those images."""
    import pyarrow as pa

    uri = sidecar_of(tar_uri)
    if not storage.exists(uri):
        return {}
    try:
        with storage.open(uri, "rb") as fh:
            table = pa.ipc.open_file(pa.BufferReader(fh.read())).read_all()
        if not table.schema.equals(_schema()):
            raise ValueError(f"schema {table.schema.names} is not {list(COLUMNS)}")
        columns = [table[c].to_pylist() for c in COLUMNS]
    except (OSError, ValueError, pa.ArrowException) as err:
        warnings.warn(f"{uri} cannot be read ({err}); the filter decodes the images of {tar_uri}", stacklevel=2)
        return {}
    return {sha: ImageFacts(sha, w, h, phash, thumb, tuple(zip(ext[0::2], ext[1::2], strict=True)))
            for sha, w, h, phash, thumb, ext in zip(*columns, strict=True)}
