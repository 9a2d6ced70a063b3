"""Caption embedding step (pipeline.embed) on hand-written filtered shards and a tiny T5.

HF_HUB_OFFLINE=1 python -m pytest tests/test_embed.py -q
"""

from __future__ import annotations

import io
import json
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
from pipeline.embed import embed_shards, encoder_slug, read_embeddings, read_metadata
from pipeline.tinymodels import build_tiny_t5

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
    manifest = {"shards": [f"{s:06d}.tar" for s in range(num_shards)], "samples": len(captions)}
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
    assert out == {
        "output": str(tmp_path / "emb" / encoder_slug(enc.encoder_id)),
        "encoder_id": enc.encoder_id,
        "shards": 2,
        "samples": 12,
        "skipped": 0,
    }
    files = sorted(os.listdir(out["output"]))
    assert files == ["000000.parquet", "000001.parquet"]  # no temp files left behind
    table = pq.read_table(Path(out["output"]) / "000001.parquet")
    assert table.schema.field("__key__").type == pa.string()
    assert table.schema.field("num_tokens").type == pa.int32()
    assert table.schema.field("embedding").type == pa.list_(pa.list_(pa.float16(), 32))
    with tarfile.open(data / "000001.tar") as tar:
        tar_keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
    assert table.column("__key__").to_pylist() == tar_keys
    meta = read_metadata(str(Path(out["output"]) / "000001.parquet"))
    assert meta == {
        "encoder_id": enc.encoder_id,
        "encoder_name": t5_dir,
        "max_length": 16,
        "dtype": "float32",
        "storage_dtype": "float16",
        "code_version": "embed-v1",
        "source_shard": "000001.tar",
        "source_size": (data / "000001.tar").stat().st_size,
        "dim": 32,
        "num_samples": 6,
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
    vectors, _ = read_embeddings(str(Path(out["output"]) / "000000.parquet"))
    assert list(vectors) == ["a"] and out["samples"] == 1
