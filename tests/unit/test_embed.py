"""Caption embedding step (pipeline.data.embed) on hand-written filtered shards and a tiny T5.

HF_HUB_OFFLINE=1 python -m pytest tests/unit/test_embed.py -q
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from imagen.text import T5TextEncoder
from pipeline.cli import main as cli_main
from pipeline.data.embed import (
    balanced_split,
    embed_shards,
    encode_captions,
    encoder_slug,
    read_metadata,
    split_shards,
)
from pipeline.data.embeddings import read_embeddings
from pipeline.dev.tinymodels import build_tiny_t5

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]


def write_filtered_shards(root: Path, num_shards: int = 2, per_shard: int = 6) -> dict[str, str]:
    """Filtered-shard layout: NNNNNN.tar with KEY.png/.txt/.json, plus manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    captions = {}
    for s in range(num_shards):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                # Keys deliberately not sorted within the shard: output must keep tar order.
                key = f"{s:05d}{(per_shard - i) * 7 % 100:04d}"
                caption = f"a {COLOURS[(s + i) % 5]} {SHAPES[i % 3]}" + " on a white background" * (
                    i % 3
                )
                captions[key] = caption
                buf = io.BytesIO()
                Image.new("RGB", (20 + i, 16), (40 * i, 255 - 30 * s, 90)).save(buf, "PNG")
                meta = json.dumps({"key": key, "caption": caption, "width": 20 + i}).encode()
                for ext, data in (
                    ("png", buf.getvalue()),
                    ("txt", caption.encode()),
                    ("json", meta),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    counts = {f"{s:06d}.tar": per_shard for s in range(num_shards)}
    manifest = {"format": "imagen-pipeline/filtered-shards/v1", "shards": counts,
                "input_rows": len(captions), "kept": len(captions), "rejected": 0,
                "rejects": {}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return captions


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> str:
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5") / "tiny-t5"))


@pytest.fixture
def shards(tmp_path) -> tuple[Path, dict[str, str]]:
    return tmp_path / "filtered", write_filtered_shards(tmp_path / "filtered")


def test_embed_writes_one_parquet_per_shard(tmp_path, t5_dir, shards):
    data, captions = shards
    out = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16, batch_size=4)
    enc = T5TextEncoder(t5_dir, max_length=16, device="cpu")
    timing = {k: out.pop(k) for k in ("samples_per_s", "padding")}
    dedup = out.pop("caption_dedup")
    assert out == {
        "output": str(tmp_path / "emb" / encoder_slug(enc.encoder_id)),
        "encoder_id": enc.encoder_id,
        "shards": 2,
        "samples": 12,
        "skipped": 0,
    }
    distinct = len(set(captions.values()))  # the fixture repeats some captions across shards
    assert dedup["captions"] == 12 and dedup["captions_encoded"] == distinct and dedup["cache_hits"] == 12 - distinct
    assert timing["samples_per_s"] > 0 and 0 <= timing["padding"] < 0.5
    files = sorted(os.listdir(out["output"]))
    assert files == ["000000.parquet", "000001.parquet"]  # no temp files left behind
    table = pq.read_table(Path(out["output"]) / "000001.parquet")
    assert table.schema.field("__key__").type == pa.string()
    assert table.schema.field("num_tokens").type == pa.int32()
    assert table.schema.field("embedding").type == pa.list_(pa.list_(pa.float16(), 32))
    with tarfile.open(data / "000001.tar") as tar:
        tar_keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
    assert table.column("__key__").to_pylist() == tar_keys
    # Each row records where its image lies in the tar: those bytes are exactly the PNG.
    with tarfile.open(data / "000001.tar") as tar, open(data / "000001.tar", "rb") as fh:
        for key, ext, offset, size, digest in zip(*(table.column(c).to_pylist() for c in
                                                   ("__key__", "image_ext", "image_offset", "image_size",
                                                    "image_sha256")), strict=True):  # fmt: skip
            fh.seek(offset)
            assert ext == "png" and fh.read(size) == tar.extractfile(f"{key}.png").read()
            assert digest == hashlib.sha256(tar.extractfile(f"{key}.png").read()).digest()
    meta = read_metadata(str(Path(out["output"]) / "000001.parquet"))
    assert meta == {
        "encoder_id": enc.encoder_id,
        "encoder_name": t5_dir,
        "max_length": 16,
        "dtype": "float32",
        "storage_dtype": "float16",
        "code_version": "embed-v4",
        "source_shard": "000001.tar",
        "source_size": (data / "000001.tar").stat().st_size,
        "source_sha256": hashlib.sha256((data / "000001.tar").read_bytes()).hexdigest(),
        "dim": 32,
        "num_samples": 6,
        "tar_samples": 6,
    }
    # The trainer asks a directory (or its parent) for the encoder facts.
    for where in (out["output"], str(tmp_path / "emb")):
        assert read_metadata(where)["encoder_id"] == enc.encoder_id


def test_stored_vectors_match_fresh_encoder_without_padding(tmp_path, t5_dir, shards):
    data, captions = shards
    out = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16, batch_size=4)
    enc = T5TextEncoder(t5_dir, max_length=16, device="cpu")
    seen = 0
    for name in ("000000.parquet", "000001.parquet"):
        vectors, meta = read_embeddings(str(Path(out["output"]) / name))
        table = pq.read_table(Path(out["output"]) / name)
        assert table.column("num_tokens").to_pylist() == [len(v) for v in vectors.values()]
        for key, stored in vectors.items():
            assert stored.dtype == np.float16 and stored.shape[1] == 32
            fresh, mask = enc.encode([captions[key]])  # alone: no padding at all
            assert mask.all() and stored.shape[0] == fresh.shape[1]
            # float16 storage: relative rounding 2**-11, so 1e-3 relative is exact enough.
            torch.testing.assert_close(
                torch.from_numpy(stored.astype(np.float32)), fresh[0], rtol=1e-3, atol=1e-3
            )
            seen += 1
    lengths = {len(v) for v in read_embeddings(str(Path(out["output"]) / name))[0].values()}
    assert seen == 12 and len(lengths) > 1  # captions of several lengths were tested


