"""filter_shards end to end over the downloaded tiny dataset (conftest: tiny data -> img2dataset
-> filter): every good image kept once, counts that add up, reruns, parallel workers, scorers.

The tiny URLs name the loopback port of this session's server, and the validation split is a
hash of the URL: which samples are held out differs between sessions, so the expected shards
are computed with the split rule (pipeline.data.split) from the URL list."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import filter_registry, split
from pipeline.data.download import NothingDownloaded
from pipeline.data.filters import (
    FilterConfig,
    filter_shards,
    format_reject_table,
    sample_fates,
    stage_config,
)
from tests.tinychain import TINY_PRESETS


def read_tar(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _urls_by_kind(tiny_dataset) -> dict[str, set[str]]:
    by_kind: dict[str, set[str]] = {}
    for r in pq.read_table(tiny_dataset.urls).to_pylist():
        by_kind.setdefault(r["kind"], set()).add(r["url"])
    return by_kind


def held_out(urls, config: FilterConfig | None = None) -> set[str]:
    """Those of the kept ``urls`` the split rule holds out, at ``config``'s settings (default FilterConfig's)."""
    config, urls = config or FilterConfig(), sorted(urls)
    return {u for u, h in zip(urls, split.assign(urls, config.val_fraction, config.val_max), strict=True) if h}


def expected_shards(n_train: int, n_val: int, per_shard: int) -> dict[str, int]:
    """{shard name: samples} of ``n_train`` training and ``n_val`` validation samples."""
    out = {}
    for name, n in ((split.TRAIN, n_train), (split.VAL, n_val)):
        for i in range(0, n, per_shard):
            out[split.shard_name(name, i // per_shard)] = min(per_shard, n - i)
    return out


def tiny_shards(tiny_dataset, per_shard: int) -> dict[str, int]:
    """The shards the 120 good images of the tiny data fill, split by the default settings."""
    n_val = len(held_out(_urls_by_kind(tiny_dataset)["ok"]))
    return expected_shards(120 - n_val, n_val, per_shard)


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
        short = min(r["meta"]["source_width"], r["meta"]["source_height"])
        assert min(Image.open(io.BytesIO(r["png"])).size) == min(short, 128)  # never upscaled
    assert {r["meta"]["url"] for r in kept if split.split_of(r["shard"]) == split.VAL} == held_out(urls)
    # Each split's shards are filled in key (= URL-list) order.
    for name in split.SPLITS:
        keys = [r["key"] for r in kept if split.split_of(r["shard"]) == name]
        assert keys == sorted(keys)


def test_manifest_counts_add_up(tiny_dataset, filtered_shards):
    manifest = json.loads(Path(filtered_shards, "manifest.json").read_text())
    kinds = tiny_dataset.info["kinds"]
    assert manifest["input_rows"] == tiny_dataset.info["n_rows"]
    assert manifest["kept"] + manifest["rejected"] == manifest["input_rows"]
    assert manifest["kept"] == kinds["ok"]
    assert manifest["rejects"] == {
        "refused": {},
        "download": {"http_404": kinds["http_404"], "not_an_image": kinds["not_an_image"],
                     "image_decoding_error": kinds["truncated"]},
        "filter": {"caption_too_short": kinds["empty_caption"], "duplicate_image": kinds["duplicate"],
                   "image_too_small": kinds["too_small"], "aspect_ratio_too_large": kinds["bad_aspect"]},
    }
    assert manifest["shards"] == tiny_shards(tiny_dataset, 50)
    assert {n: len(read_tar(os.path.join(filtered_shards, n))) // 3 for n in manifest["shards"]} == manifest["shards"]
    assert manifest["config"] == {"min_caption_chars": 3, "max_caption_chars": 512, "languages": [], "min_language_confidence": 0.5,
                                  "min_side": 32,  # the tiny base stage's side
                                  "max_aspect": 2.0, "max_pixels": 64_000_000, "blank_tolerance": 2, "dedup": True, "near_dedup": True,
                                  "near_dup_distance": 6, "near_dup_color_tolerance": 32.0, "scorers": {},
                                  "stage_sides": {"base64": 32, "sr256": 64, "sr1024": 128},
                                  "val_fraction": 0.05, "val_max": 10_000}
    # Per stage and split: the kept samples it can use, and the smaller ones left out of it alone.
    kept = [r for r in pq.read_table(tiny_dataset.urls).to_pylist() if r["kind"] == "ok"]
    val = held_out(r["url"] for r in kept)
    assert manifest["split"] == {"val_fraction": 0.05, "val_max": 10_000, "by": "url", "train": 120 - len(val),
                                 "val": len(val), "keyed_without_url": 0}

    def small(side: int, held: bool) -> int:
        return sum(min(r["source_width"], r["source_height"]) < side for r in kept if (r["url"] in val) == held)

    assert small(128, False) > 0
    assert manifest["stages"] == {
        stage: {"min_side": side, "samples": 120 - len(val) - small(side, False),
                "excluded": {f"too_small_for_{stage}": small(side, False)},
                "val_samples": len(val) - small(side, True), "val_excluded": {f"too_small_for_{stage}": small(side, True)}}
        for stage, side in (("base64", 32), ("sr256", 64), ("sr1024", 128))}
    assert manifest["filters"] == ["caption_length", "min_side", "max_aspect", "max_pixels", "decode", "blank"]
    assert manifest["skipped_filters"] == {}
    assert sorted(os.listdir(filtered_shards)) == sorted([*tiny_shards(tiny_dataset, 50), "_filter", "manifest.json"])
    table = format_reject_table(manifest)
    lines = [line.split() for line in table.splitlines()]
    assert ["download", "http_404", "3"] in lines and ["filter", "caption_too_short", "2"] in lines
    assert ["kept", "120", "(91.6%)"] in lines and ["input", "rows", "131"] in lines
    assert ["sr1024", "too_small_for_sr1024", str(small(128, False)), "(kept,", "used", "by", "the", "other",
            "stages)"] in lines
    assert ["training", "split", str(120 - len(val))] in lines
    assert ["validation", "split", str(len(val))] in [line[:3] for line in lines]


def test_sample_fates_explain_every_row(tiny_dataset, raw_shards, filtered_shards):
    fates = sample_fates(raw_shards, filtered_shards).to_pylist()
    kinds = {r["url"]: r["kind"] for r in pq.read_table(tiny_dataset.urls).to_pylist()}
    expected = {"ok": ("kept", None), "http_404": ("download", "http_404"),
                "not_an_image": ("download", "not_an_image"), "truncated": ("download", "image_decoding_error"),
                "empty_caption": ("filter", "caption_too_short"), "duplicate": ("filter", "duplicate_image"),
                "too_small": ("filter", "image_too_small"), "bad_aspect": ("filter", "aspect_ratio_too_large")}
    assert len(fates) == len(kinds)
    assert {f["url"]: (f["stage"], f["reason"]) for f in fates} == {u: expected[k] for u, k in kinds.items()}
    shards = collections.Counter(f["shard"] for f in fates if f["stage"] == "kept")
    assert shards == tiny_shards(tiny_dataset, 50)


def test_rerun_is_a_no_op(raw_shards, filtered_shards):
    def snapshot():
        return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(filtered_shards).rglob("*") if p.is_file()}

    before = snapshot()
    manifest = filter_shards(raw_shards, filtered_shards, stage_config(TINY_PRESETS), samples_per_shard=50)
    assert snapshot() == before and manifest["kept"] == 120


def test_rewrite_gives_identical_shards(raw_shards, filtered_shards, tmp_path):
    out = str(tmp_path / "again")
    manifest = filter_shards(raw_shards, out, samples_per_shard=50)
    for name in manifest["shards"]:
        assert Path(out, name).read_bytes() == Path(filtered_shards, name).read_bytes()


def test_changed_config_rewrites_and_drops_stale_shards(tiny_dataset, raw_shards, filtered_shards, tmp_path):
    out = tmp_path / "filtered"
    shutil.copytree(filtered_shards, out)
    (out / "000009.tar").write_bytes(b"stale")
    (out / ".000003.tar.tmp-deadbeef").write_bytes(b"crashed")
    work = {p.name: p.stat().st_mtime_ns for p in (out / "_filter").glob("0*.parquet")}
    config = stage_config(TINY_PRESETS, dedup=False, near_dedup=False)
    manifest = filter_shards(raw_shards, str(out), config, samples_per_shard=1000)
    by_kind = _urls_by_kind(tiny_dataset)
    n_val = len(held_out(by_kind["ok"] | by_kind["duplicate"]))  # the duplicate is kept too now
    assert manifest["shards"] == expected_shards(121 - n_val, n_val, 1000) and manifest["kept"] == 121
    assert sorted(os.listdir(out)) == sorted([*manifest["shards"], "_filter", "manifest.json"])
    assert "duplicate_image" not in manifest["rejects"]["filter"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # Only dedup settings changed: the per-shard pass was reused, not redone.
    assert work == {p.name: p.stat().st_mtime_ns for p in (out / "_filter").glob("0*.parquet")}
    # A per-sample setting redoes the per-shard pass.
    manifest = filter_shards(raw_shards, str(out), FilterConfig(min_side=512), samples_per_shard=1000)
    # 125 downloaded: 2 empty captions are rejected first (cheapest), the rest are stored < 512.
    assert manifest["kept"] == 0 and manifest["rejects"]["filter"] == {"caption_too_short": 2, "image_too_small": 123}
    assert manifest["shards"] == {} and sorted(os.listdir(out)) == ["_filter", "manifest.json"]


def test_shards_are_evenly_sized(tiny_dataset, raw_shards, tmp_path):
    manifest = filter_shards(raw_shards, str(tmp_path / "out"), samples_per_shard=32)
    assert manifest["shards"] == tiny_shards(tiny_dataset, 32)


def test_parallel_workers_give_the_same_bytes(tiny_dataset, raw_shards, filtered_shards, tmp_path):
    out = tmp_path / "parallel"
    manifest = filter_shards(raw_shards, str(out), samples_per_shard=50, workers=2)
    assert manifest["shards"] == tiny_shards(tiny_dataset, 50)
    for name in manifest["shards"]:
        assert (out / name).read_bytes() == Path(filtered_shards, name).read_bytes()


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
    assert sorted(os.listdir(out)) == sorted([*manifest["shards"], "_filter", "manifest.json"])
    assert sorted(os.listdir(out / "_filter")) == ["00000.parquet", "00001.parquet", "plan.parquet"]


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

    shards = sorted(str(p) for p in Path(filtered_shards).glob("*.tar"))  # both splits
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "txt"))
    assert len(samples) == 120
    key, img, txt = samples[0]
    assert 64 <= min(img.size) <= 128 and len(txt) >= 3


def test_everything_refused_still_adds_up(tmp_path):
    from pipeline.data.download import download
    from pipeline.dev.tinydata import make_tiny_dataset

    info = make_tiny_dataset(str(tmp_path / "site"), n=5, port=9)  # nothing listens: nothing is fetched
    with pytest.raises(NothingDownloaded):  # the pipeline stops here; the filter can still account for it
        download(info["urls"], str(tmp_path / "raw"))
    manifest = filter_shards(str(tmp_path / "raw"), str(tmp_path / "out"))
    assert manifest["kept"] == 0 and manifest["shards"] == {}
    assert manifest["rejects"]["refused"] == {"loopback_address": info["n_rows"]}
    assert manifest["rejected"] == manifest["input_rows"] == info["n_rows"]
    lines = [line.split() for line in format_reject_table(manifest).splitlines()]
    assert ["refused", "loopback_address", str(info["n_rows"])] in lines


def _tiny_classifier(directory: str) -> None:
    """A random 2-label ViT ("safe", "nsfw") saved like a hub model: stands in for NSFW/watermark weights."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, id2label={0: "safe", 1: "nsfw"}, label2id={"safe": 0, "nsfw": 1})
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)


