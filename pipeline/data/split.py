"""The held-out validation split of the filtered data, and the names of each split's shards.

The filter step decides once which kept sample is held out: a pure function of the sample's
source URL and two settings (``FilterConfig.val_fraction``, ``val_max``), never of the process,
the run or the order of the URL list, so a rerun and a longer URL list keep every sample where
it was (see :func:`assign`). Validation samples go to their own shards beside the training
ones, in the same folder and format::

    000000.tar, 000001.tar, ...           training shards     (TRAIN_SHARD)
    val-000000.tar, val-000001.tar, ...   validation shards   (VAL_SHARD)

and the embed step writes ``NNNNNN.parquet`` / ``val-NNNNNN.parquet`` beside each other. A
reader that lists training shards (``storage.list_shards(data, TRAIN_SHARD)``, a full match on
the file name) cannot see a validation sample, by construction. Shard numbers have at least six
digits; img2dataset's raw shards have five, so no listing of filtered shards (nor the filter's
cleanup of its own) ever takes a raw shard for one. This module is the one place that knows
these names; every listing asks :func:`shard_pattern` or :func:`shard_name`.

    from pipeline.data.split import assign, shard_name, shard_pattern
    held_out = assign(urls, val_fraction=0.05, val_max=10_000)    # [bool] per sample
    shard_name("val", 3)                                           # "val-000003.tar"
    shard_pattern("train", "parquet")                              # r"\\d{6,}\\.parquet"

Imports only the standard library.
"""

from __future__ import annotations

import hashlib
import re

TRAIN, VAL = "train", "val"
SPLITS = (TRAIN, VAL)
_PREFIX = {TRAIN: "", VAL: "val-"}


def shard_pattern(split: str | None = TRAIN, ext: str = "tar") -> str:
    """Regex (full match on the file name) of one split's shard files; ``split=None``: both."""
    prefix = "(?:val-)?" if split is None else _PREFIX[split]
    return rf"{prefix}\d{{6,}}\.{re.escape(ext)}"


TRAIN_SHARD = shard_pattern(TRAIN)
VAL_SHARD = shard_pattern(VAL)


def shard_name(split: str, index: int, ext: str = "tar") -> str:
    """The file name of shard ``index`` of ``split``: ``000003.tar``, ``val-000003.tar``."""
    return f"{_PREFIX[split]}{index:06d}.{ext}"


def split_of(name: str) -> str:
    """The split a shard file (name or URI) belongs to."""
    return VAL if name.rstrip("/").rsplit("/", 1)[-1].startswith(_PREFIX[VAL]) else TRAIN


def position(source: str) -> int:
    """Where ``source`` (a URL) falls in [0, 2**64): the first 8 bytes of the sha256 of its
    UTF-8 bytes, big-endian. The same in every process and on every machine (Python's
    ``hash()`` is salted per process and would split differently on every run)."""
    return int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:8], "big")


def check_settings(val_fraction: float, val_max: int) -> None:
    """Raise, saying what to set, unless ``0 <= val_fraction < 1`` and ``val_max >= 0``."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: use 0 <= val_fraction < 1 (0: no validation split)")
    if val_max < 0:
        raise ValueError(f"val_max={val_max}: use >= 0 (the most samples held out; 0: none)")


def assign(sources: list[str], val_fraction: float, val_max: int) -> list[bool]:
    """Which samples are held out for validation (True), one flag per sample of ``sources``.

    A sample is a candidate when ``position(source) / 2**64 < val_fraction``; of the
    candidates, the ``val_max`` with the smallest positions (ties: the smaller source, then
    the earlier sample) are validation, the others train. ``val_fraction == 0``: no sample is.

    Stable by construction: a sample's flag depends on its own source and, under the cap, on
    the positions of the other candidates only. Appending rows to the URL list (a rerun with
    more data) adds candidates, which can only push the largest-position validation samples
    out of the cap, into train; it never moves a training sample into validation, so a model
    trained on the old split has never seen a sample of the new one.
    """
    check_settings(val_fraction, val_max)
    points = [position(s) for s in sources]
    candidates = [i for i, p in enumerate(points) if p / 2**64 < val_fraction]
    chosen = set(sorted(candidates, key=lambda i: (points[i], sources[i], i))[:val_max])
    return [i in chosen for i in range(len(sources))]


def shard_names(splits: list[str | None], samples_per_shard: int) -> list[str | None]:
    """The output shard of each sample, in order: the n-th sample of a split goes to that
    split's shard ``n // samples_per_shard``; a sample with no split (not kept) gets None."""
    seen = dict.fromkeys(SPLITS, 0)
    names: list[str | None] = []
    for split in splits:
        if split is None:
            names.append(None)
            continue
        names.append(shard_name(split, seen[split] // samples_per_shard))
        seen[split] += 1
    return names
