"""Dedup keeps the best copy of a near-duplicate group (pipeline.data.copies, pipeline.data.reshard):
largest native short side, then a lossless source, then URL-list order; the same copies
whatever order the downloads finished in.

Raw shards are built by hand here (tar, img2dataset's parquet with original_width/height,
_stats.json and the NNNNN_source.jsonl sidecar) and filtered in-process.

    .venv/bin/python -m pytest tests/unit/test_dedup.py -q
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import threading
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.data import copies
from pipeline.data.dedup import find_duplicates, image_signature
from pipeline.data.filters import MANIFEST_FORMAT, FilterConfig, filter_shards

CONFIG = FilterConfig(min_side=16, val_fraction=0, stage_sides={"s64": 64})


def scene(size: tuple[int, int], color=(220, 40, 40), shift=0) -> Image.Image:
    """One picture at any size: a gradient and an ellipse, placed relative to the size."""
    w, h = size
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    ImageDraw.Draw(img).ellipse(((0.15 + shift) * w, 0.2 * h, (0.6 + shift) * w, 0.7 * h), fill=color)
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# --- the source format, sniffed from the body ---------------------------------------------

@pytest.mark.parametrize(("fmt", "kw", "expected"), [
    ("PNG", {}, "png"), ("JPEG", {"quality": 80}, "jpeg"), ("GIF", {}, "gif"), ("BMP", {}, "bmp"),
    ("TIFF", {}, "tiff"), ("PPM", {}, "pnm"), ("WEBP", {"quality": 80}, "webp"),
    ("WEBP", {"lossless": True}, "webp_lossless"),
])
def test_sniff_format_of_real_encodings(fmt, kw, expected):
    assert copies.sniff_format(encode(scene((40, 30)), fmt, **kw)) == expected


def test_sniff_format_webp_behind_vp8x_and_in_animations():
    rgba = scene((40, 30)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 30)))  # lossy with alpha: VP8X, ALPH, then VP8
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"  # lossless with EXIF: VP8X, then VP8L
    lossy, lossless = encode(rgba, "WEBP", quality=80), encode(rgba, "WEBP", lossless=True, exif=exif)
    assert lossy[12:16] == b"VP8X" and lossless[12:16] == b"VP8X"
    assert (copies.sniff_format(lossy), copies.sniff_format(lossless)) == ("webp", "webp_lossless")
    frames = [scene((40, 30)), scene((40, 30), shift=0.2)]
    anim = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert b"ANMF" in anim and copies.sniff_format(anim) == "webp_lossless"


def test_sniff_format_of_markup_and_other_magics():
    assert copies.sniff_format(b"<html>") == "unknown" and copies.sniff_format(b"") == "unknown"
    assert copies.sniff_format(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n") == "hdr"
    assert copies.sniff_format(b"PF\n4 4\n-1.0\n") == "pfm"
    assert copies.sniff_format(b"\x00\x00\x00\x1cftypavif\x00\x00") == "avif"
    # HEIC: the fetch guard refuses it (unsupported_format), so no shard holds one
    assert copies.sniff_format(b"\x00\x00\x00\x18ftypheic\x00\x00") == "unknown"
    # one owner of the magic bytes: every format the header reader sizes has a source name
    assert copies.sniff_format(b"qoif" + (64).to_bytes(4, "big") * 2 + b"\x03\x00") == "qoi"
    assert [copies.is_lossless(s) for s in ("png", "webp_lossless", "jpeg", "webp", "gif", None)] == \
        [True, True, False, False, False, False]


# --- the ranking ----------------------------------------------------------------------------

def test_best_first_ranks_side_then_lossless_then_position():
    side = [192, 768, 768, 768, 96, 768]
    lossless = [True, False, True, False, True, True]
    # 768 lossless (rows 2, 5: by position), 768 lossy (1, 3), then 192, then 96.
    assert copies.best_first(side, lossless).tolist() == [2, 5, 1, 3, 0, 4]


def test_best_first_is_a_total_order_on_the_facts():
    """Rows permuted in, same facts out in the same order (ties by position, which the caller
    makes the URL-list order)."""
    rng = np.random.default_rng(0)
    side, lossless = rng.integers(1, 5, 200), rng.random(200) < 0.5
    order = copies.best_first(side, lossless)
    ranked = list(zip(-side[order], ~lossless[order], order, strict=True))
    assert ranked == sorted(ranked)


def _groups(samples: list[tuple], order: list[int]) -> dict[str, str]:
    """{duplicate key: kept key} of find_duplicates walked in ``order``."""
    return {k: kept for k, _, kept in find_duplicates(samples[i] for i in order)}


def test_walking_best_first_keeps_the_original_not_the_thumbnail():
    thumb = encode(scene((64, 48)), "JPEG", quality=70)  # listed first: the thumbnail
    original = encode(scene((192, 144)), "PNG")
    other = encode(scene((192, 144), color=(40, 70, 220), shift=0.3), "PNG")
    samples = [(k, *image_signature(b, Image.open(io.BytesIO(b)))) for k, b in
               (("0000", thumb), ("0001", original), ("0002", other))]
    side, lossless = np.array([48, 144, 144]), np.array([False, True, True])
    assert _groups(samples, [0, 1, 2]) == {"0001": "0000"}  # URL order: the thumbnail wins
    assert _groups(samples, copies.best_first(side, lossless).tolist()) == {"0000": "0001"}


# --- raw shards as img2dataset writes them, filtered ----------------------------------------

def _stored(img: Image.Image, source: str) -> bytes:
    """The body as served in ``source`` format, stored as img2dataset stores it (PNG)."""
    served = encode(img, "JPEG", quality=60) if source == "jpeg" else encode(img, "PNG")
    return encode(Image.open(io.BytesIO(served)).convert("RGB"), "PNG")


def write_shard(root: Path, shard: int, rows: list[dict], rng: random.Random | None = None,
                sidecar: bool = True) -> None:
    """NNNNN.tar, .parquet, _stats.json and _source.jsonl for ``rows`` ({img, native, source,
    caption}); ``rng`` shuffles tar members, parquet rows and sidecar lines, as download
    threads finishing in another order would."""
    root.mkdir(parents=True, exist_ok=True)
    recs, entries = [], []
    for i, row in enumerate(rows):
        key = f"{shard:05d}{i:04d}"
        url = f"http://example.invalid/{key}.{row['source']}"
        w, h = row["img"].size
        meta = {"url": url, "caption": row["caption"], "key": key, "status": "success", "error_message": None,
                "width": w, "height": h, "original_width": row["native"][0], "original_height": row["native"][1]}
        recs.append((meta, row["source"]))
        entries.append([(f"{key}.png", _stored(row["img"], row["source"])), (f"{key}.txt", row["caption"].encode()),
                        (f"{key}.json", json.dumps(meta).encode())])
    if rng is not None:
        rng.shuffle(entries)
        rng.shuffle(recs)
    with tarfile.open(root / f"{shard:05d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (m for group in entries for m in group):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    types_ = {"width": pa.int32(), "height": pa.int32(), "original_width": pa.int32(), "original_height": pa.int32()}
    schema = pa.schema([(k, types_.get(k, pa.string())) for k in recs[0][0]])
    pq.write_table(pa.Table.from_pylist([m for m, _ in recs], schema=schema), root / f"{shard:05d}.parquet")
    (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(rows)}))
    if sidecar:
        lines = [json.dumps({"key": m["key"], "source": s}) + "\n" for m, s in recs]
        (root / f"{shard:05d}{copies.SIDECAR_SUFFIX}").write_text("".join(lines))


def _row(img, native, source, caption):
    return {"img": img, "native": native, "source": source, "caption": caption}


def dataset() -> list[list[dict]]:
    """Two raw shards. Group A: a 256x192 JPEG thumbnail (shard 0, first) and its 1024x768 PNG
    original (shard 1). Group B: the same 96x96 picture as JPEG then as PNG (a lossless-lossy
    tie on size). Group C: two identical PNG copies (a full tie: URL order). One lone image."""
    a, b = scene((128, 96)), scene((96, 96), color=(40, 160, 60), shift=0.3)
    c, lone = scene((80, 80), color=(240, 200, 40), shift=0.1), scene((80, 80), color=(150, 50, 170), shift=0.35)
    return [
        [_row(a.resize((64, 48)), (256, 192), "jpeg", "a thumbnail of a red ball"),
         _row(b, (96, 96), "jpeg", "a green ball as a jpeg"),
         _row(c, (80, 80), "png", "a yellow ball, first copy")],
        [_row(a, (1024, 768), "png", "the red ball, original"),
         _row(b, (96, 96), "png", "a green ball as a png"),
         _row(c, (80, 80), "png", "a yellow ball, second copy"),
         _row(lone, (80, 80), "png", "a purple ball alone")],
    ]


def _filter(tmp_path: Path, name: str, seed: int | None, shards=None, **kw) -> tuple[dict, dict, dict]:
    raw = tmp_path / name / "raw"
    rng = None if seed is None else random.Random(seed)
    for shard, rows in enumerate(shards or dataset()):
        write_shard(raw, shard, rows, rng, **kw)
    out = tmp_path / name / "out"
    manifest = filter_shards(str(raw), str(out), CONFIG, samples_per_shard=3)
    plan = pq.read_table(out / "_filter" / "plan.parquet").to_pylist()
    fates = {r["key"]: (r["reason"], r["duplicate_of"]) for r in plan}
    outputs = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            outputs[tar_path.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return manifest, fates, outputs


def test_each_group_keeps_its_best_copy(tmp_path):
    manifest, fates, outputs = _filter(tmp_path, "ordered", None)
    assert fates == {
        "000000000": ("near_duplicate_image", "000010000"),  # the thumbnail gives way to the original
        "000000001": ("near_duplicate_image", "000010001"),  # JPEG source gives way to PNG, same size
        "000000002": (None, None),                           # full tie: the first in URL order stays
        "000010000": (None, None), "000010001": (None, None),
        "000010002": ("duplicate_image", "000000002"),
        "000010003": (None, None)}
    kept_captions = {v.decode() for shard in outputs.values() for k, v in shard.items() if k.endswith(".txt")}
    assert kept_captions == {"the red ball, original", "a green ball as a png", "a yellow ball, first copy",
                             "a purple ball alone"}
    assert manifest["format"] == MANIFEST_FORMAT
    assert manifest["dedup"] == {"keep": ["native_short_side", "lossless_source", "url_order"],
                                 "kept_a_later_copy": 2, "no_source_record": 0}
    # The original (stored 128x96) serves the 64 px stage the thumbnail (stored 64x48) could not.
    assert manifest["stages"]["s64"]["samples"] == 4 and manifest["stages"]["s64"]["excluded"] == \
        {"too_small_for_s64": 0}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_copies_whatever_order_downloads_finished_in(tmp_path, seed):
    _, fates, outputs = _filter(tmp_path, "ordered", None)
    _, shuffled_fates, shuffled_outputs = _filter(tmp_path, f"shuffled{seed}", seed)
    assert shuffled_fates == fates and shuffled_outputs == outputs


def test_plan_ignores_the_order_of_its_inputs(tmp_path):
    """Pass 2 alone: pass-1 rows and the list of raw shards given in another order."""
    from pipeline.data import reshard

    _filter(tmp_path, "ordered", None)
    raw, work = tmp_path / "ordered" / "raw", tmp_path / "ordered" / "out" / "_filter"
    pairs = [(f"{i:05d}.tar", str(work / f"{i:05d}.parquet")) for i in range(2)]
    first = reshard.plan(pairs, CONFIG, 3, input=str(raw))[0]
    for i in range(2):
        table = pq.read_table(work / f"{i:05d}.parquet")
        pq.write_table(table.take(list(reversed(range(table.num_rows)))), work / f"{i:05d}.parquet")
    again = reshard.plan(list(reversed(pairs)), CONFIG, 3, input=str(raw))[0]
    assert again.equals(first) and again.schema.metadata == first.schema.metadata


def test_shards_without_a_source_record_rank_by_size_and_url_order(tmp_path):
    manifest, fates, _ = _filter(tmp_path, "nosidecar", None, sidecar=False)
    assert fates["000000000"] == ("near_duplicate_image", "000010000")  # size still decides
    assert fates["000000001"] == (None, None)  # JPEG vs PNG unknown: URL order
    assert fates["000010001"] == ("near_duplicate_image", "000000001")
    assert manifest["dedup"]["no_source_record"] == 7


def test_a_sixth_format_manifest_is_redone_not_returned(tmp_path):
    manifest, _, _ = _filter(tmp_path, "ordered", None)
    path = tmp_path / "ordered" / "out" / "manifest.json"
    old = dict(manifest, format="imagen-pipeline/filtered-shards/v6")
    path.write_text(json.dumps(old))
    again = filter_shards(str(tmp_path / "ordered" / "raw"), str(tmp_path / "ordered" / "out"), CONFIG,
                          samples_per_shard=3)
    assert again["format"] == MANIFEST_FORMAT and json.loads(path.read_text())["format"] == MANIFEST_FORMAT


# --- the sidecar, as the download writes it ------------------------------------------------

def test_source_log_writes_the_shards_keys_and_formats(tmp_path):
    from img2dataset.downloader import compute_key

    log = copies.SourceLog()
    downloader = types.SimpleNamespace(output_folder=str(tmp_path), number_sample_per_shard=100,
                                       oom_shard_count=5)
    bodies = {i: encode(scene((20, 20)), fmt) for i, fmt in enumerate(["PNG", "JPEG", "GIF", "WEBP"] * 10)}
    with log.shard(downloader, 7):
        threads = [threading.Thread(target=log.record, args=(k, copies.sniff_format(v))) for k, v in bodies.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    sources = copies.read_sources(str(tmp_path / "00007.tar"))
    expected = {compute_key(k, 7, 2, 5): copies.sniff_format(v) for k, v in bodies.items()}
    assert sources == expected and sources["0000701"] == "jpeg" and len(sources) == 40
    with log.shard(downloader, 8):  # the next shard starts empty
        log.record(3, copies.sniff_format(bodies[0]))
    assert copies.read_sources(str(tmp_path / "00008.tar")) == {"0000803": "png"}
    with log.shard(downloader, 9):  # every fetch of the shard failed
        pass
    assert copies.read_sources(str(tmp_path / "00009.tar")) == {}
    assert copies.read_sources(str(tmp_path / "00010.tar")) is None  # no record at all


def test_native_sides_read_from_the_parquet(tmp_path):
    write_shard(tmp_path, 0, dataset()[1])
    assert copies.read_native_sides(str(tmp_path / "00000.tar")) == \
        {"000000000": 768, "000000001": 96, "000000002": 80, "000000003": 80}
    pq.write_table(pa.table({"key": ["x"], "status": ["success"]}), tmp_path / "00001.parquet")
    assert copies.read_native_sides(str(tmp_path / "00001.tar")) == {}
