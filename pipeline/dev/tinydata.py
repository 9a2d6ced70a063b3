"""A tiny, deterministic text-to-image dataset and a loopback HTTP server to download it from.

Each good image is a coloured shape (circle, square, triangle) on a plain background,
with a caption that describes it ("a red circle on a white background"). Like images on the
web, they come in many sizes (short side 64 to 256 px, so some are too small for the tiny
128 px stage and still serve the smaller ones), aspect ratios up to 2:1 (the shape sits in
the central square, which the base stage's centre crop keeps) and encodings: 8-bit RGB PNG and
JPEG, and a few palette, RGBA, 16-bit RGB PNGs and CMYK JPEGs, which must all decode to
the same colours. The URL list also carries the ground truth (`color`, `shape`, `background`,
`source_width`, `source_height`, `mode`) and a `kind` column saying what the pipeline should do with the row,
plus a few rows that must fail or be filtered:

    kind            rows  expected outcome
    ok              n     downloaded, kept by the filters
    http_404        3     download fails (HTTP Error 404)
    not_an_image    2     download fails (HTML served as .jpg: "Image decoding error")
    truncated       1     download fails (JPEG cut in half: "Image decoding error")
    empty_caption   2     downloaded, filter rejects "caption_too_short"
    duplicate       1     downloaded, filter rejects "duplicate_image" (same bytes as an ok row)
    too_small       1     downloaded, filter rejects "image_too_small" (source 24x24)
    bad_aspect      1     downloaded, filter rejects "aspect_ratio_too_large" (4:1)

This is the fixture for every data test, like img2dataset's own local HTTP test server.

    python -m pipeline.dev.tinydata make /tmp/tiny --n 240 --port 8799
    python -m pipeline.dev.tinydata serve /tmp/tiny --port 8799      # blocks; Ctrl-C stops
"""

from __future__ import annotations

import argparse
import collections
import functools
import io
import ipaddress
import json
import os
import random
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "orange": (245, 130, 20),
    "purple": (130, 50, 170),
    "pink": (240, 120, 180),
    "cyan": (30, 200, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (200, 200, 200),
    "black": (0, 0, 0),
}
# Download settings for this dataset's own loopback server: the per-host request rate (a
# courtesy to other people's hosts, 5/s by default) would only stretch a 131-row download from
# ~12 s to ~25 s here. The connection cap and robots.txt stay on; tests/integration/
# test_polite_download.py holds the rate cap itself.
OWN_SERVER_POLITENESS = {"per_host_rate": 0.0}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a {color} {shape} centered on a plain {background} background",
    "a simple drawing of a {color} {shape}, {background} background",
    "{color} {shape} on {background}",
)
# Rows that must fail at download time: (kind, count).
BROKEN_KINDS = (("http_404", 3), ("not_an_image", 2), ("truncated", 1))
# Rows that download fine and must be rejected by the filter step.
FILTERED_KINDS = (("empty_caption", 2), ("duplicate", 1), ("too_small", 1), ("bad_aspect", 1))


def draw_shape(size: tuple[int, int], color: str, shape: str, background: str, box: tuple) -> Image.Image:
    """Render one shape inside ``box`` (x0, y0, x1, y1) on a plain background."""
    img = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    fill = COLORS[color]
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, "JPEG", quality=90)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


# Short sides and aspect ratios of the good images (the shape is drawn on a virtual CANVAS
# square and scaled into the image's central square). Sides below 128 serve the tiny 32 and
# 64 px stages but not the 128 px one; the largest are twice that stage.
SIDES = (64, 80, 96, 128, 144, 160, 192, 224, 256)
ASPECTS = (1.0, 1.0, 1.0, 4 / 3, 3 / 2, 2.0)
CANVAS = 96
# Every MODE_EVERY-th good image is stored in one of these encodings (the rest: RGB PNG/JPEG).
MODES = ("P", "RGBA", "RGB16", "CMYK")
MODE_EVERY = 10


