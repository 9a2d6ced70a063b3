"""Issue 24, items 3 and 4: raw shards are matched by exact member names and verified by content.

- A member named ``KEY.PNG`` (any spelling but the exact lower-case extension) is dropped and
  counted; it never blocks the filter step, on the first run or on a rerun.
- A raw shard rewritten in place at the same size is filtered again, not reused: pass 1's
  results are keyed by the raw shard's sha256, and pass 3 checks every member it copies against
  the sha256 pass 1 recorded.

    .venv/bin/pytest tests/unit/test_integrity_round3_filter.py -q
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import filters, reshard, shards
from pipeline.data.filters import filter_shards, sample_fates
from tests.unit.test_shard_integrity import (
    NO_DEDUP,
    good_shard,
    members,
    output_members,
    png,
    write_raw_shard,
)


def test_upper_case_extension_is_dropped_and_counted_and_never_blocks(tmp_path):
    raw = tmp_path / "raw"
    keys = [f"00000{i:04d}" for i in range(4)]
    entries = members(keys[0], 0)
    # Only the image misspelt: the sample has no image member.
    entries += [(f"{keys[1]}.PNG", png(1)), *members(keys[1], 1)[1:]]
    # Every member misspelt: no member of the key is usable.
    entries += [(f"{keys[2]}.{ext.upper()}", data) for (name, data) in members(keys[2], 2)
                for ext in [name.split(".", 1)[1]]]
    # A good sample with a second, misspelt image: the exact name is the one used.
    entries += [*members(keys[3], 3), (f"{keys[3]}.Png", png(99)), (f"{keys[3]}.foo", b"x")]
    write_raw_shard(raw, 0, entries, keys)
    out = tmp_path / "out"
    for attempt in range(2):  # the rerun too
        if attempt:
            (out / "manifest.json").unlink()
        manifest = filter_shards(str(raw), str(out), NO_DEDUP, samples_per_shard=10 + attempt)
        assert manifest["kept"] == 2 and manifest["input_rows"] == 4 and manifest["rejected"] == 2
        assert manifest["rejects"]["filter"] == {"unknown_member_extension": 2}
        assert manifest["dropped_members"] == {"unknown_member_extension": 6}
    got = output_members(out)
    assert set(got) == {f"{k}.{e}" for k in (keys[0], keys[3]) for e in ("png", "txt", "json")}
    assert got[f"{keys[3]}.png"] == png(3)
    fates = {r["key"]: r["reason"] for r in sample_fates(str(raw), str(out)).to_pylist()}
    assert fates == {keys[0]: None, keys[1]: "unknown_member_extension", keys[2]: "unknown_member_extension",
                     keys[3]: None}


def test_split_key_keeps_the_spelling():
    assert shards.split_key("000000001.PNG") == ("000000001", "PNG")
    assert shards.split_key("000000001.png") == ("000000001", "png")


# --- item 4: same-size rewrites -------------------------------------------------------------

def padded_tiny_png(length: int) -> bytes:
    """A 4x4 PNG padded with zero bytes to ``length``: PIL reads it as 4x4 and ignores the tail."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "PNG")
    data = buf.getvalue()
    assert len(data) <= length
    return data + b"\0" * (length - len(data))


def rewrite_in_place(tar: Path, name: str, data: bytes) -> None:
    """Rewrite ``tar`` with member ``name``'s data replaced by ``data`` of the same length:
    same size, same names, same offsets; only the content differs."""
    size = tar.stat().st_size
    with tarfile.open(tar) as t:
        entries = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    entries = [(n, data if n == name else d) for n, d in entries]
    assert len(dict(entries)[name]) == len(data)
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        for n, d in entries:
            info = tarfile.TarInfo(n)
            info.size = len(d)
            t.addfile(info, io.BytesIO(d))
    assert tar.stat().st_size == size


def test_same_size_rewrite_is_filtered_again_not_reused(tmp_path):
    raw = tmp_path / "raw"
    tar, keys = good_shard(raw, 0, 4)
    good_shard(raw, 1, 3)
    out = tmp_path / "out"
    first = filter_shards(str(raw), str(out), NO_DEDUP, samples_per_shard=10)
    assert first["kept"] == 7
    work = {p.name: p.stat().st_mtime_ns for p in (out / "_filter").glob("0*.parquet")}
    # A global setting changed: pass 1 is reused for unchanged raw shards (verified, not redone).
    assert filter_shards(str(raw), str(out), NO_DEDUP, samples_per_shard=9)["kept"] == 7
    assert work == {p.name: p.stat().st_mtime_ns for p in (out / "_filter").glob("0*.parquet")}
    victim = f"{keys[1]}.png"
    rewrite_in_place(tar, victim, padded_tiny_png(len(png(1))))
    manifest = filter_shards(str(raw), str(out), NO_DEDUP, samples_per_shard=8)
    assert manifest["kept"] == 6 and manifest["rejects"]["filter"] == {"image_too_small": 1}
    assert victim not in output_members(out)
    redone = {p.name: p.stat().st_mtime_ns for p in (out / "_filter").glob("0*.parquet")}
    assert redone["00001.parquet"] == work["00001.parquet"] and redone["00000.parquet"] != work["00000.parquet"]
    meta = pq.read_schema(out / "_filter" / "00000.parquet").metadata
    assert meta[b"raw_sha256"].decode() == hashlib.sha256(tar.read_bytes()).hexdigest()


@pytest.mark.parametrize("member", ["image", "caption"])
def test_pass_3_checks_each_members_sha256(tmp_path, monkeypatch, member):
    raw = tmp_path / "raw"
    tar, keys = good_shard(raw, 0, 4)
    victim = f"{keys[2]}.png" if member == "image" else f"{keys[2]}.txt"
    caption = members(keys[2], 2)[1][1]
    bad = padded_tiny_png(len(png(2))) if member == "image" else caption.upper()
    plan = reshard.plan

    def plan_then_rewrite(*args, **kwargs):
        result = plan(*args, **kwargs)  # pass 1 is done: the shard changes before pass 3 reads it
        rewrite_in_place(tar, victim, bad)
        return result

    monkeypatch.setattr(reshard, "plan", plan_then_rewrite)
    out = tmp_path / "out"
    with pytest.raises(filters.RawShardChanged, match=rf"raw shard .*00000\.tar changed since it was filtered "
                                                      rf"\(member {victim} "):
        filter_shards(str(raw), str(out), NO_DEDUP)
    assert not (out / "manifest.json").exists()
    assert bad not in output_members(out).values()
    monkeypatch.setattr(reshard, "plan", plan)
    manifest = filter_shards(str(raw), str(out), NO_DEDUP)  # the next run filters the new bytes
    got = output_members(out)
    if member == "image":
        assert manifest["kept"] == 3 and victim not in got
    else:
        assert manifest["kept"] == 4 and got[victim] == bad


def test_locations_carry_each_members_sha256(tmp_path):
    tar, keys = good_shard(tmp_path / "raw", 0, 2)
    locations: dict = {}
    assert [s.key for s in filters.read_shard(str(tar), locations=locations)] == keys
    for i, key in enumerate(keys):
        want = {name.split(".", 1)[1]: hashlib.sha256(data).hexdigest() for name, data in members(key, i)}
        assert {ext: loc[2] for ext, loc in locations[key].items()} == want
