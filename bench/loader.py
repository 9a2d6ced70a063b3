"""Benchmark the training loader against a bare tar read + image decode of the same shards.

    python bench/loader.py       # about 1 minute on 2 CPU cores; prints one JSON line last

Writes filtered shards the way the pipeline does by default (PNG, square, at the stage's
resolution: 64 px for base64, 256 px for sr256) with photo-like content, embeds their
captions with a 1-layer, 512-wide random T5 (real ``embed_shards`` output), then times:

- raw: stream each tar with ``tarfile`` and decode every image to an RGB array, nothing else
  (the floor any loader pays);
- ours: one worker's loop of ``make_loader`` (what each DataLoader worker runs): shuffled
  random-access reads with the name and sha256 checks, decode, crop/flip (and the 64 px
  low-res input for sr256), join with the embeddings by key, padding, uint8 / float16
  batches (their float conversion is ``to_device``'s, on the training device).

Times are CPU seconds of this process with one torch thread, so other people's load on a
shared machine counts against neither side; each side runs ``ROUNDS`` times interleaved and
the best counts. A 1-worker DataLoader's wall-clock rate (including the hand-over of batches
to the training process) is printed too. Last line: JSON with ``ratio_vs_raw_decode_64`` and
``ratio_vs_raw_decode_256`` (ours samples/s per worker over raw samples/s).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagen.tiny_tokenizer import ENGLISH_WORDS as _ENGLISH
from pipeline.data.embed import embed_shards
from pipeline.data.images import open_rgb
from pipeline.data.loader import TrainDataConfig, make_loader
from pipeline.dev.tinymodels import build_tiny_t5

ROUNDS = 3
# (stage side, low-res side, shards, samples per shard, batch size)
CASES = {64: (64, None, 2, 1000, 64), 256: (256, 64, 2, 500, 16)}


def photo_like(side: int, rng: np.random.Generator) -> bytes:
    """Smooth colour fields plus grain: compresses like a photo, unlike pure noise."""
    small = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
    base = np.asarray(small.resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-12, 13, size=base.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(root: Path, side: int, shards: int, per_shard: int) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(side)
    words = np.array(_ENGLISH.split())
    for s in range(shards):
        with tarfile.open(root / f"{s:06d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                caption = " ".join(rng.choice(words, size=int(rng.integers(3, 18))))
                meta = json.dumps({"key": key, "caption": caption, "width": side}).encode()
                for ext, data in (("png", photo_like(side, rng)), ("txt", caption.encode()),
                                  ("json", meta)):  # fmt: skip
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def raw_decode(tars: list[Path]) -> tuple[int, float]:
    """(images, CPU seconds): stream every tar, decode every image to RGB, nothing else."""
    start, n = time.process_time(), 0
    for path in tars:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".png"):
                    np.asarray(open_rgb(data))  # the loader's decode, without its resize
                    n += 1
    return n, time.process_time() - start


def ours(cfg: TrainDataConfig, batches: int) -> tuple[int, float]:
    """(samples, CPU seconds) of the loader's own loop, in this process (one worker's work)."""
    start = time.process_time()
    got = sum(len(b["keys"]) for b in islice(iter(make_loader(cfg)), batches))
    return got, time.process_time() - start


def one_worker_wall(cfg: TrainDataConfig, batches: int) -> float:
    """Wall-clock samples/s of a DataLoader with one worker process (startup excluded)."""
    it = iter(make_loader(TrainDataConfig(**{**vars(cfg), "num_workers": 1})))
    next(it)
    start = time.perf_counter()
    got = sum(len(b["keys"]) for b in islice(it, batches - 1))
    rate = got / (time.perf_counter() - start)
    del it  # stops the worker
    return rate


def run_case(root: Path, t5: str, side: int) -> float:
    size, lowres, shards, per_shard, batch = CASES[side]
    data = root / f"data{side}"
    write_shards(data, side, shards, per_shard)
    emb = embed_shards(str(data), str(root / f"emb{side}"), t5, max_length=32)["output"]
    cfg = TrainDataConfig(data=str(data), embeddings=emb, image_size=size, lowres_crop_size=lowres,
                          batch_size=batch, max_tokens=32)  # fmt: skip
    batches = shards * per_shard // batch  # one epoch
    tars = sorted(data.glob("*.tar"))
    raw_rate = ours_rate = 0.0
    for _ in range(ROUNDS):
        n, sec = raw_decode(tars)
        raw_rate = max(raw_rate, n / sec)
        n, sec = ours(cfg, batches)
        ours_rate = max(ours_rate, n / sec)
    wall = one_worker_wall(cfg, batches)
    print(f"{side}px: raw tar read + decode {raw_rate:.0f} samples/s; loader {ours_rate:.0f} "
          f"samples/s per worker (CPU); 1-worker DataLoader {wall:.0f} samples/s wall",
          flush=True)  # fmt: skip
    return ours_rate / raw_rate


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # CPU time then measures work, not spinning threads
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t5 = build_tiny_t5(str(root / "t5"), d_model=512, num_layers=1, num_heads=8)
        ratios = {side: run_case(root, t5, side) for side in CASES}
    print(json.dumps({f"ratio_vs_raw_decode_{side}": round(r, 3) for side, r in ratios.items()}))


if __name__ == "__main__":
    main()
