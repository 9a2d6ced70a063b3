"""Exact and near-duplicate image detection across a whole dataset.

Each sample gets, once, in the per-shard filter pass: the sha256 of its stored image bytes, a
64-bit perceptual hash (imagehash's pHash: DCT of a 32x32 grayscale thumbnail) and an 8x8 RGB
thumbnail. The global pass (:func:`find_duplicates`) then walks all samples in the order given
and keeps the first of each group; the filter gives them best copy first (largest native side,
lossless source, URL order: :mod:`pipeline.data.copies`), so the first met is the one to keep:

- exact duplicate: same sha256 (``duplicate_image``);
- near duplicate: pHash Hamming distance <= ``near_dup_distance`` AND no thumbnail cell
  differs by more than ``near_dup_color_tolerance`` in any channel (``near_duplicate_image``).
  pHash sees only luminance structure, so a red and a purple triangle at the same place hash
  alike; for text-to-image training those are different pairs ("a red triangle" vs "a purple
  triangle"), and the colour check keeps both (the max, not the mean, so a small recoloured
  object still counts). Measured on 96 px synthetic images stored at 64 px: JPEG re-encodes
  (quality 40-70), rescales and +8% brightness stay within distance 6-8 and a cell difference
  of 19; distinct images within distance 6 differ by 94 or more in some cell.

Candidates are found with a multi-index hash (Norouzi et al., 2012): the 64 bits are split into
``d + 1`` blocks and, by pigeonhole, two hashes within distance ``d`` agree exactly on at least
one block, so each lookup only compares against samples that share a block. Written here
because the libraries that index binary codes (faiss, BK-tree packages) are heavy or unmaintained
for a few dozen lines of dictionary code.

    from pipeline.data.dedup import image_signature, find_duplicates
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image

from pipeline.data.images import to_rgb

THUMB = 8  # thumbnail side for the colour check
THUMB_BYTES = THUMB * THUMB * 3


def image_signature(image_bytes: bytes, image: Image.Image) -> tuple[bytes, int, bytes]:
    """(sha256 of the bytes, 64-bit pHash as an int, 8x8 RGB thumbnail as 192 bytes)."""
    return hashlib.sha256(image_bytes).digest(), *perceptual_hashes(to_rgb(image))


def perceptual_hashes(rgb: Image.Image) -> tuple[int, bytes]:
    """(64-bit pHash as an int, 8x8 thumbnail as 192 bytes) of an 8-bit RGB image: both from the
    RGB pixels, so a 16-bit or transparent image hashes as it looks. The one computation of both:
    the filter (:func:`image_signature`) and the download child (:mod:`pipeline.data.facts`) call
    it, so the same pixels give the same bits on either side."""
    import imagehash  # deferred: only the filter pass and the download workers need it

    phash = int.from_bytes(np.packbits(imagehash.phash(rgb).hash.flatten()).tobytes(), "big")
    return phash, rgb.resize((THUMB, THUMB), Image.Resampling.BOX).tobytes()


class NearDuplicateIndex:
    """Remembers kept samples; :meth:`find` returns the key of a near duplicate among them, if any."""

    def __init__(self, max_distance: int, color_tolerance: float):
        if not 0 <= max_distance < 32:
            raise ValueError(f"near_dup_distance={max_distance}: use 0..31 bits of the 64-bit pHash")
        self.max_distance, self.color_tolerance = max_distance, color_tolerance
        n_blocks = max_distance + 1
        # Block boundaries over the 64 bits; blocks differ in width by at most one bit.
        edges = [round(i * 64 / n_blocks) for i in range(n_blocks + 1)]
        self._blocks = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:], strict=False)]
        self._tables: list[dict[int, list[int]]] = [collections.defaultdict(list) for _ in self._blocks]
        self._hashes: list[int] = []
        self._thumbs = bytearray()  # 192 bytes per kept sample: compact for millions of samples
        self._keys: list[str] = []

    def _candidates(self, phash: int) -> set[int]:
        found: set[int] = set()
        for table, (lo, mask) in zip(self._tables, self._blocks, strict=True):
            found.update(table.get((phash >> lo) & mask, ()))
        return found

    def find(self, phash: int, thumb: bytes) -> str | None:
        pixels = np.frombuffer(thumb, np.uint8).astype(np.int16)
        for i in sorted(self._candidates(phash)):
            if (self._hashes[i] ^ phash).bit_count() > self.max_distance:
                continue
            kept = np.frombuffer(self._thumbs, np.uint8, THUMB_BYTES, i * THUMB_BYTES).astype(np.int16)
            if np.abs(kept - pixels).max() <= self.color_tolerance:
                return self._keys[i]
        return None

    def add(self, key: str, phash: int, thumb: bytes) -> None:
        i = len(self._keys)
        for table, (lo, mask) in zip(self._tables, self._blocks, strict=True):
            table[(phash >> lo) & mask].append(i)
        self._hashes.append(phash)
        if len(thumb) != THUMB_BYTES:
            raise ValueError(f"thumbnail of {key} has {len(thumb)} bytes, expected {THUMB_BYTES}")
        self._thumbs += thumb
        self._keys.append(key)


def find_duplicates(samples: Iterable[tuple[str, bytes, int, bytes]], exact: bool = True, near: bool = True,
                    max_distance: int = 6, color_tolerance: float = 32.0) -> Iterator[tuple[str, str, str]]:
    """Yield ``(key, reason, key_of_kept_original)`` for every duplicate, in input order.

    ``samples`` are ``(key, sha256, phash, thumbnail)``, most wanted first: the first of a group
    wins (:func:`pipeline.data.copies.best_first` gives that order).
    """
    seen: dict[bytes, str] = {}
    index = NearDuplicateIndex(max_distance, color_tolerance) if near else None
    for key, digest, phash, thumb in samples:
        if exact and digest in seen:
            yield key, "duplicate_image", seen[digest]
            continue
        if index is not None:
            original = index.find(phash, thumb)
            if original is not None:
                yield key, "near_duplicate_image", original
                continue
            index.add(key, phash, thumb)
        seen.setdefault(digest, key)
