"""Tests for pipeline.filters: each filter on crafted samples, then filter_shards end to end."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.filters import (
    FILTERS,
    CaptionLengthFilter,
    DecodeFilter,
    DedupFilter,
    FilterConfig,
    MaxAspectFilter,
    MaxPixelsFilter,
    MinSideFilter,
    Sample,
    apply_filters,
    build_filters,
    filter_shards,
    format_reject_table,
    normalize_error,
)


def png(w: int = 64, h: int = 64, color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def sample(caption="a red circle on white", data=None, meta=None, key="000000001") -> Sample:
    return Sample(key=key, caption=caption, image_bytes=png() if data is None else data, ext="png",
                  meta=meta or {})


def read_tar(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


# --- each filter ---------------------------------------------------------------------------

@pytest.mark.parametrize("caption, reason", [
    ("", "caption_too_short"), ("   ", "caption_too_short"), ("ab", "caption_too_short"),
    ("abc", None), (" a red circle ", None), ("x" * 512, None), ("x" * 513, "caption_too_long"),
])
def test_caption_length(caption, reason):
    assert CaptionLengthFilter(3, 512).check(sample(caption)) == reason


@pytest.mark.parametrize("w, h, original, reason", [
    (64, 64, None, None), (63, 100, None, "image_too_small"), (100, 63, None, "image_too_small"),
    (64, 64, (40, 40), "image_too_small"),  # img2dataset upscaled a 40 px source: blurry
    (64, 64, (96, 96), None),
])
def test_min_side(w, h, original, reason):
    meta = {"original_width": original[0], "original_height": original[1]} if original else {}
    assert MinSideFilter(64).check(sample(data=png(w, h), meta=meta)) == reason


@pytest.mark.parametrize("w, h, original, reason", [
    (128, 64, None, None), (64, 128, None, None), (129, 64, None, "aspect_ratio_too_large"),
    (64, 64, (256, 64), "aspect_ratio_too_large"),  # center crop kept a quarter of the source
    (64, 64, (150, 100), None),
])
def test_max_aspect(w, h, original, reason):
    meta = {"original_width": original[0], "original_height": original[1]} if original else {}
    assert MaxAspectFilter(2.0).check(sample(data=png(w, h), meta=meta)) == reason


def test_max_pixels_reads_only_the_header():
    assert MaxPixelsFilter(64 * 64).check(sample(data=png(64, 64))) is None
    assert MaxPixelsFilter(64 * 64 - 1).check(sample(data=png(64, 64))) == "image_too_large"
    s = sample(data=png(64, 64))
    MaxPixelsFilter(10).check(s)
    assert "image" not in s.__dict__  # no full decode happened


def test_decode():
    good = png()
    assert DecodeFilter().check(sample(data=good)) is None
    assert DecodeFilter().check(sample(data=good[: len(good) // 2])) == "image_decode_error"
    assert DecodeFilter().check(sample(data=b"<html>not an image</html>")) == "image_decode_error"
    assert DecodeFilter().check(Sample(key="k", caption="a b c", image_bytes=None)) == "missing_image"


def test_size_filters_leave_undecodable_bytes_to_decode():
    garbage = sample(data=b"<html>not an image</html>")
    assert [f.check(garbage) for f in (MinSideFilter(64), MaxAspectFilter(2), MaxPixelsFilter(10))] == [None] * 3


def test_dedup_keeps_the_first():
    dedup = DedupFilter()
    assert dedup.check(sample(data=png(color=(1, 2, 3)))) is None
    assert dedup.check(sample(data=png(color=(1, 2, 4)))) is None
    assert dedup.check(sample(data=png(color=(1, 2, 3)), key="000000009")) == "duplicate_image"


def test_registry_order_and_config():
    assert list(FILTERS) == ["caption_length", "min_side", "max_aspect", "max_pixels", "decode", "dedup"]
    assert [f.name for f in build_filters()] == list(FILTERS)
    assert [f.name for f in build_filters(FilterConfig(dedup=False))] == list(FILTERS)[:-1]
    # Cheap checks first: an empty caption is reported before the (costly) decode failure.
    assert apply_filters(build_filters(), sample("", data=b"garbage")) == "caption_too_short"
    assert apply_filters(build_filters(), sample(data=b"garbage")) == "image_decode_error"
    assert apply_filters(build_filters(FilterConfig(min_side=128)), sample()) == "image_too_small"


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: File not found", "http_404"),
    ("HTTP Error 503: Service Unavailable", "http_503"),
    ("Image decoding error", "image_decoding_error"),
    ("<urlopen error timed out>", "timeout"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("<urlopen error [Errno 104] Connection reset by peer>", "connection_reset_by_peer"),
    ("Use of image disallowed by X-Robots-Tag directive", "disallowed_by_x_robots_tag"),
    (None, "unknown"),
])
def test_normalize_error(message, reason):
    assert normalize_error(message) == reason


# --- filter_shards over the downloaded tiny dataset ---------------------------------------

def _urls_by_kind(tiny_dataset) -> dict[str, set[str]]:
    by_kind: dict[str, set[str]] = {}
    for r in pq.read_table(tiny_dataset.urls).to_pylist():
        by_kind.setdefault(r["kind"], set()).add(r["url"])
    return by_kind


def _kept(filtered: str) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(filtered)):
        if name.endswith(".tar"):
            members = read_tar(os.path.join(filtered, name))
            keys = sorted({n.split(".")[0] for n in members})
            assert set(members) == {f"{k}.{e}" for k in keys for e in ("png", "txt", "json")}
            rows += [{"shard": name, "key": k, "meta": json.loads(members[f"{k}.json"]),
                      "caption": members[f"{k}.txt"].decode(), "png": members[f"{k}.png"]} for k in keys]
    return rows


def test_every_good_image_exactly_once(tiny_dataset, filtered_shards):
    kept = _kept(filtered_shards)
    urls = [r["meta"]["url"] for r in kept]
    assert sorted(urls) == sorted(_urls_by_kind(tiny_dataset)["ok"])
    assert len({hashlib.sha256(r["png"]).digest() for r in kept}) == len(kept) == tiny_dataset.info["n_good"]
    for r in kept:
        assert r["meta"]["kind"] == "ok" and r["caption"] == r["meta"]["caption"].strip()
        assert Image.open(io.BytesIO(r["png"])).size == (64, 64)
    # Shards are filled in key (= URL-list) order.
    assert [r["key"] for r in kept] == sorted(r["key"] for r in kept)


def test_manifest_counts_add_up(tiny_dataset, filtered_shards):
    manifest = json.loads(Path(filtered_shards, "manifest.json").read_text())
    kinds = tiny_dataset.info["kinds"]
    assert manifest["input_rows"] == tiny_dataset.info["n_rows"]
    assert manifest["kept"] + manifest["rejected"] == manifest["input_rows"]
    assert manifest["kept"] == kinds["ok"]
    assert manifest["rejects"] == {
        "refused": {},
        "download": {"http_404": kinds["http_404"], "image_decoding_error": kinds["not_an_image"] + kinds["truncated"]},
        "filter": {"caption_too_short": kinds["empty_caption"], "duplicate_image": kinds["duplicate"],
                   "image_too_small": kinds["too_small"], "aspect_ratio_too_large": kinds["bad_aspect"]},
    }
    assert manifest["shards"] == {"000000.tar": 50, "000001.tar": 50, "000002.tar": 20}
    assert {n: len(read_tar(os.path.join(filtered_shards, n))) // 3 for n in manifest["shards"]} == manifest["shards"]
    assert manifest["config"] == {"min_caption_chars": 3, "max_caption_chars": 512, "min_side": 64,
                                  "max_aspect": 2.0, "max_pixels": 64_000_000, "dedup": True}
    assert sorted(os.listdir(filtered_shards)) == ["000000.tar", "000001.tar", "000002.tar", "manifest.json"]
    table = format_reject_table(manifest)
    assert "http_404" in table and "caption_too_short" in table and "120" in table


def test_rerun_is_a_no_op(raw_shards, filtered_shards):
    def snapshot():
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(filtered_shards).iterdir()}

    before = snapshot()
    manifest = filter_shards(raw_shards, filtered_shards, samples_per_shard=50)
    assert snapshot() == before and manifest["kept"] == 120


def test_rewrite_gives_identical_shards(raw_shards, filtered_shards, tmp_path):
    out = str(tmp_path / "again")
    manifest = filter_shards(raw_shards, out, samples_per_shard=50)
    for name in manifest["shards"]:
        assert Path(out, name).read_bytes() == Path(filtered_shards, name).read_bytes()


def test_changed_config_rewrites_and_drops_stale_shards(raw_shards, filtered_shards, tmp_path):
    out = tmp_path / "filtered"
    shutil.copytree(filtered_shards, out)
    (out / "000009.tar").write_bytes(b"stale")
    (out / ".000003.tar.tmp-deadbeef").write_bytes(b"crashed")
    manifest = filter_shards(raw_shards, str(out), FilterConfig(dedup=False), samples_per_shard=1000)
    assert sorted(os.listdir(out)) == ["000000.tar", "manifest.json"]
    assert manifest["shards"] == {"000000.tar": 121} and manifest["kept"] == 121
    assert "duplicate_image" not in manifest["rejects"]["filter"]
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_changed_input_is_detected(raw_shards, filtered_shards, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_shards, raw)
    out = tmp_path / "filtered"
    shutil.copytree(filtered_shards, out)
    assert filter_shards(str(raw), str(out), samples_per_shard=50)["kept"] == 120  # same names and sizes
    shard_rows = pq.read_table(raw / "00002.parquet").num_rows
    for name in ("00002.tar", "00002.parquet", "00002_stats.json"):
        (raw / name).unlink()
    manifest = filter_shards(str(raw), str(out), samples_per_shard=50)
    assert manifest["input_rows"] == 131 - shard_rows
    assert manifest["kept"] + manifest["rejected"] == manifest["input_rows"]
    assert sum(manifest["shards"].values()) == manifest["kept"] < 120
    assert sorted(os.listdir(out)) == sorted([*manifest["shards"], "manifest.json"])


def test_unfinished_download_is_an_error(raw_shards, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_shards, raw)
    (raw / "00001_stats.json").unlink()
    with pytest.raises(RuntimeError, match=r"00001\.tar.*re-run the download"):
        filter_shards(str(raw), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="download step"):
        filter_shards(str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_readable_with_webdataset(filtered_shards):
    import webdataset as wds

    shards = [os.path.join(filtered_shards, f"{i:06d}.tar") for i in range(3)]
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "txt"))
    assert len(samples) == 120
    key, img, txt = samples[0]
    assert img.size == (64, 64) and len(txt) >= 3


def test_everything_refused_still_adds_up(tmp_path):
    from pipeline.download import download
    from pipeline.tinydata import make_tiny_dataset

    info = make_tiny_dataset(str(tmp_path / "site"), n=5, port=9)  # nothing listens: nothing is fetched
    download(info["urls"], str(tmp_path / "raw"))
    manifest = filter_shards(str(tmp_path / "raw"), str(tmp_path / "out"))
    assert manifest["kept"] == 0 and manifest["shards"] == {}
    assert manifest["rejects"]["refused"] == {"private_address": info["n_rows"]}
    assert manifest["rejected"] == manifest["input_rows"] == info["n_rows"]
    lines = [line.split() for line in format_reject_table(manifest).splitlines()]
    assert ["refused", "private_address", str(info["n_rows"])] in lines
