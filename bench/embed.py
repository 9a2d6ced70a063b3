"""Benchmark the embed step against padded fixed batches, the bare forward pass, and fp32 storage.

    python bench/embed.py        # about 1-2 minutes on 2 CPU cores; prints one JSON line last

Builds a T5-small-sized, randomly initialised T5 v1.1 encoder locally (d_model 512, 6 layers,
8 heads, d_ff 2048; no download) and filtered shards whose captions follow a web-caption
length mix: most under 20 tokens, a tail up to 128. It then measures, in one run:

- ``speedup_vs_padded``: captions/s of ``embed_shards`` (tar read, tokenize, length-sorted
  token-budget batches, forward, float16 real tokens to Parquet) over a baseline that pads
  every caption to 128 tokens in fixed batches of 64 and keeps padded float32 outputs (the
  baseline's disk writes are not even timed). The baseline's cost per caption does not depend
  on the caption, so each round times it on one batch of 64 of that round's captions.
- ``overhead_vs_forward``: our step's wall time over the pure encoder forward on exactly the
  batches our step formed, minus 1 (0.1 = 10% spent outside the model).
- ``bytes_vs_padded_fp32``: Parquet bytes per sample over 128 x 512 x 4 bytes.

The machine is shared, so times are CPU seconds of this process (``time.process_time``) with
one torch thread: other people's load does not count against either side. Wall-clock ratios
are printed too. The work runs in rounds (one 256-caption shard each: ours, then the bare
forward on its batches, then the baseline) and the ratios are medians over rounds.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imagen.text import T5TextEncoder, open_encoder
from imagen.tiny_tokenizer import ENGLISH_WORDS as _ENGLISH
from pipeline.data.embed import embed_shards
from pipeline.dev.tinymodels import build_tiny_t5

N_SHARDS, PER_SHARD = 5, 256
MAX_LEN, D_MODEL = 128, 512
BASELINE_BATCH = 64


def caption_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Token counts (</s> included): 85% in 5-19, 12% in 20-59, 3% in 60-128."""
    bucket = rng.choice(3, size=n, p=[0.85, 0.12, 0.03])
    low, high = np.array([5, 20, 60])[bucket], np.array([20, 60, 129])[bucket]
    return rng.integers(low, high)


def make_captions(n: int, seed: int = 0) -> list[str]:
    """Captions of known words: each is one token of the tiny tokenizer, plus </s>."""
    rng = np.random.default_rng(seed)
    words = np.array(_ENGLISH.split())
    return [" ".join(rng.choice(words, size=int(t) - 1)) for t in caption_lengths(n, rng)]


