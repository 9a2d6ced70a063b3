"""Pass 2 of the filter step (:mod:`pipeline.data.filters`): global dedup, the validation split
and the reshard plan, from pass 1's per-raw-shard parquet files; and the plan's per-split and
per-stage counts for the manifest.

    from pipeline.data import reshard
    table, rejects, dropped = reshard.plan([("00000.tar", "OUT/_filter/00000.parquet"), ...], config, 1000,
                                           input="RAW/")
    reshard.split_counts(table, config), reshard.stage_counts(table, config.stage_sides)
    reshard.dedup_counts(table)

Of each group of (near) duplicates the best copy is kept (:mod:`pipeline.data.copies`: largest
native short side, then a lossless source, then URL-list order), read from the raw shards'
download records in ``input``: the same copies on every rerun, whatever order the downloads
finished in.

Cheap and global: it reads only pass 1's small rows (no image), so it is redone on every run
whose settings changed; the plan's ``plan_id`` (a hash of what pass 3 writes) decides whether
output shards already written may be kept.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data import copies
from pipeline.data import split as splits

if TYPE_CHECKING:
    from pipeline.data.filter_config import FilterConfig


def _copy_facts(input: str | None, raw_name: str, keys: list[str],
                stored_sides: list[int]) -> tuple[list[int], list[str | None]]:
    """Each key's native short side (its stored side where the download recorded none) and
    source format (None: the shard has no source record), from the raw shard in ``input``."""
    if input is None:
        return list(stored_sides), [None] * len(keys)
    tar_uri = storage.join(input, raw_name)
    native = copies.read_native_sides(tar_uri)
    sources = copies.read_sources(tar_uri) or {}
    return ([native.get(k, s) for k, s in zip(keys, stored_sides, strict=True)],
            [sources.get(k) for k in keys])


def plan(work: list[tuple[str, str]], config: FilterConfig, samples_per_shard: int,
         input: str | None = None) -> tuple[pa.Table, collections.Counter, collections.Counter]:
    """The plan from pass 1's files ``work``, ``[(raw shard name, its pass-1 parquet)]``: one
    row per sample that passed pass 1, in dataset order (raw shard name, then key),
    with its split and output shard (or its duplicate reason and original); also the rejects of
    pass 1 and 2 by reason, and the tar members pass 1 dropped, by reason. ``input``: the raw
    shards' folder, whose download records rank the copies of a duplicate group (without it,
    the stored side and URL order do)."""
    from pipeline.data.dedup import find_duplicates

    rejects: collections.Counter = collections.Counter()
    dropped: collections.Counter = collections.Counter()
    cols: dict[str, list] = {"raw": [], "key": [], "url": [], "sha256": [], "phash": [], "thumb": [],
                             "scores": [], "members": [], "side": [], "native_side": [], "source": []}
    for raw_name, work_uri in sorted(work):  # by name: the order shards finished in never counts
        with storage.open(work_uri, "rb") as f:
            table = pq.read_table(f)
        dropped.update(json.loads((table.schema.metadata or {}).get(b"dropped_members", b"{}")))
        rejects.update(x for x in table["reason"].to_pylist() if x is not None)
        # Key order whatever order the file's rows are in: img2dataset's keys are URL-list rows.
        table = table.filter(table["reason"].is_null())
        table = table.take(pc.sort_indices(table["key"]))
        cols["raw"] += [raw_name] * table.num_rows
        for name in ("key", "url", "sha256", "phash", "thumb", "scores", "members", "side"):
            cols[name] += table[name].to_pylist()
        native, sources = _copy_facts(input, raw_name, table["key"].to_pylist(), table["side"].to_pylist())
        cols["native_side"] += native
        cols["source"] += sources
    # One sample per key (embeddings and the loader join on it): the first copy that passed
    # pass 1, in dataset order (raw shard, then key), keeps it; later copies are counted.
    dups: dict[int, tuple[str, str]] = {}
    owner: dict[str, str] = {}
    for i, (raw_name, key) in enumerate(zip(cols["raw"], cols["key"], strict=True)):
        if key in owner:
            dups[i] = ("duplicate_key", f"{owner[key]}/{key}")
        else:
            owner[key] = raw_name
    if config.dedup or config.near_dedup:
        unique = [i for i in range(len(cols["key"])) if i not in dups]
        by_key = {cols["key"][i]: i for i in unique}
        # Walked best copy first (copies.best_first), the first of each group met is the one kept.
        # At 1e9 rows the ranking adds three numpy arrays (native side, lossless flag, the order:
        # 17 bytes a row, 17 GB); the walk holds 32-byte digests and, per kept sample, its 8-byte
        # pHash and 192-byte 8x8 thumbnail: signatures, never an image's pixels. What does not
        # hold at 1e9 is this function's per-row Python lists, ranking or not: pass 2 peaked at
        # ~6.4 KB of RSS a row on 40k synthetic rows (main and this alike; ranking +3-7% time),
        # so a billion rows needs the global pass split by pHash block first.
        idx = np.asarray(unique, np.int64)
        native = np.asarray([cols["native_side"][i] or 0 for i in unique], np.int64)
        lossless = np.asarray([copies.is_lossless(cols["source"][i]) for i in unique], bool)
        ranked = idx[copies.best_first(native, lossless)].tolist()
        found = find_duplicates(((cols["key"][i], cols["sha256"][i], cols["phash"][i], cols["thumb"][i])
                                 for i in ranked), exact=config.dedup, near=config.near_dedup,
                                max_distance=config.near_dup_distance,
                                color_tolerance=config.near_dup_color_tolerance)
        dups.update({by_key[key]: (reason, original) for key, reason, original in found})
    rejects.update(reason for reason, _ in dups.values())
    # The split is drawn after dedup, on purpose: of a group of (near) duplicates only one is
    # kept, so two copies of one image can never sit on both sides of it. By URL, not key:
    # img2dataset's keys are row positions, which another URL list would give to other images.
    kept = [i for i in range(len(cols["key"])) if i not in dups]
    held_out = splits.assign([cols["url"][i] or cols["key"][i] for i in kept], config.val_fraction,
                             config.val_max)
    split: list[str | None] = [None] * len(cols["key"])
    for i, val in zip(kept, held_out, strict=True):
        split[i] = splits.VAL if val else splits.TRAIN
    shard = splits.shard_names(split, samples_per_shard)
    fates = [dups.get(i, (None, None)) for i in range(len(cols["key"]))]
    plan = pa.table({"raw": cols["raw"], "key": cols["key"], "url": pa.array(cols["url"], pa.string()),
                     "split": pa.array(split, pa.string()), "shard": pa.array(shard, pa.string()),
                     "reason": pa.array([f[0] for f in fates], pa.string()),
                     "duplicate_of": pa.array([f[1] for f in fates], pa.string()),
                     "scores": pa.array(cols["scores"], pa.string()),
                     "members": pa.array(cols["members"], pa.string()),
                     "side": pa.array(cols["side"], pa.int32()),
                     "native_side": pa.array(cols["native_side"], pa.int32()),
                     "source": pa.array(cols["source"], pa.string())})
    # "members" holds each member's sha256: new bytes under the same keys make a new plan.
    digest = hashlib.sha256(json.dumps([plan[c].to_pylist() for c in ("raw", "key", "shard", "scores",
                                                                       "members")]).encode())
    return plan.replace_schema_metadata({b"plan_id": digest.hexdigest().encode()}), rejects, dropped


def dedup_counts(plan: pa.Table) -> dict:
    """The manifest's ``dedup``: the rules that pick the copy kept, how many groups kept a copy
    listed after one of their duplicates (the first-in-URL-order rule would have kept another),
    and how many samples had no source record (ranked as lossy)."""
    rows = plan.select(["key", "reason", "duplicate_of", "source"]).to_pylist()
    position = {r["key"]: i for i, r in enumerate(rows) if r["reason"] is None}
    later = {r["duplicate_of"] for i, r in enumerate(rows)
             if r["reason"] in ("duplicate_image", "near_duplicate_image") and position[r["duplicate_of"]] > i}
    return {"keep": list(copies.RULES), "kept_a_later_copy": len(later),
            "no_source_record": sum(r["source"] is None for r in rows)}


def split_counts(plan: pa.Table, config: FilterConfig) -> dict:
    """The manifest's ``split``: its settings and how many kept samples each side got."""
    kept = [(split, url) for split, url in zip(plan["split"].to_pylist(), plan["url"].to_pylist(), strict=True)
            if split]
    counts = collections.Counter(split for split, _ in kept)
    return {"val_fraction": config.val_fraction, "val_max": config.val_max, "by": "url",
            "train": counts[splits.TRAIN], "val": counts[splits.VAL],
            "keyed_without_url": sum(not url for _, url in kept)}


def stage_counts(plan: pa.Table, stage_sides: dict[str, int]) -> dict[str, dict]:
    """Per cascade stage and split: the kept samples it can use (stored short side >= its side)
    and those left out of it alone, as ``{"too_small_for_<stage>": n}``: ``samples`` and
    ``excluded`` of the training split, ``val_samples`` and ``val_excluded`` of the validation one."""
    sides = {name: [side for side, split in zip(plan["side"].to_pylist(), plan["split"].to_pylist(), strict=True)
                    if split == name] for name in splits.SPLITS}
    out = {}
    for stage, need in stage_sides.items():
        out[stage] = {"min_side": need}
        for name, prefix in ((splits.TRAIN, ""), (splits.VAL, "val_")):
            small = sum(s is None or s < need for s in sides[name])
            out[stage][f"{prefix}samples"] = len(sides[name]) - small
            out[stage][f"{prefix}excluded"] = {f"too_small_for_{stage}": small}
    return out
