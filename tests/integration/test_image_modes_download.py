"""End to end: images of every mode, served on 127.0.0.1, go through the real download
(pipeline.data.download -> fetch guard -> img2dataset) and are stored as 8-bit images of the colours a
browser shows. Before pipeline.data.images, a 16-bit grey PNG was stored 16-bit (white once read),
16-bit alpha came out garbage, float TIFFs black, 32-bit ones failed and EXIF-rotated photos were
stored sideways.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.download import download
from pipeline.data.facts import read_facts
from pipeline.data.images import open_rgb
from pipeline.dev.tinydata import serve
from tests.unit.test_images import close, exif_jpeg, px, web_images

EXTS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "tiff": "tif"}


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict[str, dict]:
    """case name -> {"image": stored bytes, "row": its parquet row, "served": served bytes}."""
    site = tmp_path_factory.mktemp("modes-site")
    cases = [(name, data) for name, data, _, _ in web_images()] + [("exif_rotated_jpeg", exif_jpeg(6))]
    served = {}
    for name, data in cases:
        file = f"{name}.{next(ext for kind, ext in EXTS.items() if f'_{kind}' in name)}"
        (site / file).write_bytes(data)
        served[name] = (file, data)
    server = serve(str(site), 0)
    try:
        urls = site / "urls.parquet"
        pq.write_table(pa.table({"url": [f"{server.url}/{f}" for f, _ in served.values()],
                                 "caption": [f"a {n} image" for n in served],
                                 "case": list(served)}), urls)
        out = tmp_path_factory.mktemp("modes-raw")
        # Resized on purpose (64 px center crops, upscaling allowed): every image goes through
        # img2dataset's resize and re-encode, where 16-bit and float data went wrong.
        summary = download(str(urls), str(out), allow_private_networks=True, save_additional_columns=["case"],
                           image_size=64, resize_mode="center_crop", resize_only_if_bigger=False)
    finally:
        server.shutdown()
        server.server_close()
    assert summary["successes"] == len(cases), summary
    rows = {r["key"]: r for name in os.listdir(out) if name[:5].isdigit() and name.endswith(".parquet")
            for r in pq.read_table(out / name).to_pylist()}
    result = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            recorded = read_facts(str(out / name))
            with tarfile.open(out / name) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    if ext == "png":
                        row, image = rows[key], tar.extractfile(member).read()
                        result[row["case"]] = {"image": image, "row": row, "served": served[row["case"]][1],
                                               "facts": recorded.get(hashlib.sha256(image).digest())}
    return result


@pytest.mark.parametrize("name, want, tol", [(n, w, t) for n, _, w, t in web_images()],
                         ids=[c[0] for c in web_images()])
def test_every_mode_is_stored_as_the_colour_a_browser_shows(stored, name, want, tol):
    sample = stored[name]
    img = Image.open(io.BytesIO(sample["image"]))
    assert img.mode in ("RGB", "L") and img.size == (64, 64), (name, img.mode)  # 8-bit, center-cropped
    assert sample["image"][24] == 8, name  # IHDR bit depth: PIL shows a 48-bit PNG as "RGB" too
    assert close(px(open_rgb(sample["image"])), want, tol), (name, px(open_rgb(sample["image"])), want)
    assert close(px(img.convert("RGB")), want, tol)  # even a plain PIL reader sees it right now


def test_only_what_img2dataset_mishandles_was_reencoded(stored):
    # img2dataset hashes the body it was handed: the served file's hash means no re-encode.
    untouched = {n for n, s in stored.items() if s["row"]["sha256"] == hashlib.sha256(s["served"]).hexdigest()}
    assert untouched == {"rgb_jpeg", "grey_png", "la8_png_half_black", "rgba8_png_half_red", "rgba_webp_half_red",
                         "palette_png", "palette_png_half_alpha", "palette_gif_transparent", "one_bit_png"}


def test_exif_rotated_photo_is_stored_upright(stored):
    sample = stored["exif_rotated_jpeg"]
    assert (sample["row"]["original_width"], sample["row"]["original_height"]) == (64, 96)
    img = open_rgb(sample["image"])  # left half red as stored; shown rotated 90 clockwise: red on top
    assert close(px(img, (32, 8)), (255, 0, 0), 6) and close(px(img, (32, 56)), (0, 0, 255), 6)
    assert json.loads(sample["row"]["exif"] or "{}").get("Image Orientation") is None


def test_every_stored_mode_has_the_facts_the_filters_decode_gives(stored):
    """The download records each stored image's size, pHash, thumbnail and extremes from the
    pixels it encoded (pipeline/data/facts.py): for every mode, the guard's re-encodes and the
    resize included, they are what the filter would get by decoding the stored PNG."""
    from pipeline.data.dedup import image_signature
    from pipeline.data.filter_registry import Sample

    for name, s in stored.items():
        fact = s["facts"]
        assert fact is not None, name
        image = Sample(name, "", s["image"]).image
        assert (fact.width, fact.height) == image.size, name
        assert (fact.sha256, fact.phash, fact.thumb) == image_signature(s["image"], image), name
        assert fact.extrema == image.getextrema(), name