def test_image_classifier_scorer_filters_by_threshold(raw_shards, filtered_shards, tmp_path):
    pytest.importorskip("torch")
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    weights = str(tmp_path / "nsfw")
    _tiny_classifier(weights)
    kept = {r["key"]: Image.open(io.BytesIO(r["png"])).convert("RGB") for r in _kept(filtered_shards)}
    # The probabilities straight from the model, in one batch.
    processor = AutoImageProcessor.from_pretrained(weights)
    model = AutoModelForImageClassification.from_pretrained(weights).eval()
    with torch.inference_mode():
        logits = model(**processor(images=list(kept.values()), return_tensors="pt")).logits
    probs = dict(zip(kept, logits.softmax(-1)[:, 1].tolist(), strict=True))
    ordered = sorted(probs.values())
    threshold = (ordered[59] + ordered[60]) / 2  # between two scores: no ties with batched float noise
    config = FilterConfig(scorers={"image_classifier": {"weights": weights, "label": "nsfw", "max": threshold}})
    manifest = filter_shards(raw_shards, str(tmp_path / "out"), config, samples_per_shard=50)
    assert "score:image_classifier" in manifest["filters"]
    out = _kept(str(tmp_path / "out"))
    assert {r["key"] for r in out} == {k for k, p in probs.items() if p <= threshold}
    assert manifest["kept"] == 60
    for r in out:
        assert r["meta"]["scores"]["image_classifier"] == pytest.approx(probs[r["key"]], abs=1e-4)
    assert manifest["rejects"]["filter"]["image_classifier_score_too_high"] >= 60
    with pytest.raises(ValueError, match="label 'porn' is not one of"):
        filter_registry.build_scorers(FilterConfig(scorers={"image_classifier": {"weights": weights, "label": "porn"}}))


