"""Training loader (pipeline.data): shards joined with embeddings, batches, DDP splits.

HF_HUB_OFFLINE=1 python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data import TrainDataConfig, decode_image, make_loader
from pipeline.embed import embed_shards, read_embeddings
from pipeline.tinymodels import build_tiny_t5

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_filtered_shards(root: Path, num_shards: int, per_shard: int) -> list[str]:
    """Filtered-shard layout: NNNNNN.tar with KEY.png/.txt/.json, plus manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    keys = []
    for s in range(num_shards):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                keys.append(key)
                caption = f"a shape number {i}" + " on a gray background" * (i % 3)
                # Non-square, larger than image_size: exercises short-side resize + crop.
                pixels = rng.integers(0, 256, size=(24 + 2 * i, 36, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, "PNG")
                meta = json.dumps({"key": key, "caption": caption}).encode()
                for ext, data in (
                    ("png", buf.getvalue()),
                    ("txt", caption.encode()),
                    ("json", meta),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    manifest = {"shards": [f"{s:06d}.tar" for s in range(num_shards)], "samples": len(keys)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return keys


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 shards x 5 samples, embedded with a tiny T5: (data dir, embeddings dir, keys, id)."""
    root = tmp_path_factory.mktemp("data")
    t5 = build_tiny_t5(str(root / "tiny-t5"))
    keys = write_filtered_shards(root / "filtered", num_shards=4, per_shard=5)
    out = embed_shards(str(root / "filtered"), str(root / "emb"), t5, max_length=32)
    return str(root / "filtered"), out["output"], keys, out["encoder_id"]


def config(dataset, **kw) -> TrainDataConfig:
    data, emb, _, _ = dataset
    return TrainDataConfig(
        **{"data": data, "embeddings": emb, "image_size": 16, "batch_size": 4, **kw}
    )


def stored_embeddings(emb_dir: str) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(emb_dir)):
        out.update(read_embeddings(os.path.join(emb_dir, name))[0])
    return out


def test_batch_contract(dataset):
    _, emb_dir, keys, encoder_id = dataset
    loader = make_loader(config(dataset, expected_encoder_id=encoder_id, lowres_size=8))
    batch = next(iter(loader))
    assert set(batch) == {"image", "lowres", "text_embeds", "text_mask", "keys"}
    image, lowres, embeds, mask = (
        batch[k] for k in ("image", "lowres", "text_embeds", "text_mask")
    )
    assert image.shape == (4, 3, 16, 16) and image.dtype == torch.float32
    assert lowres.shape == (4, 3, 8, 8) and lowres.dtype == torch.float32
    assert -1.0 <= image.min() < -0.5 and 0.5 < image.max() <= 1.0
    assert lowres.min() >= -1.0 and lowres.max() <= 1.0
    assert embeds.dtype == torch.float32 and mask.dtype == torch.bool
    assert embeds.shape[:2] == mask.shape and embeds.shape[2] == 32
    stored = stored_embeddings(emb_dir)
    lengths = [len(stored[k]) for k in batch["keys"]]
    assert mask.sum(1).tolist() == lengths and mask.shape[1] == max(lengths)
    for i, key in enumerate(batch["keys"]):
        assert key in keys
        n = lengths[i]
        np.testing.assert_array_equal(embeds[i, :n].numpy(), stored[key].astype(np.float32))
        assert not embeds[i, n:].any()


def test_loader_is_endless_deterministic_and_covers_every_key(dataset):
    _, _, keys, _ = dataset
    cfg = config(dataset, batch_size=5, seed=3)
    first = list(islice(iter(make_loader(cfg)), 8))  # two epochs of 20 samples
    again = list(islice(iter(make_loader(cfg)), 8))
    other = list(islice(iter(make_loader(config(dataset, batch_size=5, seed=4))), 8))
    flat = [k for b in first for k in b["keys"]]
    assert sorted(flat[:20]) == sorted(keys) and sorted(flat[20:]) == sorted(keys)
    assert flat[:20] != flat[20:]  # reshuffled per epoch
    assert [b["keys"] for b in first] == [b["keys"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again, strict=True))
    assert [k for b in other for k in b["keys"]] != flat
    assert "lowres" not in first[0]
    assert len({b["text_mask"].shape[1] for b in first}) > 1  # padded per batch, not to 32


@pytest.mark.parametrize("num_shards", [4, 1])
def test_two_ranks_see_disjoint_keys(tmp_path, dataset, num_shards):
    """4 shards: split by shard. 1 shard: split by sample index (fewer shards than ranks)."""
    data, emb, keys, _ = dataset
    cfg = config(dataset, batch_size=2)
    if num_shards == 1:
        only = tmp_path / "one"
        only.mkdir()
        os.symlink(os.path.join(data, "000002.tar"), only / "000002.tar")
        cfg = TrainDataConfig(data=str(only), embeddings=emb, image_size=16, batch_size=2)
        keys = [k for k in keys if k.startswith("00002")]
    seen = []
    for rank in range(2):
        batches = islice(iter(make_loader(cfg, rank=rank, world_size=2)), 2 * len(keys))
        seen.append({k for b in batches for k in b["keys"]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(keys)
    assert abs(len(seen[0]) - len(seen[1])) <= len(keys) // 2


def test_encoder_mismatch_is_refused(dataset):
    with pytest.raises(ValueError, match="expects 'other-t5@sha256:0'"):
        make_loader(config(dataset, expected_encoder_id="other-t5@sha256:0"))


def test_embeddings_parent_dir_is_accepted(dataset):
    cfg = config(dataset, embeddings=os.path.dirname(dataset[1]))
    assert next(iter(make_loader(cfg)))["image"].shape == (4, 3, 16, 16)


def test_keys_missing_from_parquet_are_skipped_and_counted(tmp_path, dataset, caplog):
    data, emb, keys, _ = dataset
    partial = tmp_path / "emb"
    partial.mkdir()
    for name in os.listdir(emb):
        table = pq.read_table(os.path.join(emb, name))
        if name == "000000.parquet":
            table = table.slice(0, 3)  # drop two keys; metadata stays
        pq.write_table(table, partial / name)
    cfg = TrainDataConfig(data=data, embeddings=str(partial), image_size=16, batch_size=6)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        got = [k for b in islice(iter(make_loader(cfg)), 3) for k in b["keys"]]
    assert set(got) == set(keys) - {"000000003", "000000004"}
    assert "000000.tar: skipped 2 of 5 samples (2 without embedding" in caplog.text


def test_worker_processes_split_the_stream(dataset):
    _, _, keys, _ = dataset
    batches = list(islice(iter(make_loader(config(dataset, num_workers=2, batch_size=5))), 4))
    flat = [k for b in batches for k in b["keys"]]
    assert sorted(flat) == sorted(keys)  # one epoch across both workers, no duplicates


def test_decode_image_exact_values(dataset):
    pixels = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    plain = decode_image(buf.getvalue(), config(dataset, random_flip=False), random.Random(0))
    torch.testing.assert_close(plain["image"], expected, rtol=0, atol=1e-6)
    cfg = config(dataset, random_flip=True)
    flips = [decode_image(buf.getvalue(), cfg, random.Random(s))["image"] for s in range(8)]
    assert any(torch.equal(f, expected) for f in flips)
    assert any(torch.allclose(f, expected.flip(-1), atol=1e-6) for f in flips)
    # Solid colour survives resize + crop exactly: the value map is pixel / 127.5 - 1.
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (255, 0, 51)).save(buf, "PNG")
    out = decode_image(buf.getvalue(), config(dataset, lowres_size=4), random.Random(0))
    for t, side in ((out["image"], 16), (out["lowres"], 4)):
        assert t.shape == (3, side, side)
        torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, -0.6]), rtol=0, atol=1e-6)
        assert t.std(dim=(1, 2)).max() < 1e-6


def test_config_validation(dataset):
    with pytest.raises(ValueError, match="lowres_size"):
        config(dataset, lowres_size=16)
    with pytest.raises(ValueError, match="rank 2"):
        make_loader(config(dataset), rank=2, world_size=2)
    with pytest.raises(ValueError, match="no NNNNNN.tar shards in /nonexistent-dir"):
        make_loader(TrainDataConfig(data="/nonexistent-dir", embeddings=dataset[1]))