def _good_specs(n: int, rng: random.Random) -> list[dict]:
    """Draw n specs so that no two good images are equal or near duplicates of each other.

    Two images with the same colour, shape and background must differ in position or size by
    at least ``CANVAS // 8`` pixels of the canvas; closer ones look alike to the filter step's
    perceptual near-duplicate check (pipeline.data.dedup) and one of them would be dropped.
    """
    specs, placed = [], {}
    min_shift = CANVAS // 8
    for _ in range(200 * n):
        if len(specs) == n:
            break
        color = rng.choice(list(COLORS))
        shape = rng.choice(SHAPES)
        background = rng.choice(list(BACKGROUNDS))
        side = rng.randint(CANVAS * 2 // 5, CANVAS * 3 // 4)
        x0 = rng.randint(0, CANVAS - side - 1)
        y0 = rng.randint(0, CANVAS - side - 1)
        others = placed.setdefault((color, shape, background), [])
        if any(max(abs(side - s), abs(x0 - x), abs(y0 - y)) < min_shift for s, x, y in others):
            continue
        others.append((side, x0, y0))
        caption = rng.choice(TEMPLATES).format(color=color, shape=shape, background=background)
        short, aspect = rng.choice(SIDES), rng.choice(ASPECTS)
        long = int(round(short * aspect / 8)) * 8
        size = (long, short) if rng.random() < 0.5 else (short, long)
        specs.append(
            {"color": color, "shape": shape, "background": background, "caption": caption,
             "box": (x0, y0, x0 + side, y0 + side), "size": size}
        )
    if len(specs) < n:
        raise ValueError(f"cannot draw {n} distinct images; use a smaller n")
    return specs


def _render(spec: dict) -> Image.Image:
    """The spec's shape, scaled from the canvas into the central square of its image."""
    w, h = spec["size"]
    short = min(w, h)
    dx, dy = (w - short) // 2, (h - short) // 2
    x0, y0, x1, y1 = (round(v * short / CANVAS) for v in spec["box"])
    return draw_shape((w, h), spec["color"], spec["shape"], spec["background"], (x0 + dx, y0 + dy, x1 + dx, y1 + dy))


def _encode_mode(img: Image.Image, mode: str) -> tuple[bytes, str]:
    """``img`` (8-bit RGB) stored in another encoding that must decode to the same colours."""
    if mode == "P":  # palette PNG: a few colours, exact
        return _encode(img.quantize(colors=16, method=Image.Quantize.MEDIANCUT), "png"), "png"
    if mode == "RGBA":  # opaque alpha channel
        return _encode(img.convert("RGBA"), "png"), "png"
    if mode == "CMYK":
        buf = io.BytesIO()
        img.convert("CMYK").save(buf, "JPEG", quality=95)
        return buf.getvalue(), "jpg"
    # 16-bit RGB PNG (48 bits per pixel), as cameras and scanners save: PIL cannot write it
    import cv2
    import numpy as np

    pixels = np.asarray(img)[:, :, ::-1].astype(np.uint16) * 257  # BGR, 0..65535
    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError("could not encode a 16-bit PNG")
    return data.tobytes(), "png"


def _write(images_dir: str, name: str, data: bytes) -> None:
    with open(os.path.join(images_dir, name), "wb") as f:
        f.write(data)


def _good_rows(specs: list[dict], images_dir: str) -> list[dict]:
    rows = []
    for i, spec in enumerate(specs):
        img = _render(spec)
        mode = MODES[(i // MODE_EVERY) % len(MODES)] if i % MODE_EVERY == MODE_EVERY - 1 else "RGB"
        if mode == "RGB":
            # A mix of PNG and JPEG sources, as on the web.
            fmt = "jpg" if i % 4 == 3 else "png"
            data = _encode(img, fmt)
        else:
            data, fmt = _encode_mode(img, mode)
        name = f"img_{i:05d}.{fmt}"
        _write(images_dir, name, data)
        rows.append({"name": name, "caption": spec["caption"], "color": spec["color"],
                     "shape": spec["shape"], "background": spec["background"], "kind": "ok",
                     "source_width": img.width, "source_height": img.height, "mode": mode})
    return rows


def _bad_rows(rows: list[dict], images_dir: str) -> list[dict]:
    """Rows that must fail to download or be filtered out, built beside the good ones."""
    bad = []
    image_size = CANVAS

    def add(kind, name, caption="a red circle on a white background", color="red", shape="circle"):
        size = Image.open(os.path.join(images_dir, name)).size if os.path.exists(
            os.path.join(images_dir, name)) and kind not in ("not_an_image", "truncated") else (0, 0)
        bad.append({"name": name, "caption": caption, "color": color, "shape": shape,
                    "background": "white", "kind": kind, "source_width": size[0], "source_height": size[1],
                    "mode": "RGB"})

    for i in range(dict(BROKEN_KINDS)["http_404"]):
        add("http_404", f"missing_{i:03d}.jpg")  # never written: the server answers 404
    for i in range(dict(BROKEN_KINDS)["not_an_image"]):
        _write(images_dir, f"page_{i:03d}.jpg", b"<html><body>Not an image</body></html>\n")
        add("not_an_image", f"page_{i:03d}.jpg")
    full = _encode(draw_shape((image_size, image_size), "red", "circle", "white", (10, 10, 60, 60)), "jpg")
    _write(images_dir, "truncated_000.jpg", full[: len(full) // 2])
    add("truncated", "truncated_000.jpg")

    for i in range(dict(FILTERED_KINDS)["empty_caption"]):
        name = f"nocaption_{i:03d}.png"
        _write(images_dir, name, _encode(draw_shape((image_size, image_size), "blue", "square", "white",
                                               (5 + i, 5, 50 + i, 50)), "png"))
        add("empty_caption", name, caption="" if i == 0 else "  ", color="blue", shape="square")
    src = rows[0]
    with open(os.path.join(images_dir, src["name"]), "rb") as f:
        dup_bytes = f.read()
    dup_name = "dup_000." + src["name"].rsplit(".", 1)[1]
    _write(images_dir, dup_name, dup_bytes)
    add("duplicate", dup_name, caption=src["caption"], color=src["color"], shape=src["shape"])
    # below the smallest stage of any preset (the tiny base stage is 32 px)
    _write(images_dir, "small_000.png", _encode(draw_shape((24, 24), "green", "circle", "white", (3, 3, 21, 21)), "png"))
    add("too_small", "small_000.png", color="green")
    # 4:1 with a 64 px short side, so only the aspect filter (not the size filter) rejects it.
    wide = draw_shape((256, 64), "yellow", "square", "white", (100, 8, 148, 56))
    _write(images_dir, "wide_000.png", _encode(wide, "png"))
    add("bad_aspect", "wide_000.png", color="yellow", shape="square")
    return bad


def make_tiny_dataset(output: str, n: int = 240, seed: int = 0, port: int = 8799) -> dict:
    """Render ``n`` good images plus the broken/filterable rows, and write the URL list.

    Writes ``output/images/*``, ``output/urls.parquet`` (url, caption, color, shape,
    background, kind, source_width, source_height, mode) and ``output/attributes.json``. URLs point at
    ``http://127.0.0.1:{port}/images/NAME``: serve ``output`` with :func:`serve` on that port.
    The same arguments always give the same bytes.
    """
    images_dir = os.path.join(output, "images")
    os.makedirs(images_dir, exist_ok=True)
    rng = random.Random(seed)
    good = _good_rows(_good_specs(n, rng), images_dir)
    rows = good + _bad_rows(good, images_dir)
    # Spread the bad rows over the shards instead of leaving them all at the end.
    rng.shuffle(rows)
    # Keep the duplicate after its source so dedup (first in URL-list order wins) keeps the "ok" row.
    src = next(i for i, r in enumerate(rows) if r["name"] == good[0]["name"])
    dup = next(i for i, r in enumerate(rows) if r["kind"] == "duplicate")
    if dup < src:
        rows[src], rows[dup] = rows[dup], rows[src]
    base = f"http://127.0.0.1:{port}/images/"
    columns = ["caption", "color", "shape", "background", "kind", "source_width", "source_height", "mode"]
    table = pa.table({"url": [base + r["name"] for r in rows], **{c: [r[c] for r in rows] for c in columns}})
    urls = os.path.join(output, "urls.parquet")
    pq.write_table(table, urls)
    attributes = {"colors": {k: list(v) for k, v in COLORS.items()}, "shapes": list(SHAPES),
                  "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()}, "templates": list(TEMPLATES)}
    with open(os.path.join(output, "attributes.json"), "w") as f:
        json.dump(attributes, f, indent=2, sort_keys=True)
    kinds = {k: sum(r["kind"] == k for r in rows) for k in dict.fromkeys(r["kind"] for r in rows)}
    sides = collections.Counter(min(r["source_width"], r["source_height"]) for r in good)
    return {"urls": urls, "images": images_dir, "n_rows": len(rows), "n_good": len(good),
            "n_broken": sum(c for _, c in BROKEN_KINDS), "n_filtered": sum(c for _, c in FILTERED_KINDS),
            "kinds": dict(sorted(kinds.items())), "short_sides": dict(sorted(sides.items())),
            "modes": dict(sorted(collections.Counter(r["mode"] for r in good).items()))}


class _QuietHandler(SimpleHTTPRequestHandler):
    """Static file handler that records each request on the server instead of printing it."""

    def log_request(self, code="-", size="-") -> None:
        self.server.request_log.append(f"{self.command} {self.path} {code}")

    def log_message(self, *args) -> None:
        pass  # quiet: errors are already visible as status codes in request_log


def _check_loopback(host: str) -> None:
    # The test server must never be reachable from outside this machine.
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve host {host!r}: {err}") from err
    addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
    if not all(a.is_loopback for a in addresses):
        raise ValueError(f"refusing to serve on {host!r} ({sorted(map(str, addresses))}): "
                         "only loopback hosts such as 127.0.0.1 are allowed")


def serve(directory: str, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``directory`` over HTTP from a daemon thread; returns the running server.

    ``port=0`` picks a free port (read it from ``server.server_address[1]``). Requests
    are recorded in ``server.request_log`` (one line each); stop with ``server.shutdown()``
    then ``server.server_close()``.
    """
    _check_loopback(host)
    handler = functools.partial(_QuietHandler, directory=os.path.abspath(directory))
    # A backlog of 128, not 5: img2dataset's threads connect all at once, and a dropped SYN is
    # retried only after 1 s, which looks like a slow server.
    attrs = {"request_queue_size": 128, **({"address_family": socket.AF_INET6} if ":" in host else {})}
    server_cls = type("TinyDataHTTPServer", (ThreadingHTTPServer,), attrs)
    server = server_cls((host, port), handler)
    server.daemon_threads = True
    server.request_log = []
    server.url = f"http://{host}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="tinydata-http", daemon=True).start()
    return server


def serve_forever(directory: str, port: int, host: str = "127.0.0.1") -> None:
    """Blocking variant of :func:`serve` for the CLI; Ctrl-C stops it."""
    server = serve(directory, port, host)
    print(f"serving {os.path.abspath(directory)} at {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make", help="render the dataset and its URL list")
    make.add_argument("output")
    make.add_argument("--n", type=int, default=240)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--port", type=int, default=8799)
    srv = sub.add_parser("serve", help="serve a generated dataset on loopback")
    srv.add_argument("directory")
    srv.add_argument("--port", type=int, default=8799)
    args = parser.parse_args(argv)
    if args.command == "make":
        print(json.dumps(make_tiny_dataset(args.output, args.n, args.seed, args.port), indent=2))
    else:
        serve_forever(args.directory, args.port)


if __name__ == "__main__":
    main()
