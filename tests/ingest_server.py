"""An adversarial loopback HTTP server for the ingest tests: what a real crawl meets, on 127.0.0.1.

:func:`build_site` returns the routes and a URL list whose every row says what must become of
it (``expect``): ``"kept"``, or ``"STAGE:REASON"`` with STAGE one of refused / download / filter:

    good images      png, jpg, webp, gif, bmp, tiff, RGBA, grayscale, large, non-ASCII
                     caption, behind a redirect, opted out only for another crawler -> kept
    download errors  truncated JPEG, corrupt PNG, zero-byte body, HTML served as image/jpeg,
                     404, 500, slow past the timeout, X-Robots-Tag noai (generic and for our
                     user agent), decompression bomb (100000x100000 declared), body over max_bytes
    filter rejects   empty / whitespace / very long caption, 40x40 image, 4:1 image, exact
                     duplicate, near duplicate (JPEG re-encode at another size)
    refused          file:// and ftp:// URLs, malformed URL, literal 169.254.169.254 / 10.x / [::1],
                     a name (localhost) that resolves to loopback, redirects to a loopback port
                     that is not allowlisted and to file://

Refused rows point at paths under ``/never/``: the test asserts no request reached them. The
server only binds loopback; run the download with ``allow_hosts=[f"127.0.0.1:{port}"]`` so that
everything else stays guarded. Slow responses sleep at most ``SLOW_SECONDS``.

    from tests.ingest_server import IngestServer
    with IngestServer() as site:          # site.url_list(dir) writes urls.parquet
        ...
    python tests/ingest_server.py DIR     # serve until Ctrl-C and write DIR/urls.parquet
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SLOW_SECONDS = 4.0  # the tests download with timeout=2
MAX_BYTES = 1_000_000  # the tests download with max_bytes=MAX_BYTES; "big_noise" is larger
CAPTION = "a photo of {what}"


@dataclasses.dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/png"
    headers: dict = dataclasses.field(default_factory=dict)
    delay: float = 0.0
    location: str | None = None  # a redirect target (absolute or path)


def _picture(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth, distinct picture: a gradient and a few shapes, placed by ``seed``."""
    w, h = size
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(img)
    palette = [(220, 40, 40), (40, 160, 60), (40, 70, 220), (240, 200, 40), (150, 50, 170), (30, 200, 210)]
    for i in range(3):
        color = palette[(seed + i * 2) % len(palette)]
        x0, y0 = (seed * 37 + i * 53) % (w // 2), (seed * 19 + i * 41) % (h // 2)
        box = (x0, y0, x0 + w // 3 + i * 5, y0 + h // 3 + seed % 7)
        (draw.ellipse if (seed + i) % 2 else draw.rectangle)(box, fill=color)
    return img.convert(mode)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares width x height 8-bit grayscale pixels (10 GB decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 8, 9)  # a few all-zero rows: the rest is implied
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _corrupt_png() -> bytes:
    data = bytearray(_encode(Image.effect_noise((96, 96), 40).convert("RGB"), "PNG"))
    start = data.index(b"IDAT") + 40
    for i in range(start, start + 400):
        data[i] ^= 0x5A  # scrambled compressed data: the header still parses
    return bytes(data)


def _good_routes() -> list[tuple[str, Route, str]]:
    """(path, route, caption) for images that must be kept."""
    pic = _picture
    rgba = pic((100, 100), 4, "RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((100, 100)))
    return [
        ("/img/png64.png", Route(_encode(pic((64, 64), 1), "PNG")), CAPTION.format(what="a small png")),
        ("/img/photo.jpg", Route(_encode(pic((200, 150), 2), "JPEG", quality=90), content_type="image/jpeg"),
         CAPTION.format(what="a jpeg")),
        ("/img/pic.webp", Route(_encode(pic((96, 128), 3), "WEBP"), content_type="image/webp"),
         CAPTION.format(what="a webp")),
        ("/img/alpha.png", Route(_encode(rgba, "PNG")), CAPTION.format(what="a transparent png")),
        ("/img/anim.gif", Route(_encode(pic((80, 80), 5).quantize(64), "GIF"), content_type="image/gif"),
         CAPTION.format(what="a gif")),
        ("/img/bitmap.bmp", Route(_encode(pic((90, 90), 6), "BMP"), content_type="image/bmp"),
         CAPTION.format(what="a bitmap")),
        ("/img/scan.tiff", Route(_encode(pic((110, 100), 7), "TIFF"), content_type="image/tiff"),
         CAPTION.format(what="a tiff")),
        ("/img/gray.jpg", Route(_encode(pic((120, 90), 8, "L"), "JPEG"), content_type="image/jpeg"),
         CAPTION.format(what="a grayscale jpeg")),
        ("/img/large.jpg", Route(_encode(pic((1024, 768), 9), "JPEG", quality=85), content_type="image/jpeg"),
         CAPTION.format(what="a large jpeg")),
        ("/img/unicode.png", Route(_encode(pic((80, 80), 10), "PNG")),
         "un chat noir sur un canapé rouge, 黒い猫, кошка 🐈"),
        ("/img/other-bot.png", Route(_encode(pic((72, 72), 11), "PNG"), headers={"X-Robots-Tag": "otherbot: noai"}),
         CAPTION.format(what="an image opted out for another crawler only")),
        ("/redirect/moved.png", Route(status=302, location="/img/moved-target.png"),
         CAPTION.format(what="an image behind a redirect")),
        ("/img/dup-a.png", Route(_encode(pic((96, 96), 12), "PNG")), CAPTION.format(what="the first copy")),
        ("/img/near-src.png", Route(_encode(pic((256, 256), 13), "PNG")), CAPTION.format(what="an original")),
    ]


def _bad_routes(private_port: int) -> list[tuple[str, Route, str, str]]:
    """(path, route, caption, expect) for rows the pipeline must reject."""
    pic, dl, flt = _picture, "download:", "filter:"
    full = _encode(pic((128, 128), 20), "JPEG", quality=90)
    noise = _encode(Image.frombytes("RGB", (800, 800), random.Random(0).randbytes(800 * 800 * 3)), "PNG")
    jpeg = {"content_type": "image/jpeg"}
    return [
        ("/img/truncated.jpg", Route(full[: len(full) // 2], **jpeg), "a cut jpeg", dl + "image_decoding_error"),
        ("/img/corrupt.png", Route(_corrupt_png()), "a corrupt png", dl + "image_decoding_error"),
        ("/img/empty.jpg", Route(b"", **jpeg), "an empty body", dl + "empty_body"),
        ("/img/page.jpg", Route(b"<!doctype html><html><body>Not here</body></html>\n", **jpeg),
         "html served as a jpeg", dl + "not_an_image"),
        ("/img/missing.jpg", Route(b"not found", status=404, content_type="text/plain"), "a 404", dl + "http_404"),
        ("/img/error.jpg", Route(b"oops", status=500, content_type="text/plain"), "a 500", dl + "http_500"),
        ("/img/slow.png", Route(_encode(pic((80, 80), 21), "PNG"), delay=SLOW_SECONDS), "too slow", dl + "timeout"),
        ("/img/noai.png", Route(_encode(pic((80, 80), 22), "PNG"), headers={"X-Robots-Tag": "noai"}),
         "opted out", dl + "disallowed_by_x_robots_tag"),
        ("/img/noai-us.png", Route(_encode(pic((80, 80), 23), "PNG"), headers={"X-Robots-Tag": "img2dataset: noimageai"}),
         "opted out for us", dl + "disallowed_by_x_robots_tag"),
        ("/img/bomb.png", Route(decompression_bomb()), "a decompression bomb", dl + "decompression_bomb"),
        ("/img/big-noise.png", Route(noise), "a body over max_bytes", dl + "response_too_large"),
        ("/img/no-caption.png", Route(_encode(pic((80, 80), 24), "PNG")), "", flt + "caption_too_short"),
        ("/img/blank-caption.png", Route(_encode(pic((80, 80), 25), "PNG")), " \t ", flt + "caption_too_short"),
        ("/img/long-caption.png", Route(_encode(pic((80, 80), 26), "PNG")), "a very long caption " * 150,
         flt + "caption_too_long"),
        ("/img/tiny.png", Route(_encode(pic((40, 40), 27), "PNG")), "a 40 px image", flt + "image_too_small"),
        ("/img/banner.png", Route(_encode(pic((256, 64), 28), "PNG")), "a 4:1 banner", flt + "aspect_ratio_too_large"),
        ("/img/dup-b.png", Route(_encode(pic((96, 96), 12), "PNG")), "the second copy", flt + "duplicate_image"),
        ("/img/near-copy.jpg", Route(_encode(pic((256, 256), 13).resize((200, 200)), "JPEG", quality=70), **jpeg),
         "a re-encoded copy", flt + "near_duplicate_image"),
        ("/redirect/to-private.png", Route(status=302, location=f"http://127.0.0.1:{private_port}/never/b.png"),
         "a redirect to another loopback port", "refused:loopback_address"),
        ("/redirect/to-file.png", Route(status=302, location="file:///etc/passwd"),
         "a redirect to a local file", "refused:unsupported_scheme"),
    ]


def build_site(port: int, private_port: int) -> tuple[dict[str, Route], list[dict]]:
    """Routes served on ``port`` and the URL list rows (url, caption, expect)."""
    base = f"http://127.0.0.1:{port}"
    routes: dict[str, Route] = {}
    rows: list[dict] = []
    for path, route, caption in _good_routes():
        routes[path] = route
        rows.append({"url": base + path, "caption": caption, "expect": "kept"})
    routes["/img/moved-target.png"] = Route(_encode(_picture((90, 90), 30), "PNG"))
    for path, route, caption, expect in _bad_routes(private_port):
        routes[path] = route
        rows.append({"url": base + path, "caption": caption, "expect": expect})
    refused = [
        (f"http://localhost:{port}/never/by-name.png", "refused:loopback_address"),
        (f"http://[::1]:{port}/never/v6.png", "refused:loopback_address"),
        ("http://169.254.169.254/never/latest/meta-data/", "refused:link_local_address"),
        ("http://10.0.0.1/never/intranet.png", "refused:private_address"),
        ("file:///etc/passwd", "refused:unsupported_scheme"),
        ("ftp://127.0.0.1/never/x.png", "refused:unsupported_scheme"),
        ("http://[::1/never/malformed.png", "refused:invalid_url"),
    ]
    rows += [{"url": u, "caption": "must not be fetched", "expect": e} for u, e in refused]
    return routes, rows


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.request_log.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None:
            route = Route(b"not found", status=404, content_type="text/plain")
        if route.delay:
            time.sleep(route.delay)
        self.send_response(route.status)
        if route.location:
            self.send_header("Location", route.location)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(route.body)))
        for k, v in route.headers.items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(route.body)  # the client may give up (timeout, size limit): expected here

    def log_message(self, *args) -> None:
        pass  # requests are recorded in server.request_log


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connections when img2dataset's threads all connect at
    # once; the kernel retries a dropped SYN after 1 s, which reads as a timeout.
    request_queue_size = 128


def _start(routes: dict[str, Route]) -> ThreadingHTTPServer:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.routes, server.request_log = routes, []
    threading.Thread(target=server.serve_forever, name="ingest-http", daemon=True).start()
    return server


class IngestServer:
    """The adversarial site on 127.0.0.1 plus a second, never-allowlisted loopback server."""

    def __enter__(self) -> IngestServer:
        self.private = _start({})
        self.server = _start({})
        self.port = self.server.server_address[1]
        self.routes, self.rows = build_site(self.port, self.private.server_address[1])
        self.server.routes.update(self.routes)
        self.allow_hosts = [f"127.0.0.1:{self.port}"]
        return self

    def url_list(self, directory: str) -> str:
        """Write ``urls.parquet`` (url, caption, expect) into ``directory``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "urls.parquet")
        pq.write_table(pa.Table.from_pylist(self.rows), path)
        return path

    def never_requested(self) -> bool:
        """True when no request reached a refused target (``/never/`` paths, the private server)."""
        return not self.private.request_log and not any("/never/" in p for p in self.server.request_log)

    def __exit__(self, *exc) -> None:
        for s in (self.server, self.private):
            s.shutdown()
            s.server_close()


if __name__ == "__main__":
    with IngestServer() as site:
        print(f"serving at http://127.0.0.1:{site.port}; URL list: {site.url_list(sys.argv[1])}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