def test_blank_images_are_rejected_as_blank_not_grouped_as_duplicates(tmp_path):
    """Issue 28 item 10, through the CLI: fully transparent, flat white and flat black PNGs served
    next to real pictures are rejected as `blank` (in the reject table and the per-image file),
    not kept as one image with the others "near duplicates" of it."""
    import pyarrow as pa
    from PIL import ImageDraw

    from pipeline.dev.tinydata import serve

    site = tmp_path / "site"
    site.mkdir()
    blanks = {"transparent.png": Image.new("RGBA", (96, 96), (0, 0, 0, 0)),
              "white.png": Image.new("RGB", (96, 96), "white"), "black.png": Image.new("RGB", (96, 96), "black")}
    pictures = {}
    for i, (shape, color) in enumerate([("ellipse", "red"), ("rectangle", "blue"), ("ellipse", "green"),
                                        ("rectangle", "orange")]):
        img = Image.new("RGB", (96, 96), "white")
        getattr(ImageDraw.Draw(img), shape)((10 + 5 * i, 12, 80, 70 + 4 * i), fill=color)
        pictures[f"picture{i}.png"] = img
    for name, img in {**blanks, **pictures}.items():
        img.save(site / name)
    server = serve(str(site), 0)
    port = server.server_address[1]
    rows = [{"url": f"http://127.0.0.1:{port}/{name}", "caption": f"an image called {name}"}
            for name in [*pictures, *blanks]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    bin_ = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
    try:
        for argv in (["download", "--url-list", str(tmp_path / "urls.parquet"), "--output", str(tmp_path / "raw"),
                      "--allow-private-networks", "--preset", "tiny"],
                     ["filter", "--input", str(tmp_path / "raw"), "--output", str(tmp_path / "filtered"),
                      "--preset", "tiny", "--val-fraction", "0"]):
            proc = subprocess.run([bin_, *argv], capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        server.shutdown()
        server.server_close()
    manifest = json.loads(proc.stdout.strip().splitlines()[-1])
    assert manifest["kept"] == len(pictures) and manifest["rejects"]["filter"] == {"blank": len(blanks)}
    assert ["filter", "blank", str(len(blanks))] in [line.split() for line in proc.stdout.splitlines()]
    per_image = pq.read_table(tmp_path / "filtered" / "_filter" / "00000.parquet", columns=["url", "reason"])
    reasons = {r["url"].rsplit("/", 1)[1]: r["reason"] for r in per_image.to_pylist()}
    assert reasons == {**dict.fromkeys(pictures), **dict.fromkeys(blanks, "blank")}
