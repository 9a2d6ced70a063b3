"""Tests for pipeline.dev.tinydata: a deterministic dataset and a loopback-only file server."""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.dev.tinydata import BACKGROUNDS, COLORS, SHAPES, make_tiny_dataset, serve


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_same_bytes(tmp_path):
    a = make_tiny_dataset(str(tmp_path / "a"), n=20, seed=3, port=9000)
    b = make_tiny_dataset(str(tmp_path / "b"), n=20, seed=3, port=9000)
    assert _files(str(tmp_path / "a")) == _files(str(tmp_path / "b"))
    assert {k: v for k, v in a.items() if k not in ("urls", "images")} == \
        {k: v for k, v in b.items() if k not in ("urls", "images")}


def test_other_seed_other_data(tmp_path):
    make_tiny_dataset(str(tmp_path / "a"), n=20, seed=0, port=9000)
    make_tiny_dataset(str(tmp_path / "b"), n=20, seed=1, port=9000)
    a, b = _files(str(tmp_path / "a")), _files(str(tmp_path / "b"))
    assert a["urls.parquet"] != b["urls.parquet"]
    assert a["images/img_00000.png"] != b["images/img_00000.png"]


def test_url_list_rows_and_kinds(tmp_path):
    info = make_tiny_dataset(str(tmp_path), n=30, seed=0, port=8123)
    table = pq.read_table(info["urls"]).to_pylist()
    assert info["n_good"] == 30 and info["n_broken"] == 6 and info["n_filtered"] == 5
    assert info["n_rows"] == len(table) == 41
    assert info["kinds"] == {"ok": 30, "http_404": 3, "not_an_image": 2, "truncated": 1,
                             "empty_caption": 2, "duplicate": 1, "too_small": 1, "bad_aspect": 1}
    for r in table:  # the recorded size is the served image's
        name = r["url"].rsplit("/", 1)[1]
        if r["kind"] not in ("http_404", "not_an_image", "truncated"):
            assert Image.open(os.path.join(info["images"], name)).size == (r["source_width"], r["source_height"])
    assert all(r["url"].startswith("http://127.0.0.1:8123/images/") for r in table)
    assert len({r["url"] for r in table}) == len(table)
    names = set(os.listdir(info["images"]))
    for r in table:
        name = r["url"].rsplit("/", 1)[1]
        assert (name in names) == (r["kind"] != "http_404")
        if r["kind"] == "ok":
            # The caption names what is drawn.
            assert r["color"] in r["caption"] and r["shape"] in r["caption"]
            assert r["background"] in r["caption"]
        if r["kind"] == "empty_caption":
            assert r["caption"].strip() == ""
    attrs = json.loads((tmp_path / "attributes.json").read_text())
    assert len(attrs["colors"]) >= 6 and attrs["shapes"] == list(SHAPES)
    assert attrs["colors"]["red"] == list(COLORS["red"])


def test_good_png_images_show_their_colours(tmp_path):
    info = make_tiny_dataset(str(tmp_path), n=24, seed=0, port=8123)
    rows = [r for r in pq.read_table(info["urls"]).to_pylist()
            if r["kind"] == "ok" and r["mode"] == "RGB" and r["url"].endswith(".png")]
    assert len(rows) >= 12
    for r in rows:
        img = Image.open(os.path.join(info["images"], r["url"].rsplit("/", 1)[1]))
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=img.width * img.height)}
        assert tuple(COLORS[r["color"]]) in colours
        assert tuple(BACKGROUNDS[r["background"]]) in colours
        # the shape lies inside the central square, which the base stage's centre crop keeps
        w, h = img.size
        s = min(w, h)
        centre = img.convert("RGB").crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
        assert tuple(COLORS[r["color"]]) in {c for _, c in centre.getcolors(maxcolors=s * s)}


