"""pipeline.data.facts: what the download computes from the pixels it stores equals what the filter's
decode gives, bit for bit, and the filter's output is byte-identical with and without facts.

Every body goes the download's way (the guard's header check and normalisation, then img2dataset's
own Resizer, wrapped by facts.watch); facts for hand-written raw shards are made from OpenCV's decode
of the stored PNG, which is the array such a PNG is encoded from.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import types
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import dedup, facts
from pipeline.data.fetch_guard import check_body
from pipeline.data.filter_registry import BlankFilter, DecodeFilter, Sample
from pipeline.data.filters import filter_shards
from pipeline.data.images import normalize_for_img2dataset
from tests.unit.test_body_sizing import BODIES
from tests.unit.test_dedup import CONFIG, dataset, write_shard
from tests.unit.test_images import web_images


def _resizers():
    from img2dataset.resizer import ResizeMode, Resizer

    return {  # the download's default (stored as is, 1024 px cap), a resize with upscaling, a border pad
        "default": Resizer(1024, ResizeMode.keep_ratio, True, encode_format="png", encode_quality=3),
        "center_crop_64": Resizer(64, ResizeMode.center_crop, False, encode_format="png", encode_quality=3),
        "border_80": Resizer(80, ResizeMode.border, False, encode_format="png", encode_quality=9),
    }


def _bodies() -> dict[str, bytes]:
    bodies = {name: body for name, body, _, _ in web_images()}
    bodies.update({f"format_{name}": body for name, (body, _) in BODIES.items()})
    return bodies


def _decoded_facts(stored: bytes) -> tuple:
    """What the filter learns by decoding: size, (sha256, pHash, thumbnail), extrema."""
    sample = Sample("k", "", stored)
    sig = dedup.image_signature(stored, sample.image)
    return (sample.width, sample.height), sig, sample.image.getextrema()


@pytest.mark.parametrize("mode", ["default", "center_crop_64", "border_80"])
def test_facts_from_the_encoded_array_equal_the_filters_decode(mode, tmp_path):
    downloader = types.SimpleNamespace(encode_format="png", resizer=_resizers()[mode], oom_shard_count=5,
                                       output_folder=str(tmp_path))
    facts.watch(downloader)
    facts.watch(downloader)  # idempotent: one wrapper, one cv2 stand-in
    assert isinstance(downloader.resizer, facts.FactsResizer)
    assert not isinstance(downloader.resizer.inner, facts.FactsResizer)
    stored = {}
    with facts.FACTS.shard(downloader, 7):
        for name, body in _bodies().items():
            try:
                normalized = normalize_for_img2dataset(body, check_body(body, None, 64_000_000))
            except Exception:  # noqa: BLE001 - refused by the guard: never stored
                continue
            out = downloader.resizer(io.BytesIO(normalized), None)
            if out[0] is not None:
                stored[name] = out[0]
    recorded = facts.read_facts(str(tmp_path / "00007.tar"))
    # 16-bit, CMYK, float, HDR and PFM bodies are among them: normalised by the guard, then stored.
    assert {"grey16_png", "rgb48_png", "cmyk_jpeg_icc", "float_tiff", "format_hdr", "format_pfm",
            "palette_png_half_alpha", "la16_png_half_grey"} <= stored.keys()
    missing = sorted(n for n, data in stored.items() if hashlib.sha256(data).digest() not in recorded)
    assert missing == [], missing  # every 8-bit grey or colour array stored as PNG has facts
    for name, data in stored.items():
        fact = recorded[hashlib.sha256(data).digest()]
        size, (sha, phash, thumb), extrema = _decoded_facts(data)
        assert ((fact.width, fact.height), fact.sha256, fact.phash, fact.thumb, fact.extrema) == \
            (size, sha, phash, thumb, extrema), name


def test_a_lossy_encode_or_a_failed_resize_records_nothing(tmp_path):
    from img2dataset.resizer import ResizeMode, Resizer

    jpg = types.SimpleNamespace(encode_format="jpg", resizer=Resizer(64, ResizeMode.keep_ratio, True),
                                oom_shard_count=5, output_folder=str(tmp_path))
    facts.watch(jpg)
    assert not isinstance(jpg.resizer, facts.FactsResizer)  # JPEG pixels are not the array's
    png = types.SimpleNamespace(encode_format="png", resizer=_resizers()["default"], oom_shard_count=5,
                                output_folder=str(tmp_path))
    facts.watch(png)
    with facts.FACTS.shard(png, 1):
        assert png.resizer(io.BytesIO(b"not an image"), None)[-1] is not None
    assert not (tmp_path / f"00001{facts.SIDECAR_SUFFIX}").exists()  # nothing recorded: no sidecar
    assert facts.read_facts(str(tmp_path / "00001.tar")) == {}


def test_arrays_that_are_no_8_bit_grey_or_rgb_get_no_facts():
    rgba = np.zeros((4, 4, 4), np.uint8)
    deep = np.zeros((4, 4, 3), np.uint16)
    assert facts.facts_of_pixels(rgba, b"x") is None
    assert facts.facts_of_pixels(deep, b"x") is None
    grey = facts.facts_of_pixels(np.full((4, 6), 9, np.uint8), b"x")
    assert (grey.width, grey.height, grey.extrema) == (6, 4, ((9, 9),) * 3)


def test_a_resizer_whose_result_is_not_the_array_it_encoded_records_nothing(tmp_path):
    class Swapping:  # returns other bytes than the ones it encoded (a future img2dataset might)
        def __call__(self, stream, bbox=None):
            import img2dataset.resizer as r

            r.cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
            return cv2.imencode(".png", np.ones((4, 4, 3), np.uint8))[1].tobytes(), 4, 4, 4, 4, None

    downloader = types.SimpleNamespace(encode_format="png", resizer=Swapping(), oom_shard_count=5,
                                       output_folder=str(tmp_path))
    facts.watch(downloader)
    with facts.FACTS.shard(downloader, 2):
        downloader.resizer(io.BytesIO(b""), None)
    assert facts.read_facts(str(tmp_path / "00002.tar")) == {}


# --- the filter ---------------------------------------------------------------------------------

def _stored_pngs(tar: Path) -> list[bytes]:
    import tarfile

    with tarfile.open(tar) as t:
        return [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".png")]


def _facts_for(tar: Path) -> list[facts.ImageFacts]:
    """The facts the download would have recorded: OpenCV's decode of a stored PNG is the array
    it was encoded from."""
    return [facts.facts_of_pixels(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), png)
            for png in _stored_pngs(tar)]


def _raw(root: Path, with_facts: bool = True) -> Path:
    import random

    rng = random.Random(3)
    for shard, rows in enumerate(dataset()):
        write_shard(root, shard, rows, rng)
        if with_facts:
            facts.write_facts(str(root / f"{shard:05d}.tar"), _facts_for(root / f"{shard:05d}.tar"))
    return root


def _outputs(out: Path) -> dict:
    """Everything the filter wrote, as comparable values (the manifest without its paths)."""
    result = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    result.update({f"_filter/{p.name}": (pq.read_table(p), pq.read_schema(p).metadata)
                   for p in (out / "_filter").glob("*.parquet")})
    manifest = json.loads((out / "manifest.json").read_text())
    result["manifest"] = {k: v for k, v in manifest.items() if k not in ("input", "output")}
    return result


def _count_decodes(monkeypatch) -> list[str]:
    seen: list[str] = []
    plain = Sample.image.func

    def counted(self):
        seen.append(self.key)
        return plain(self)

    cached = functools.cached_property(counted)
    cached.__set_name__(Sample, "image")
    monkeypatch.setattr(Sample, "image", cached)
    return seen


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if k.startswith("_filter/"):
            if not (a[k][0].equals(b[k][0]) and a[k][1] == b[k][1]):
                return False
        elif a[k] != b[k]:
            return False
    return True


def test_filter_output_is_byte_identical_with_and_without_facts(tmp_path, monkeypatch):
    raw = _raw(tmp_path / "raw")
    bare = tmp_path / "bare"
    shutil.copytree(raw, bare)
    for p in bare.glob(f"*{facts.SIDECAR_SUFFIX}"):
        p.unlink()
    decodes = _count_decodes(monkeypatch)
    filter_shards(str(raw), str(tmp_path / "with"), CONFIG, samples_per_shard=3)
    assert decodes == []  # every image had facts: not one decode
    filter_shards(str(bare), str(tmp_path / "without"), CONFIG, samples_per_shard=3)
    assert len(decodes) == sum(len(rows) for rows in dataset())
    with_facts, without = _outputs(tmp_path / "with"), _outputs(tmp_path / "without")
    assert _same(with_facts, without)
    assert with_facts["manifest"]["rejects"]["filter"]  # dedup did reject copies: the facts took part


def _rewrite_facts(tar: Path, change) -> None:
    facts.write_facts(str(tar), [change(f) for f in facts.read_facts(str(tar)).values()])


@pytest.mark.parametrize("lie", ["other_sha256", "other_size"])
def test_facts_that_do_not_match_the_members_bytes_or_size_are_not_used(tmp_path, monkeypatch, lie):
    import dataclasses

    raw = _raw(tmp_path / "raw")
    # Blank extremes on every fact: a fact that were used would reject its sample as "blank".
    if lie == "other_sha256":
        change = lambda f: dataclasses.replace(f, sha256=hashlib.sha256(f.sha256).digest(), extrema=((0, 0),) * 3)  # noqa: E731
    else:
        change = lambda f: dataclasses.replace(f, width=f.width + 1, extrema=((0, 0),) * 3)  # noqa: E731
    for tar in raw.glob("*.tar"):
        _rewrite_facts(tar, change)
    decodes = _count_decodes(monkeypatch)
    manifest = filter_shards(str(raw), str(tmp_path / "out"), CONFIG, samples_per_shard=3)
    assert "blank" not in manifest["rejects"]["filter"]
    assert len(decodes) == sum(len(rows) for rows in dataset())  # all decoded, as without facts
    assert _same(_outputs(tmp_path / "out"), _outputs(_filtered_without_facts(tmp_path)))


def _filtered_without_facts(tmp_path: Path) -> Path:
    out = tmp_path / "reference"
    filter_shards(str(_raw(tmp_path / "reference_raw", with_facts=False)), str(out), CONFIG, samples_per_shard=3)
    return out


def test_a_matching_fact_is_trusted_as_it_stands(tmp_path):
    """The other side of the test above: facts whose sha256 and size match are what the filter
    uses (here forged to say "blank"), so the two tests together show which branch ran."""
    import dataclasses

    raw = _raw(tmp_path / "raw")
    for tar in raw.glob("*.tar"):
        _rewrite_facts(tar, lambda f: dataclasses.replace(f, extrema=((5, 5),) * 3))
    manifest = filter_shards(str(raw), str(tmp_path / "out"), CONFIG, samples_per_shard=3)
    assert manifest["kept"] == 0 and manifest["rejects"]["filter"]["blank"] == sum(len(r) for r in dataset())


def test_a_tampered_member_is_decoded_and_the_rest_keep_their_facts(tmp_path, monkeypatch):
    """A raw shard rewritten after its download (one image replaced, same size): its stale fact
    matches no bytes, so that image is decoded and the output is what a filter without facts makes."""
    import tarfile

    raw = _raw(tmp_path / "raw")
    reference_raw = _raw(tmp_path / "reference_raw", with_facts=False)
    for root in (raw, reference_raw):
        tar = root / "00000.tar"
        with tarfile.open(tar) as t:
            members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
        victim = next(m.name for m, _ in members if m.name.endswith(".png"))
        with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
            for m, data in members:
                if m.name == victim:
                    img = Image.open(io.BytesIO(data)).convert("RGB")
                    img.paste((10, 200, 90), (0, 0, img.width // 2, img.height))
                    buf = io.BytesIO()
                    img.save(buf, "PNG")
                    data = buf.getvalue()
                    m.size = len(data)
                t.addfile(m, io.BytesIO(data))
    decodes = _count_decodes(monkeypatch)
    filter_shards(str(raw), str(tmp_path / "out"), CONFIG, samples_per_shard=3)
    assert decodes == [victim.split(".")[0]]  # only the rewritten image
    filter_shards(str(reference_raw), str(tmp_path / "reference"), CONFIG, samples_per_shard=3)
    assert _same(_outputs(tmp_path / "out"), _outputs(tmp_path / "reference"))


def test_an_unreadable_sidecar_warns_and_falls_back(tmp_path):
    raw = _raw(tmp_path / "raw")
    (raw / f"00000{facts.SIDECAR_SUFFIX}").write_bytes(b"PAR1 not parquet")
    wrong_schema = raw / f"00001{facts.SIDECAR_SUFFIX}"
    table = pa.ipc.open_file(wrong_schema.read_bytes()).read_all().drop_columns(["thumb"])
    with pa.ipc.new_file(str(wrong_schema), table.schema) as writer:
        writer.write_table(table)
    with pytest.warns(UserWarning, match="cannot be read"):
        assert facts.read_facts(str(raw / "00000.tar")) == {}
    with pytest.warns(UserWarning, match="cannot be read"):
        assert facts.read_facts(str(raw / "00001.tar")) == {}
    with pytest.warns(UserWarning):
        filter_shards(str(raw), str(tmp_path / "out"), CONFIG, samples_per_shard=3)
    assert _same(_outputs(tmp_path / "out"), _outputs(_filtered_without_facts(tmp_path)))


def test_decode_and_blank_filters_take_the_facts():
    fact = facts.ImageFacts(b"", 4, 4, 0, bytes(192), ((3, 3), (3, 3), (3, 3)))
    sample = Sample("k", "caption", b"not even an image", "png", facts=fact)
    assert DecodeFilter().check(sample) is None  # the bytes were encoded from pixels
    assert BlankFilter(0).check(sample) == "blank"
    assert BlankFilter(0).check(Sample("k", "c", b"x", "png", facts=facts.ImageFacts(
        b"", 4, 4, 0, bytes(192), ((3, 3), (0, 9), (3, 3))))) is None
    assert DecodeFilter().check(Sample("k", "c", b"", "png", facts=fact)) == "missing_image"


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7), (5, 1, 3), (33, 17, 3), (64, 48), (300, 200, 3)])
def test_facts_of_random_arrays_equal_the_decode_of_their_png(shape):
    rng = np.random.default_rng(sum(shape))
    for pixels in (rng.integers(0, 256, shape, np.uint8), np.full(shape, 77, np.uint8),
                   rng.integers(100, 104, shape, np.uint8)):
        png = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])[1].tobytes()
        fact = facts.facts_of_pixels(pixels, png)
        size, (sha, phash, thumb), extrema = _decoded_facts(png)
        assert ((fact.width, fact.height), fact.sha256, fact.phash, fact.thumb, fact.extrema) == \
            (size, sha, phash, thumb, extrema)
    assert facts.facts_of_pixels(np.zeros((0, 4, 3), np.uint8), b"") is None