def test_rerun_skips_done_shards_and_redoes_changed_ones(tmp_path, t5_dir, shards):
    data, _ = shards
    args = (str(data), str(tmp_path / "emb"), t5_dir)
    first = embed_shards(*args, max_length=16)
    done = Path(first["output"]) / "000000.parquet"
    stamp = done.stat().st_mtime_ns
    again = embed_shards(*args, max_length=16)
    assert (again["shards"], again["skipped"], again["samples"]) == (0, 2, 0)
    assert done.stat().st_mtime_ns == stamp
    (Path(first["output"]) / "000001.parquet").unlink()  # a shard that never finished
    partial = embed_shards(*args, max_length=16)
    assert (partial["shards"], partial["skipped"], partial["samples"]) == (1, 1, 6)
    changed = embed_shards(*args, max_length=8)  # different settings: nothing is reused
    assert (changed["shards"], changed["skipped"]) == (2, 0)
    assert read_metadata(str(done))["max_length"] == 8
    subset = embed_shards(*args, max_length=16, shards=["000001.tar"])
    assert (subset["shards"], subset["skipped"]) == (1, 0)
    with pytest.raises(ValueError, match="000009"):
        embed_shards(*args, shards=["000009"])


def test_corrupted_parquet_names_the_file(tmp_path, t5_dir, shards):
    data, _ = shards
    out = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16)
    bad = Path(out["output"]) / "000001.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ValueError, match="000001.parquet"):
        read_embeddings(str(bad))
    with pytest.raises(ValueError, match="re-run the embed step"):
        read_metadata(str(bad))
    redo = embed_shards(str(data), str(tmp_path / "emb"), t5_dir, max_length=16)
    assert (redo["shards"], redo["skipped"]) == (1, 1)
    assert len(read_embeddings(str(bad))[0]) == 6


