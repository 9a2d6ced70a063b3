"""Benchmark: the fetch guard's own work per body, after the bytes are in (no network).

What every download thread does with each body besides img2dataset's own decode and resize:
``read_limited`` (chunked read under the deadline), ``check_body`` (sizing from the header) and
``normalize_for_img2dataset`` (pass through, or re-encode what OpenCV gets wrong). Timed with
``timeit`` on typical web bodies (JPEG 256-1024 px, PNG, WebP), best of 5; prints microseconds
per body and, with ``--profile``, the top of a cProfile of the whole loop.

    .venv/bin/python bench/fetch_path.py [--profile]     # a few seconds; last line is JSON
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import timeit


def _bodies() -> dict[str, bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    for side in (256, 512, 1024):
        # A smooth picture with some texture, like a photo: gradient plus noise.
        ramp = np.linspace(0, 255, side, dtype=np.float32)
        base = np.stack([ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1),
                         np.full((side, side), 128, np.float32)], -1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, exif=Image.Exif().tobytes() if side == 512 else b"")
        out[f"jpeg{side}"] = buf.getvalue()
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        img.resize((512, 384)).save(buf, fmt)
        out[fmt.lower() + "512x384"] = buf.getvalue()
    return out


class _Response:
    """Stands in for the HTTP response: headers and a chunked read of the body."""

    def __init__(self, body: bytes):
        self.headers = {"Content-Length": str(len(body))}
        self._stream = io.BytesIO(body)

    def read(self, n: int) -> bytes:
        return self._stream.read(n)


def per_body(body: bytes) -> None:
    """The guard's work on one fetched body (as in ``guarded_download_image``)."""
    from pipeline.data.fetch_guard import check_body
    from pipeline.data.images import normalize_for_img2dataset
    from pipeline.netguard import read_limited

    data = read_limited(_Response(body), 32 << 20, time.monotonic() + 10)
    header = check_body(data, "image/jpeg", 64_000_000)
    normalize_for_img2dataset(data, header) if header is not None else normalize_for_img2dataset(data)


def main() -> None:
    bodies = _bodies()
    for body in bodies.values():
        per_body(body)  # imports and caches warm
    result = {}
    for name, body in bodies.items():
        n = 2000
        best = min(timeit.repeat(lambda b=body: per_body(b), number=n, repeat=5)) / n
        result[name] = round(best * 1e6, 1)
        print(f"{name:>14}: {len(body):>7} bytes, {best * 1e6:8.1f} us per body", flush=True)
    if "--profile" in sys.argv:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            for body in bodies.values():
                per_body(body)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(15)
    print(json.dumps({"us_per_body": result}))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