def test_images_come_in_many_sizes_aspects_and_modes(tmp_path):
    """Like the web: short sides from 64 px to twice the largest tiny stage, several aspect ratios
    (within the filter's 2:1), and palette / RGBA / 16-bit / CMYK encodings of the same colours."""
    from imagen.config import preset

    info = make_tiny_dataset(str(tmp_path), n=240, seed=0, port=8123)
    rows = [r for r in pq.read_table(info["urls"]).to_pylist() if r["kind"] == "ok"]
    largest = preset("tiny", "sr1024").image_size
    shorts = [min(r["source_width"], r["source_height"]) for r in rows]
    assert min(shorts) == 64 and max(shorts) >= 2 * largest
    assert 0.15 < sum(s < largest for s in shorts) / len(shorts) < 0.6  # some too small for the 128 px stage
    aspects = {round(max(r["source_width"], r["source_height"]) / min(r["source_width"], r["source_height"]), 1) for r in rows}
    assert len(aspects) >= 3 and max(aspects) <= 2.0
    assert set(info["modes"]) == {"RGB", "P", "RGBA", "RGB16", "CMYK"}
    opened = {r["mode"]: Image.open(os.path.join(info["images"], r["url"].rsplit("/", 1)[1])).mode for r in rows}
    assert opened["P"] == "P" and opened["RGBA"] == "RGBA" and opened["CMYK"] == "CMYK"
    sixteen = next(r for r in rows if r["mode"] == "RGB16")
    with open(os.path.join(info["images"], sixteen["url"].rsplit("/", 1)[1]), "rb") as f:
        header = f.read(26)
    assert header[12:16] == b"IHDR" and header[24] == 16 and header[25] == 2  # 16 bits per channel, RGB


def test_broken_files_are_broken(tmp_path):
    info = make_tiny_dataset(str(tmp_path), n=4, seed=0, port=8123)
    with open(os.path.join(info["images"], "page_000.jpg"), "rb") as f:
        assert f.read().startswith(b"<html>")
    with pytest.raises(OSError):
        Image.open(os.path.join(info["images"], "truncated_000.jpg")).load()
    assert Image.open(os.path.join(info["images"], "small_000.png")).size == (24, 24)
    assert Image.open(os.path.join(info["images"], "wide_000.png")).size == (256, 64)
    with open(os.path.join(info["images"], "img_00000.png"), "rb") as a, \
            open(os.path.join(info["images"], "dup_000.png"), "rb") as b:
        assert a.read() == b.read()


def test_server_serves_files_and_404s(tmp_path):
    info = make_tiny_dataset(str(tmp_path), n=4, seed=0, port=0)
    server = serve(str(tmp_path), 0)
    try:
        base = server.url
        with urllib.request.urlopen(f"{base}/images/img_00000.png", timeout=5) as r:
            body = r.read()
        with open(os.path.join(info["images"], "img_00000.png"), "rb") as f:
            assert body == f.read()
        assert Image.open(io.BytesIO(body)).size == Image.open(os.path.join(info["images"], "img_00000.png")).size
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/images/missing_000.jpg", timeout=5)
        assert err.value.code == 404
        assert server.request_log == ["GET /images/img_00000.png 200", "GET /images/missing_000.jpg 404"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("host", ["0.0.0.0", "8.8.8.8", "::"])
def test_server_refuses_non_loopback_hosts(tmp_path, host):
    with pytest.raises(ValueError, match="loopback"):
        serve(str(tmp_path), 0, host=host)


def test_good_images_are_not_near_duplicates(tmp_path):
    """The filter step's near-duplicate check (at the 64 px the base stage stores) keeps every good image."""
    from pipeline.data.dedup import find_duplicates, image_signature

    info = make_tiny_dataset(str(tmp_path), n=240, seed=0, port=8123)  # the CLI's default size
    rows = [r for r in pq.read_table(info["urls"]).to_pylist() if r["kind"] == "ok"]
    sigs = []
    for r in rows:
        img = Image.open(os.path.join(info["images"], r["url"].rsplit("/", 1)[1])).convert("RGB")
        img.thumbnail((128, 128), Image.Resampling.BOX)  # as downloaded for the tiny cascade
        buf = io.BytesIO()
        img.save(buf, "PNG")
        sigs.append((r["url"], *image_signature(buf.getvalue(), img)))
    assert len(sigs) == 240 and list(find_duplicates(sigs)) == []
