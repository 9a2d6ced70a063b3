"""End to end (issue 27 item 4): formats only OpenCV decodes go through the real download
(pipeline.data.download -> fetch guard -> img2dataset) from a loopback server. An 81 Mpx Radiance
HDR bomb is refused by its declared size before any decode; an honest HDR sunset and a PFM are
stored visibly right (before: black, pixel max 1); TIFF and BMP are stored; formats the guard
cannot size are refused with their reason. OpenCV's own pixel cap, the second wall, is checked
in a child process with the environment the download gives its workers.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.download import _child_env, download
from pipeline.dev.tinydata import serve
from pipeline.netguard import FetchPolicy
from tests.unit.test_body_sizing import sunset


def _cv(ext: str, array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(ext, array)
    assert ok
    return data.tobytes()


def _pil(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _cases() -> dict[str, tuple[str, bytes]]:
    """case -> (file name, body)."""
    pfm = np.zeros((90, 120, 3), np.float32)
    pfm[:45] = (0.1, 0.3, 1.5)  # top half a bright blue, bottom half dim green
    pfm[45:] = (0.02, 0.2, 0.02)
    picture = Image.radial_gradient("L").resize((120, 90)).convert("RGB")
    return {
        "hdr_bomb": ("bomb.hdr", b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 9000 +X 9000\n"
                     + np.random.default_rng(0).bytes(200_000)),  # a few KB declaring 81 Mpx
        "hdr_sunset": ("sunset.hdr", _cv(".hdr", sunset()[..., ::-1].copy())),
        "pfm_sky": ("sky.pfm", _cv(".pfm", pfm[..., ::-1].copy())),
        "tiff": ("scan.tif", _pil(picture, "TIFF")), "bmp": ("bitmap.bmp", _pil(picture, "BMP")),
        "jpeg_xl": ("photo.jxl", b"\xff\x0a\xfa\x7f" + bytes(500)),
        "garbage": ("noise.jpg", np.random.default_rng(1).bytes(3000)),
    }


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, dict]:
    """(summary, {case: {"row": parquet row, "image": stored bytes or None}})."""
    site = tmp_path_factory.mktemp("hdr-site")
    cases = _cases()
    for file, body in cases.values():
        (site / file).write_bytes(body)
    server = serve(str(site), 0)
    try:
        urls = site / "urls.parquet"
        pq.write_table(pa.table({"url": [f"{server.url}/{f}" for f, _ in cases.values()],
                                 "caption": [f"a {c} image" for c in cases], "case": list(cases)}), urls)
        out = tmp_path_factory.mktemp("hdr-raw")
        summary = download(str(urls), str(out), allow_private_networks=True, save_additional_columns=["case"])
    finally:
        server.shutdown()
        server.server_close()
    rows = {r["key"]: r for name in os.listdir(out) if name[:5].isdigit() and name.endswith(".parquet")
            for r in pq.read_table(out / name).to_pylist()}
    stored = {r["case"]: {"row": r, "image": None} for r in rows.values()}
    for name in os.listdir(out):
        if name.endswith(".tar"):
            with tarfile.open(out / name) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    if ext == "png":
                        stored[rows[key]["case"]]["image"] = tar.extractfile(member).read()
    return summary, stored


def test_reasons_for_what_is_refused(result):
    summary, stored = result
    assert summary["successes"] == 4, summary
    assert summary["errors"] == {"decompression_bomb": 1, "unsized_format": 1, "unsupported_format": 1}, summary
    assert stored["hdr_bomb"]["row"]["error_message"].startswith("decompression_bomb: declared 9000x9000 pixels")
    assert stored["jpeg_xl"]["row"]["error_message"].startswith("unsized_format: JPEG XL")


def test_the_hdr_sunset_is_stored_orange_and_bright(result):
    _, stored = result
    sample = stored["hdr_sunset"]
    img = Image.open(io.BytesIO(sample["image"]))
    a = np.asarray(img.convert("RGB")).astype(int)
    assert img.size == (160, 120) and a.max() > 200, a.max()  # was black: pixel max 1
    r, g, b = a.reshape(-1, 3).mean(0)
    assert r > 120 and r > g + 25 > b + 50, (r, g, b)


def test_the_pfm_is_stored_the_right_way_up_in_its_colours(result):
    _, stored = result
    a = np.asarray(Image.open(io.BytesIO(stored["pfm_sky"]["image"])).convert("RGB")).astype(int)
    top, bottom = a[:40].reshape(-1, 3).mean(0), a[50:].reshape(-1, 3).mean(0)
    assert top[2] > 200 and top[2] > top[1] > top[0], top  # blue sky on top
    assert bottom[1] > bottom[0] + 20 and bottom[1] > bottom[2] + 20 and bottom.max() < top.max(), bottom


@pytest.mark.parametrize("case", ["tiff", "bmp"])
def test_tiff_and_bmp_are_stored(result, case):
    _, stored = result
    img = Image.open(io.BytesIO(stored[case]["image"]))
    want = Image.radial_gradient("L").resize((120, 90))
    assert img.size == (120, 90)
    assert np.abs(np.asarray(img.convert("L")).astype(int) - np.asarray(want).astype(int)).max() <= 2


def test_opencvs_own_cap_reaches_the_workers_and_holds():
    # The second wall: with the environment download gives its child process, OpenCV itself
    # refuses an image over the policy's pixels (here a 100 px cap against a 20 x 20 PNG).
    env = {**_child_env(FetchPolicy(max_pixels=100)), "PYTHONPATH": os.getcwd()}
    code = ("import cv2, numpy as np\n"
            "ok, png = cv2.imencode('.png', np.zeros((20, 20), np.uint8))\n"
            "small = cv2.imdecode(np.frombuffer(cv2.imencode('.png', np.zeros((10, 10), np.uint8))[1], np.uint8), 0)\n"
            "try:\n    out = cv2.imdecode(png, 0)\nexcept cv2.error:\n    out = None\n"
            "print(small is not None, out is None)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "True"], (done.stdout, done.stderr[-500:])