def write_shards(root: Path, captions: list[str]) -> None:
    root.mkdir(parents=True)
    pixel = b"\x89PNG placeholder"  # the embed step never decodes images
    for s in range(N_SHARDS):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"{s:05d}{i:04d}"
                for ext, data in (("png", pixel), ("txt", captions[s * PER_SHARD + i].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


class Clock:
    """CPU seconds of this process (``cpu``) and wall seconds (``wall``) of a block."""

    def __enter__(self) -> Clock:
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = time.process_time() - self._cpu
        self.wall = time.perf_counter() - self._wall


class Recorder:
    """Passes batches to the encoder and remembers them, to replay the bare forward."""

    def __init__(self, encoder: T5TextEncoder):
        self.encoder, self.batches = encoder, []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_ids(self, ids):
        self.batches.append(ids)
        return self.encoder.encode_ids(ids)


def forward_seconds(encoder: T5TextEncoder, batches: list[list[list[int]]]) -> Clock:
    """Time only ``model(ids, mask)`` over the given batches (tensors built beforehand)."""
    tensors = []
    for ids in batches:
        longest = max(len(x) for x in ids)
        t = torch.zeros(len(ids), longest, dtype=torch.long)
        m = torch.zeros(len(ids), longest, dtype=torch.bool)
        for r, seq in enumerate(ids):
            t[r, : len(seq)], m[r, : len(seq)] = torch.tensor(seq), True
        tensors.append((t, m))
    with Clock() as clock, torch.inference_mode():
        for t, m in tensors:
            encoder._model(input_ids=t, attention_mask=m)
    return clock


def padded_baseline(encoder: T5TextEncoder, captions: list[str]) -> Clock:
    """Time of: tokenize padded to 128, forward in fixed batches, padded fp32 out."""
    with Clock() as clock:
        for i in range(0, len(captions), BASELINE_BATCH):
            tok = encoder._tokenizer(captions[i : i + BASELINE_BATCH], padding="max_length",
                                     truncation=True, max_length=MAX_LEN, return_tensors="pt")  # fmt: skip
            with torch.inference_mode():
                out = encoder._model(**tok).last_hidden_state
            out.float().numpy()
    return clock


def one_round(encoder: T5TextEncoder, root: Path, shard: int, captions: list[str]) -> dict:
    """Ours on one shard, the bare forward on its batches, the baseline on 64 of its captions."""
    recorder = Recorder(encoder)
    with Clock() as ours:
        result = embed_shards(str(root / "filtered"), str(root / "emb"), recorder,
                              shards=[f"{shard:06d}"])  # fmt: skip
    forward = forward_seconds(encoder, recorder.batches)
    baseline = padded_baseline(encoder, captions[:BASELINE_BATCH])
    out_dir = Path(result["output"])
    return {
        "speedup": (PER_SHARD / ours.cpu) / (BASELINE_BATCH / baseline.cpu),
        "overhead": ours.cpu / forward.cpu - 1,
        "wall_speedup": (PER_SHARD / ours.wall) / (BASELINE_BATCH / baseline.wall),
        "wall_overhead": ours.wall / forward.wall - 1,
        "bytes": (out_dir / f"{shard:06d}.parquet").stat().st_size,
        "padding": result["padding"],
        "batches": len(recorder.batches),
    }


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)  # CPU time then measures work, not spinning or waiting threads
    torch.manual_seed(0)
    captions = make_captions(N_SHARDS * PER_SHARD)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_tiny_t5(str(root / "t5-small-random"), d_model=D_MODEL, num_layers=6,
                                  num_heads=8, d_ff=2048)  # fmt: skip
        write_shards(root / "filtered", captions)
        encoder = open_encoder(model_dir, max_length=MAX_LEN, device="cpu").load()
        lengths = np.array(encoder.token_lengths(captions))
        print(f"captions: {len(captions)}, tokens: median {np.median(lengths):.0f}, "
              f"<20: {np.mean(lengths < 20):.0%}, max {lengths.max()}", flush=True)  # fmt: skip
        # Warm-up outside the rounds: first-call allocations, the encoder_id hash of the
        # weights (once per process), the parquet writer's import.
        encoder.encode(captions[:8])
        _ = encoder.encoder_id
        import pyarrow.parquet  # noqa: F401

        rounds = []
        for shard in range(N_SHARDS):
            part = captions[shard * PER_SHARD : (shard + 1) * PER_SHARD]
            rounds.append(one_round(encoder, root, shard, part))
            print(f"round {shard}: " + ", ".join(f"{k} {v:.3g}" for k, v in rounds[-1].items()),
                  flush=True)  # fmt: skip
    per_sample = sum(r["bytes"] for r in rounds) / len(captions)
    padded_bytes = MAX_LEN * D_MODEL * 4
    print(f"bytes/sample {per_sample:.0f} vs padded fp32 {padded_bytes}", flush=True)
    print(json.dumps({
        "speedup_vs_padded": round(float(np.median([r["speedup"] for r in rounds])), 3),
        "overhead_vs_forward": round(float(np.median([r["overhead"] for r in rounds])), 4),
        "bytes_vs_padded_fp32": round(per_sample / padded_bytes, 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
