"""Download + filter keep the best copy of a near-duplicate group: real img2dataset against a
loopback server, with the paper's stages (base64, sr256, sr1024: originals downloaded at up to
1024 px, ratio kept, never upscaled).

- a 256x192 JPEG thumbnail listed before the 1024x768 PNG original of the same picture: the
  original is kept, and serves the sr256 stage the thumbnail is too small for;
- one picture at one size served as JPEG, then as PNG: the lossless PNG is kept;
- the same copies whichever of them finishes downloading first.

    flock /tmp/imagen-cpu.lock .venv/bin/python -m pytest tests/integration/test_dedup_best_copy.py -q
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.data.copies import read_sources
from pipeline.data.download import download
from pipeline.data.filters import filter_shards, stage_config

DOWNLOAD = {"timeout": 5, "threads": 4, "retries": 0, "number_sample_per_shard": 10}
SLOW = 1.5  # seconds: a delayed copy finishes downloading after the others


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth photo-like picture (a gradient and a few shapes), the same at any size."""
    w, h = size
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(img)
    colors = [(220, 40, 40), (40, 160, 60), (40, 70, 220), (240, 200, 40)]
    for i in range(3):
        x0, y0 = ((seed * 0.13 + i * 0.2) % 0.5) * w, ((seed * 0.07 + i * 0.15) % 0.5) * h
        box = (x0, y0, x0 + (0.3 + i * 0.05) * w, y0 + (0.3 + seed % 3 * 0.05) * h)
        (draw.ellipse if (seed + i) % 2 else draw.rectangle)(box, fill=colors[(seed + i) % 4])
    return img


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# path -> (body, content type, caption); listed in this order.
ROUTES = {
    "/thumb.jpg": (encode(picture((1024, 768), 1).resize((256, 192), Image.Resampling.LANCZOS), "JPEG", quality=75),
                   "image/jpeg", "a small thumbnail of the shapes"),
    "/original.png": (encode(picture((1024, 768), 1), "PNG"), "image/png", "the shapes, full size"),
    "/tie.jpg": (encode(picture((512, 384), 2), "JPEG", quality=85), "image/jpeg", "other shapes as a jpeg"),
    "/tie.png": (encode(picture((512, 384), 2), "PNG"), "image/png", "other shapes as a png"),
    "/lone.png": (encode(picture((400, 300), 3), "PNG"), "image/png", "a third picture on its own"),
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body, ctype, _ = ROUTES.get(self.path, (b"not found", "text/plain", ""))
        time.sleep(self.server.delays.get(self.path, 0.0))
        self.send_response(200 if self.path in ROUTES else 404)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # img2dataset's threads connect at once


@pytest.fixture(scope="module")
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.daemon_threads, srv.delays = True, {}
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def run(server, root: Path, slow: str) -> dict:
    """Download (``slow`` delayed, so it finishes last) and filter; the fates by path."""
    port = server.server_address[1]
    server.delays = {slow: SLOW}
    root.mkdir(parents=True)
    rows = [{"url": f"http://127.0.0.1:{port}{path}", "caption": caption} for path, (_, _, caption) in ROUTES.items()]
    pq.write_table(pa.Table.from_pylist(rows), root / "urls.parquet")
    download(str(root / "urls.parquet"), str(root / "raw"), allow_hosts=(f"127.0.0.1:{port}",), **DOWNLOAD)
    manifest = filter_shards(str(root / "raw"), str(root / "out"), stage_config({}, val_fraction=0))
    raw_rows = pq.read_table(root / "raw" / "00000.parquet").to_pylist()
    path_of = {r["key"]: r["url"].split(str(port), 1)[1] for r in raw_rows}
    plan = pq.read_table(root / "out" / "_filter" / "plan.parquet").to_pylist()
    fates = {path_of[r["key"]]: (r["reason"], path_of.get(r["duplicate_of"])) for r in plan}
    with tarfile.open(root / "raw" / "00000.tar") as tar:
        written = [m.name for m in tar.getmembers() if m.name.endswith(".json")]
    return {"manifest": manifest, "fates": fates, "plan": {path_of[r["key"]]: r for r in plan},
            "sources": {path_of[k]: v for k, v in (read_sources(str(root / "raw" / "00000.tar")) or {}).items()},
            "tar_order": [path_of[n[: -len(".json")]] for n in written],
            "kept": sorted(json.loads(m)["url"].split(str(port), 1)[1] for m in _output_jsons(root / "out"))}


def _output_jsons(folder: Path) -> list[bytes]:
    out = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".json")]
    return out


@pytest.fixture(scope="module")
def original_last(server, tmp_path_factory):
    return run(server, tmp_path_factory.mktemp("dedup") / "original_last", slow="/original.png")


def test_the_original_is_kept_over_its_earlier_thumbnail(original_last):
    r = original_last
    assert r["tar_order"].index("/original.png") > r["tar_order"].index("/thumb.jpg")  # downloaded last
    assert r["fates"]["/thumb.jpg"] == ("near_duplicate_image", "/original.png")
    assert r["fates"]["/original.png"] == (None, None)
    original = r["plan"]["/original.png"]
    assert (original["native_side"], original["side"], original["source"]) == (768, 768, "png")
    assert (r["plan"]["/thumb.jpg"]["native_side"], r["plan"]["/thumb.jpg"]["source"]) == (192, "jpeg")
    # It serves sr256, which the 192 px thumbnail could not: kept for sr256 are the original
    # (768), the PNG of the tie (384) and the lone picture (300); none is 1024 px.
    stages = r["manifest"]["stages"]
    assert stages["sr256"]["samples"] == 3 and stages["sr1024"]["samples"] == 0
    assert stages["base64"]["samples"] == 3 and r["manifest"]["kept"] == 3


def test_a_lossless_copy_beats_a_lossy_one_of_the_same_size(original_last):
    r = original_last
    assert (r["sources"]["/tie.jpg"], r["sources"]["/tie.png"]) == ("jpeg", "png")
    assert r["fates"]["/tie.jpg"] == ("near_duplicate_image", "/tie.png")
    assert r["plan"]["/tie.jpg"]["native_side"] == r["plan"]["/tie.png"]["native_side"] == 384
    assert r["kept"] == ["/lone.png", "/original.png", "/tie.png"]
    assert r["manifest"]["dedup"] == {"keep": ["native_short_side", "lossless_source", "url_order"],
                                      "kept_a_later_copy": 2, "no_source_record": 0}


def test_same_copies_whichever_finishes_first(server, original_last, tmp_path_factory):
    other = run(server, tmp_path_factory.mktemp("dedup") / "thumb_last", slow="/thumb.jpg")
    assert other["tar_order"].index("/thumb.jpg") > other["tar_order"].index("/original.png")
    assert other["fates"] == original_last["fates"] and other["kept"] == original_last["kept"]
    assert other["sources"] == original_last["sources"]
