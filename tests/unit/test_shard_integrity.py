"""Shards are verified, not trusted: hand-built raw img2dataset shards (tar + parquet +
_stats.json) with a corrupt header, unsafe member names and duplicate keys go through the filter
step, and a filtered shard changed in place (same size) goes through embed and the loader.
Each case ends in an error naming the shard, or a counted reject; never in a silent loss.

    .venv/bin/pytest tests/unit/test_shard_integrity.py -q
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.filters import FilterConfig, filter_shards, format_reject_table, sample_fates

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Dedup off unless a test is about it: the hand-made images are simple and alike.
NO_DEDUP = FilterConfig(min_side=16, dedup=False, near_dedup=False)


def png(seed: int, size: int = 32) -> bytes:
    """A distinct image per seed."""
    img = Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256))
    img.putpixel((seed % size, seed // size % size), (255 - seed % 256, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def members(key: str, seed: int) -> list[tuple[str, bytes]]:
    caption = f"sample number {seed} on a plain background"
    meta = json.dumps({"key": key, "url": f"http://example.invalid/{seed}.png", "caption": caption}).encode()
    return [(f"{key}.png", png(seed)), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)]


def write_tar(path: Path, entries: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_raw_shard(root: Path, shard: int, entries: list[tuple[str, bytes]], listed: list[str]) -> Path:
    """img2dataset's output for one shard: NNNNN.tar, NNNNN.parquet (``listed`` keys as
    successes) and the NNNNN_stats.json completion marker."""
    root.mkdir(parents=True, exist_ok=True)
    tar = root / f"{shard:05d}.tar"
    write_tar(tar, entries)
    rows = {"url": [f"http://example.invalid/{k}" for k in listed], "caption": ["c"] * len(listed),
            "key": listed, "status": ["success"] * len(listed), "error_message": [None] * len(listed)}
    pq.write_table(pa.table(rows, schema=pa.schema([(k, pa.string()) for k in rows])),
                   root / f"{shard:05d}.parquet")
    (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(listed)}))
    return tar


def output_members(folder: Path) -> dict[str, bytes]:
    out = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                assert m.name not in out, f"{m.name} twice in the output"
                out[m.name] = tar.extractfile(m).read()
    return out


def good_shard(root: Path, shard: int, n: int) -> tuple[Path, list[str]]:
    keys = [f"{shard:05d}{i:04d}" for i in range(n)]
    entries = [m for i, k in enumerate(keys) for m in members(k, shard * 100 + i)]
    return write_raw_shard(root, shard, entries, keys), keys


# --- a corrupt header in the middle of a raw shard ------------------------------------------

def _header_offsets(tar_path: Path) -> list[int]:
    with tarfile.open(tar_path) as tar:
        return [m.offset for m in tar.getmembers()]


def test_corrupt_header_mid_shard_is_an_error_naming_the_shard(tmp_path):
    raw = tmp_path / "raw"
    tar, keys = good_shard(raw, 0, 20)
    # Break the checksum of member 16's header (of 60): Python's tarfile takes it for the end
    # of the archive, silently, so without a check 45 members (15 samples) would vanish.
    offset = _header_offsets(tar)[15]
    data = bytearray(tar.read_bytes())
    data[offset + 148: offset + 156] = b"XXXXXXXX"
    tar.write_bytes(bytes(data))
    with tarfile.open(tar) as t:
        assert len(t.getmembers()) == 15  # what tarfile alone makes of it: a short, "valid" tar
    with pytest.raises(RuntimeError, match=rf"raw shard .*00000\.tar is damaged: a corrupt tar header at "
                                           rf"byte {offset} .*after 15 members.*re-run the download"):
        filter_shards(str(raw), str(tmp_path / "out"), NO_DEDUP)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_shard_cut_short_is_an_error(tmp_path):
    raw = tmp_path / "raw"
    tar, _ = good_shard(raw, 0, 6)
    offset = _header_offsets(tar)[9]
    tar.write_bytes(tar.read_bytes()[:offset])  # ends cleanly after a member, with no end blocks
    with pytest.raises(RuntimeError, match=r"00000\.tar is damaged: it is cut short"):
        filter_shards(str(raw), str(tmp_path / "out"), NO_DEDUP)


def test_sample_missing_from_the_tar_is_an_error_naming_the_keys(tmp_path):
    raw = tmp_path / "raw"
    keys = [f"00000{i:04d}" for i in range(5)]
    entries = [m for i, k in enumerate(keys) if i != 3 for m in members(k, i)]
    write_raw_shard(raw, 0, entries, keys)  # the parquet says all 5 were downloaded
    with pytest.raises(RuntimeError, match=r"00000\.tar is damaged: 1 sample\(s\) the download recorded as "
                                           r"successes are not in the tar \(keys \['000000003'\]\)"):
        filter_shards(str(raw), str(tmp_path / "out"), NO_DEDUP)


# --- member names that are not plain keys ---------------------------------------------------

UNSAFE = ["../../x.png", "/etc/passwd.txt", "sub/000000009.png", "..\\x.png", "a\nb.png", ".png", "noext",
          "./000000001.png"]


def test_unsafe_member_names_are_dropped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    keys = [f"00000{i:04d}" for i in range(4)]
    entries = [m for i, k in enumerate(keys) for m in members(k, i)]
    entries[3:3] = [(name, png(50 + i)) for i, name in enumerate(UNSAFE)]
    write_raw_shard(raw, 0, entries, keys)
    out = tmp_path / "out"
    manifest = filter_shards(str(raw), str(out), NO_DEDUP)
    assert manifest["kept"] == 4 and manifest["rejected"] == 0 and manifest["input_rows"] == 4
    assert manifest["dropped_members"] == {"unsafe_member_name": len(UNSAFE)}
    table = [line.split() for line in format_reject_table(manifest).splitlines()]
    assert ["dropped", "unsafe_member_name", str(len(UNSAFE)), "(tar", "members", "that", "are", "no", "URL-list",
            "row)"] in table
    names = set(output_members(out))
    assert names == {f"{k}.{e}" for k in keys for e in ("png", "txt", "json")}
    assert not any(bad in names for bad in UNSAFE)


def test_unsafe_key_listed_by_the_parquet_is_a_counted_row(tmp_path):
    raw = tmp_path / "raw"
    entries = members("000000000", 0) + members("../../evil", 1)
    write_raw_shard(raw, 0, entries, ["000000000", "../../evil"])
    manifest = filter_shards(str(raw), str(tmp_path / "out"), NO_DEDUP)
    assert manifest["kept"] == 1 and manifest["input_rows"] == 2
    assert manifest["rejects"]["filter"] == {"unsafe_member_name": 1}
    assert manifest["dropped_members"] == {"unsafe_member_name": 3}  # its png, txt and json
    fates = {r["key"]: r["reason"] for r in sample_fates(str(raw), str(tmp_path / "out")).to_pylist()}
    assert fates == {"000000000": None, "../../evil": "unsafe_member_name"}


def test_members_the_parquet_does_not_list_are_dropped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    entries = members("000000000", 0) + members("000000001", 1)
    write_raw_shard(raw, 0, entries, ["000000000"])  # 000000001 was smuggled into the tar
    out = tmp_path / "out"
    manifest = filter_shards(str(raw), str(out), NO_DEDUP)
    assert manifest["kept"] == 1 and manifest["dropped_members"] == {"not_in_download_parquet": 3}
    assert set(output_members(out)) == {"000000000.png", "000000000.txt", "000000000.json"}


# --- duplicate keys -------------------------------------------------------------------------

def test_duplicate_key_inside_one_tar_keeps_the_first(tmp_path):
    raw = tmp_path / "raw"
    keys = ["000000000", "000000001"]
    first, second = png(1), png(2)
    entries = members(keys[0], 0) + [("000000001.png", first), ("000000001.txt", b"the first caption"),
                                      ("000000001.png", second), ("000000001.txt", b"the second caption")]
    write_raw_shard(raw, 0, entries, keys)
    results = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        manifest = filter_shards(str(raw), str(out), NO_DEDUP)
        assert manifest["kept"] == 2 and manifest["dropped_members"] == {"duplicate_key": 2}
        results.append(output_members(out))
    assert results[0] == results[1]  # deterministic
    assert results[0]["000000001.png"] == first and results[0]["000000001.txt"] == b"the first caption"


def test_duplicate_key_across_shards_keeps_the_first_in_url_list_order(tmp_path):
    raw = tmp_path / "raw"
    # Shard 0 and shard 1 both hold key 000000007, with different images and captions.
    write_raw_shard(raw, 0, members("000000000", 0) + members("000000007", 7), ["000000000", "000000007"])
    write_raw_shard(raw, 1, members("000000007", 8) + members("000010000", 9), ["000000007", "000010000"])
    out = tmp_path / "out"
    manifest = filter_shards(str(raw), str(out), NO_DEDUP)
    assert manifest["input_rows"] == 4 and manifest["kept"] == 3
    assert manifest["rejects"]["filter"] == {"duplicate_key": 1}
    got = output_members(out)
    assert got["000000007.png"] == png(7)  # shard 0's copy: first in URL-list order, nothing lost
    fates = sample_fates(str(raw), str(out)).to_pylist()
    assert [(f["key"], f["reason"]) for f in fates] == [("000000000", None), ("000000007", None),
                                                       ("000000007", "duplicate_key"), ("000010000", None)]


def test_duplicate_key_whose_first_copy_is_rejected_keeps_the_good_copy(tmp_path):
    raw = tmp_path / "raw"
    tiny = [("000000007.png", png(7, size=8)), ("000000007.txt", b"a too small image")]
    write_raw_shard(raw, 0, tiny, ["000000007"])
    write_raw_shard(raw, 1, members("000000007", 8), ["000000007"])
    out = tmp_path / "out"
    manifest = filter_shards(str(raw), str(out), NO_DEDUP)
    assert manifest["kept"] == 1 and manifest["rejects"]["filter"] == {"image_too_small": 1}
    assert output_members(out)["000000007.png"] == png(8)


def test_duplicate_key_with_the_same_image_is_not_rejected_twice(tmp_path):
    raw = tmp_path / "raw"
    write_raw_shard(raw, 0, members("000000007", 7), ["000000007"])
    write_raw_shard(raw, 1, members("000000007", 7), ["000000007"])
    manifest = filter_shards(str(raw), str(tmp_path / "out"), FilterConfig(min_side=16))  # dedup on
    assert manifest["kept"] == 1 and manifest["rejects"]["filter"] == {"duplicate_key": 1}


def test_raw_shard_swapped_after_filtering_is_filtered_again(tmp_path):
    raw = tmp_path / "raw"
    tar, keys = good_shard(raw, 0, 4)
    out = tmp_path / "out"
    first = filter_shards(str(raw), str(out), NO_DEDUP)
    work = (out / "_filter" / "00000.parquet").stat().st_mtime_ns
    # Same size, same names, other order: pass 1's offsets now point at other members.
    entries = [m for i, k in reversed(list(enumerate(keys))) for m in members(k, i)]
    size = tar.stat().st_size
    write_tar(tar, entries)
    assert tar.stat().st_size == size
    for p in out.glob("0*.tar"):
        p.unlink()
    (out / "manifest.json").unlink()
    # Pass 1's result is keyed by the raw shard's sha256: the new bytes are filtered anew.
    again = filter_shards(str(raw), str(out), NO_DEDUP)
    assert (out / "_filter" / "00000.parquet").stat().st_mtime_ns != work
    assert again["kept"] == first["kept"] == 4
    assert output_members(out)["000000000.png"] == png(0)
    shutil.rmtree(out)
    # A shard that changes between pass 1 and pass 3 of one run: tests/unit/test_integrity_round3_filter.py


# --- embed and the loader: a filtered shard changed in place --------------------------------

@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> str:
    from pipeline.dev.tinymodels import build_tiny_t5

    return build_tiny_t5(str(tmp_path_factory.mktemp("t5") / "tiny-t5"))


def filtered_entries(shard: int, captions: list[str]) -> list[tuple[str, bytes]]:
    out = []
    for i, caption in enumerate(captions):
        key = f"{shard:05d}{i:04d}"
        out += [(f"{key}.png", png(shard * 10 + i, size=24)), (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps({"key": key}).encode())]
    return out


CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


def test_changed_shard_of_the_same_size_is_re_embedded(tmp_path, t5_dir):
    from pipeline.data.embed import embed_shards
    from pipeline.data.embeddings import read_embeddings

    data = tmp_path / "filtered"
    data.mkdir()
    for s in range(2):
        write_tar(data / f"{s:06d}.tar", filtered_entries(s, CAPTIONS))
    first = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16)
    before = read_embeddings(os.path.join(first["output"], "000001.parquet"))[0]
    size = (data / "000001.tar").stat().st_size
    # Other captions; the tar keeps its size (tars are padded to 10 KiB records).
    write_tar(data / "000001.tar", filtered_entries(1, ["a tan circle", "a pink shape", "an orange shape!"]))
    assert (data / "000001.tar").stat().st_size == size
    again = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16)
    assert (again["shards"], again["skipped"]) == (1, 1)  # shard 1 redone, shard 0 still matches
    after = read_embeddings(os.path.join(first["output"], "000001.parquet"))[0]
    assert before.keys() == after.keys()
    assert not any(before[k].shape == after[k].shape and (before[k] == after[k]).all() for k in before)
    third = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16)
    assert (third["shards"], third["skipped"]) == (0, 2)


def test_loader_skips_an_image_changed_after_embedding(tmp_path, t5_dir, caplog):
    import logging

    from pipeline.data.embed import embed_shards
    from pipeline.data.loader import TrainDataConfig, make_loader

    data = tmp_path / "filtered"
    data.mkdir()
    write_tar(data / "000000.tar", filtered_entries(0, CAPTIONS))
    emb = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16)["output"]
    # Flip one byte inside the image of key 000000001: same size, same names, other pixels.
    tar_path = data / "000000.tar"
    with tarfile.open(tar_path) as tar:
        info = tar.getmember("000000001.png")
    raw = bytearray(tar_path.read_bytes())
    raw[info.offset_data + info.size - 20] ^= 0xFF
    tar_path.write_bytes(bytes(raw))
    cfg = TrainDataConfig(data=str(data), embeddings=emb, image_size=16, batch_size=3, random_flip=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batch = next(iter(make_loader(cfg)))
    assert "000000001 changed since it was embedded" in caplog.text
    assert "000000001" not in batch["keys"] and len(batch["keys"]) == 3  # the slot is refilled


def test_loader_never_pairs_a_swapped_image_with_the_other_caption(tmp_path, t5_dir, caplog):
    """Keys 0 and 1 trade images (names, member order and file size kept): each image now sits
    under the other's caption, and only the recorded sha256 can tell. Both are skipped."""
    import logging

    import numpy as np
    import torch

    from pipeline.data.embed import embed_shards
    from pipeline.data.loader import TrainDataConfig, make_loader

    data = tmp_path / "filtered"
    data.mkdir()
    entries = filtered_entries(0, CAPTIONS)
    write_tar(data / "000000.tar", entries)
    emb = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16)["output"]
    size = (data / "000000.tar").stat().st_size
    entries[0], entries[3] = (entries[0][0], entries[3][1]), (entries[3][0], entries[0][1])
    write_tar(data / "000000.tar", entries)
    assert (data / "000000.tar").stat().st_size == size
    cfg = TrainDataConfig(data=str(data), embeddings=emb, image_size=24, batch_size=3, random_flip=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batch = next(iter(make_loader(cfg)))
    assert "000000000 changed since it was embedded" in caplog.text
    assert "000000001 changed since it was embedded" in caplog.text
    assert batch["keys"] == ["000000002"] * 3  # every slot refilled with the one intact sample
    own = np.asarray(Image.open(io.BytesIO(png(2, size=24))))  # 24 px at a 24 px stage: no resize
    assert batch["image"].dtype == torch.uint8
    np.testing.assert_array_equal(batch["image"][0].permute(1, 2, 0).numpy(), own)


def test_embed_refuses_a_filtered_shard_with_a_corrupt_header(tmp_path, t5_dir):
    from pipeline.data.embed import embed_shards

    data = tmp_path / "filtered"
    data.mkdir()
    write_tar(data / "000000.tar", filtered_entries(0, CAPTIONS))
    offset = _header_offsets(data / "000000.tar")[4]
    raw = bytearray((data / "000000.tar").read_bytes())
    raw[offset + 148: offset + 156] = b"XXXXXXXX"
    (data / "000000.tar").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"000000\.tar is damaged: a corrupt tar header at byte {offset}"):
        embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16)


def test_embed_gives_a_key_one_row_when_a_filtered_shard_repeats_it(tmp_path, t5_dir):
    from pipeline.data.embed import embed_shards
    from pipeline.data.embeddings import load_embeddings

    data = tmp_path / "filtered"
    data.mkdir()
    entries = filtered_entries(0, CAPTIONS)
    entries += [("000000001.png", png(99, size=24)), ("000000001.txt", b"a second caption")]
    write_tar(data / "000000.tar", entries)
    out = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16)
    shard = load_embeddings(os.path.join(out["output"], "000000.parquet"))
    assert shard.keys == ["000000000", "000000001", "000000002"]
    row = shard.keys.index("000000001")
    assert shard.image_sha256[row] == hashlib.sha256(png(1, size=24)).digest()  # the first copy