def test_sample_without_caption_gets_no_row(tmp_path, t5_dir):
    data = tmp_path / "filtered"
    data.mkdir()
    with tarfile.open(data / "000000.tar", "w") as tar:
        for name, payload in (("a.txt", b"a red dot"), ("a.png", b"x"), ("b.png", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = embed_shards(str(data), str(tmp_path / "emb"), t5_dir)
    vectors, meta = read_embeddings(str(Path(out["output"]) / "000000.parquet"))
    assert list(vectors) == ["a"] and out["samples"] == 1
    assert (meta["num_samples"], meta["tar_samples"]) == (1, 2)


class Recording:
    """The real tiny encoder; records each batch and fails like a GPU above ``limit`` tokens."""

    def __init__(self, encoder: T5TextEncoder, limit: int | None = None):
        self.encoder, self.limit = encoder, limit
        self.calls: list[tuple[int, int]] = []  # (captions, padded length) of good batches
        self.shortest: list[int] = []
        self.ooms = 0

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode_ids(self, ids):
        shape = (len(ids), max(len(x) for x in ids))
        if self.limit is not None and shape[0] * shape[1] > self.limit:
            self.ooms += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.calls.append(shape)
        self.shortest.append(min(len(x) for x in ids))
        return self.encoder.encode_ids(ids)


CAPTIONS = [
    "a dog",
    "a red circle on a white background with a small blue square next to it",
    "two cats",
    "a photo of a man holding a bicycle near the sea at night under a dark sky",
    "a yellow star",
    "an old house",
    "a beautiful field of flowers in the sun",
    "a car",
    "a green triangle on a black background",
    "the city street at night with many lights and people walking",
    "a bird",
    "a small table with food and water on a plate",
]


@pytest.fixture(scope="module")
def tiny_encoder(t5_dir) -> T5TextEncoder:
    return T5TextEncoder(t5_dir, max_length=32, device="cpu").load()


def test_batches_are_length_sorted_under_a_token_budget(tiny_encoder):
    ids = tiny_encoder.token_ids(CAPTIONS)
    rec = Recording(tiny_encoder)
    flat, lengths, stats = encode_captions(rec, ids, batch_size=4, max_batch_tokens=40)
    assert lengths.tolist() == [len(x) for x in ids] and flat.shape == (sum(lengths), 32)
    assert all(n <= 4 and (n * length <= 40 or n == 1) for n, length in rec.calls)
    assert [length for _, length in rec.calls] == sorted((L for _, L in rec.calls), reverse=True)
    # Length buckets: no caption in a batch is shorter than 80% of the batch's longest.
    assert all(s >= math.ceil(0.8 * L) for s, (_, L) in zip(rec.shortest, rec.calls, strict=True))
    assert sum(n for n, _ in rec.calls) == len(CAPTIONS) and stats.batches == len(rec.calls)
    assert stats.padded_tokens == sum(n * length for n, length in rec.calls)
    in_order = sum(max(lengths[i : i + 4]) * len(lengths[i : i + 4]) for i in range(0, 12, 4))
    assert stats.padded_tokens < in_order  # sorting pads less than batching in input order
    ends = np.cumsum(lengths)
    for i, caption in enumerate(CAPTIONS):  # back in input order, equal to a lone forward
        alone, _ = tiny_encoder.encode([caption])
        np.testing.assert_allclose(flat[ends[i] - lengths[i] : ends[i]], alone[0].numpy(),
                                   rtol=2e-3, atol=2e-3)  # fmt: skip


def test_out_of_memory_halves_the_budget_and_retries(tiny_encoder):
    same_length = [f"a {c} {s}" for c in ("red", "green", "blue", "pink") for s in
                   ("circle", "square", "star", "dot")]  # fmt: skip
    ids = tiny_encoder.token_ids(same_length)
    assert {len(x) for x in ids} == {4}
    reference, _, _ = encode_captions(tiny_encoder, ids, batch_size=64, max_batch_tokens=10_000)
    rec = Recording(tiny_encoder, limit=20)
    flat, _, stats = encode_captions(rec, ids, batch_size=64, max_batch_tokens=10_000)
    # 16 x 4 = 64 tokens fail, then 32 fail, then batches of 4 x 4 = 16 fit.
    assert (rec.ooms, stats.oom_retries, stats.token_budget) == (2, 2, 16)
    assert rec.calls == [(4, 4)] * 4
    np.testing.assert_allclose(flat, reference, rtol=2e-3, atol=2e-3)
    with pytest.raises(RuntimeError, match="out of memory encoding one caption of 4 tokens"):
        encode_captions(Recording(tiny_encoder, limit=3), ids, 64, 10_000)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not retried
        encode_captions(Broken(tiny_encoder), ids, 64, 10_000)


class Broken(Recording):
    def encode_ids(self, ids):
        raise RuntimeError("shape mismatch")


def test_oom_reduced_budget_carries_to_the_next_shard(tmp_path, tiny_encoder):
    data = tmp_path / "filtered"
    write_filtered_shards(data, num_shards=2, per_shard=6)
    rec = Recording(tiny_encoder, limit=24)
    out = embed_shards(str(data), str(tmp_path / "emb"), rec, max_batch_tokens=10_000)
    assert (out["shards"], out["samples"]) == (2, 12)
    assert rec.ooms <= 3  # ~log2(10000 / 24) halvings would be 9; shard 2 starts reduced
    assert read_metadata(out["output"])["max_length"] == 32  # the instance's own settings


def write_sized_tars(root: Path, sizes: dict[str, int]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        write_tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=write_tar_bytes, mode="w") as tar:
            info = tarfile.TarInfo("k.txt")
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
        (root / name).write_bytes(write_tar_bytes.getvalue())


def test_split_shards_is_disjoint_and_balanced(tmp_path, caplog):
    counts = {"000000.tar": 10, "000001.tar": 1, "000002.tar": 1, "000003.tar": 8}
    write_sized_tars(tmp_path, dict.fromkeys(counts, 10))
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": counts, "kept": 20}))
    assert split_shards(str(tmp_path), 2) == [
        ["000000.tar"],
        ["000001.tar", "000002.tar", "000003.tar"],
    ]
    six = split_shards(str(tmp_path), 6)
    assert sorted(n for part in six for n in part) == sorted(counts)
    assert [len(p) for p in six].count(0) == 2 and all(len(p) <= 1 for p in six)
    assert split_shards(str(tmp_path), 1) == [sorted(counts)]
    # Without counts for every shard: balanced by bytes, and said so.
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": {"000000.tar": 3}}))
    write_sized_tars(tmp_path, {"000000.tar": 30_000, "000003.tar": 20_000})
    with caplog.at_level(logging.WARNING, logger="pipeline.data.embed"):
        by_bytes = split_shards(str(tmp_path), 2)
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("*.tar")}
    assert sizes["000000.tar"] > sizes["000003.tar"] > sizes["000001.tar"] == sizes["000002.tar"]
    assert sorted(n for part in by_bytes for n in part) == sorted(counts)
    loads = [sum(sizes[n] for n in part) for part in by_bytes]
    # Tar-padded sizes 40, 30, 10, 10 KiB: no split beats 50 / 40.
    assert sorted(loads) == [40 * 1024, 50 * 1024]
    assert "balancing by bytes" in caplog.text
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        split_shards(str(tmp_path), 0)
    # The same greedy split balances the loader's readers by parquet rows: 7 + 7, where
    # round-robin would give 8 + 6.
    assert balanced_split([2, 5, 5, 1, 1], 2) == [[0, 1], [2, 3, 4]]


def test_workers_embed_disjoint_shard_lists_via_cli(tmp_path, t5_dir, capsys):
    data, out = tmp_path / "filtered", tmp_path / "emb"
    write_filtered_shards(data, num_shards=3, per_shard=2)
    plan = split_shards(str(data), 2)
    assert sorted(n for part in plan for n in part) == ["000000.tar", "000001.tar", "000002.tar"]
    results = []
    for worker in range(2):
        argv = ["embed", "--input", str(data), "--output", str(out), "--encoder", t5_dir,
                "--max-length", "16", "--num-workers", "2", "--worker", str(worker)]  # fmt: skip
        assert cli_main(argv) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert [r["shards"] for r in results] == [len(p) for p in plan]
    assert [r["samples"] for r in results] == [2 * len(p) for p in plan]
    assert sorted(os.listdir(results[0]["output"])) == [f"00000{i}.parquet" for i in range(3)]


class Overflowing(Recording):
    """Returns 1e6 (inf in float16) in one token of one chosen caption."""

    def __init__(self, encoder: T5TextEncoder, bad_ids: list[int]):
        super().__init__(encoder)
        self.bad_ids = bad_ids

    def encode_ids(self, ids):
        hidden, mask = self.encoder.encode_ids(ids)
        hidden = hidden.clone()
        for row, seq in enumerate(ids):
            if seq == self.bad_ids:
                hidden[row, len(seq) - 1, 3] = 1e6
        return hidden, mask


def test_float16_overflow_names_shard_and_key(tmp_path, tiny_encoder, shards):
    data, captions = shards
    key = sorted(k for k in captions if k.startswith("00001"))[2]
    bad = Overflowing(tiny_encoder, tiny_encoder.token_ids([captions[key]])[0])
    with pytest.raises(ValueError, match=rf"000001.tar: embedding of key '{key}' is not finite"):
        embed_shards(str(data), str(tmp_path / "emb"), bad)
    out = next((tmp_path / "emb").iterdir())
    assert sorted(os.listdir(out)) == ["000000.parquet"]  # the bad shard wrote nothing
