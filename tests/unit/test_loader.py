"""Training loader (pipeline.data.loader): shards joined with embeddings, batches, DDP splits, resume.

HF_HUB_OFFLINE=1 python -m pytest tests/unit/test_loader.py -q
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data.batch import collate, to_device
from pipeline.data.crops import TooSmall, decode_image
from pipeline.data.embed import embed_shards
from pipeline.data.embeddings import read_embeddings
from pipeline.data.loader import TrainDataConfig, make_loader
from pipeline.dev.tinymodels import build_tiny_t5

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sample_png(s: int, i: int) -> bytes:
    """Non-square, larger than image_size (exercises resize + crop), unique per key."""
    rng = np.random.default_rng([s, i])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(24 + 2 * i, 36, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample_members(s: int, i: int, image: bytes | None = None) -> list[tuple[str, bytes]]:
    key = f"{s:05d}{i:04d}"
    caption = f"a shape number {i}" + " on a gray background" * (i % 3)
    meta = json.dumps({"key": key, "caption": caption}).encode()
    return [(f"{key}.png", image or sample_png(s, i)), (f"{key}.txt", caption.encode()),
            (f"{key}.json", meta)]  # fmt: skip


def write_filtered_shards(root: Path, num_shards: int, per_shard: int) -> list[str]:
    """The filter step's layout: NNNNNN.tar (KEY.png/.txt/.json) and its manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        write_tar(root / f"{s:06d}.tar", [m for i in range(per_shard) for m in sample_members(s, i)])
    counts = {f"{s:06d}.tar": per_shard for s in range(num_shards)}
    total = num_shards * per_shard
    manifest = {"format": "imagen-pipeline/filtered-shards/v1", "shards": counts,
                "input_rows": total, "kept": total, "rejected": 0, "rejects": {}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return [f"{s:05d}{i:04d}" for s in range(num_shards) for i in range(per_shard)]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> str:
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5") / "tiny-t5"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, t5_dir):
    """4 shards x 5 samples, embedded with a tiny T5: (data dir, embeddings dir, keys, id)."""
    root = tmp_path_factory.mktemp("data")
    keys = write_filtered_shards(root / "filtered", num_shards=4, per_shard=5)
    out = embed_shards(str(root / "filtered"), str(root / "emb"), t5_dir, max_length=32)
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


def take(cfg: TrainDataConfig, n: int, rank: int = 0, world_size: int = 1) -> list[dict]:
    return list(islice(iter(make_loader(cfg, rank, world_size)), n))


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_batch_contract(dataset):
    _, emb_dir, keys, encoder_id = dataset
    cfg = config(dataset, expected_encoder_id=encoder_id, expected_dim=32,
                 expected_max_length=32, lowres_crop_size=8)  # fmt: skip
    batch = take(cfg, 1)[0]
    assert set(batch) == {"image", "lowres", "text_embeds", "text_mask", "keys"}
    image, lowres, embeds, mask = (
        batch[k] for k in ("image", "lowres", "text_embeds", "text_mask")
    )
    # What crosses to the training process: the stored bytes, uint8 pixels and float16 text.
    assert image.shape == (4, 3, 16, 16) and image.dtype == torch.uint8
    assert image.is_contiguous() and lowres.is_contiguous()
    assert lowres.shape == (4, 3, 8, 8) and lowres.dtype == torch.uint8
    assert image.min() < 64 and image.max() > 192  # the fixture's noise spans the byte range
    assert embeds.dtype == torch.float16 and mask.dtype == torch.bool
    assert embeds.shape[:2] == mask.shape and embeds.shape[2] == 32
    stored = stored_embeddings(emb_dir)
    lengths = [len(stored[k]) for k in batch["keys"]]
    assert mask.sum(1).tolist() == lengths and mask.shape[1] == max(lengths)
    for i, key in enumerate(batch["keys"]):
        assert key in keys
        n = lengths[i]
        np.testing.assert_array_equal(embeds[i, :n].numpy(), stored[key])
        assert not embeds[i, n:].any()
    # On the device (here the CPU): float32, pixels in [-1, 1], the rest passed through.
    dev = to_device(batch, torch.device("cpu"))
    assert dev["image"].dtype == dev["lowres"].dtype == dev["text_embeds"].dtype == torch.float32
    assert -1.0 <= dev["image"].min() < -0.5 and 0.5 < dev["image"].max() <= 1.0
    assert dev["keys"] is batch["keys"] and torch.equal(dev["text_mask"], mask)
    torch.testing.assert_close(dev["text_embeds"], embeds.float(), rtol=0, atol=0)


def test_pad_text_to_gives_every_batch_one_shape(dataset):
    """Static shapes for a compiled step: every batch's text is padded to pad_text_to tokens."""
    _, emb_dir, _, _ = dataset
    stored = stored_embeddings(emb_dir)
    longest = max(len(v) for v in stored.values())
    assert longest == 25  # the fixture's captions are all shorter than max_tokens=32: not cut
    batches = take(config(dataset, batch_size=5, max_tokens=32, pad_text_to=40), 4)
    for batch in batches:
        assert batch["text_embeds"].shape == (5, 40, 32) and batch["text_mask"].shape == (5, 40)
        lengths = [len(stored[k]) for k in batch["keys"]]
        assert batch["text_mask"].sum(1).tolist() == lengths
        for i, n in enumerate(lengths):
            np.testing.assert_array_equal(batch["text_embeds"][i, :n].numpy(), stored[batch["keys"][i]])
            assert not batch["text_embeds"][i, n:].any()
    # A caption longer than max_tokens is cut to it, then padded: 3 real tokens, 40 columns.
    cut = take(config(dataset, batch_size=5, max_tokens=3, pad_text_to=40), 1)[0]
    assert cut["text_mask"].shape == (5, 40) and cut["text_mask"].sum(1).tolist() == [3] * 5
    with pytest.raises(ValueError, match="pad_text_to 16 is below max_tokens 32"):
        config(dataset, max_tokens=32, pad_text_to=16)
    long = {"image": np.zeros((2, 2, 3), np.uint8), "text_embeds": np.ones((5, 2), np.float16), "key": "k"}
    with pytest.raises(ValueError, match="5 tokens does not fit pad_text_to=4"):
        collate([long], pad_text_to=4)


def _float_collate_reference(samples: list[dict]) -> dict:
    """The float32 batch collate made before batches crossed as uint8 (its exact arithmetic)."""
    def images(arrays):
        h, w, _ = arrays[0].shape
        out = torch.empty((len(arrays), 3, h, w), dtype=torch.float32)
        for i, a in enumerate(arrays):
            torch.sub(torch.from_numpy(a).permute(2, 0, 1), 127.5, out=out[i]).div_(127.5)
        return out

    lengths = [s["text_embeds"].shape[0] for s in samples]
    embeds = np.zeros((len(samples), max(lengths), samples[0]["text_embeds"].shape[1]), np.float32)
    for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        embeds[i, :n] = s["text_embeds"]
    return {"image": images([s["image"] for s in samples]), "lowres": images([s["lowres"] for s in samples]),
            "text_embeds": torch.from_numpy(embeds)}


def ramp_samples() -> list[dict]:
    """4 samples whose pixels cover all 256 byte values, captions of 3, 7, 1 and 5 tokens."""
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate((3, 7, 1, 5)):
        image = np.roll(np.arange(256 * 3, dtype=np.int64) % 256, i * 17).astype(np.uint8).reshape(16, 16, 3)
        lowres = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        embeds = rng.standard_normal((n, 32)).astype(np.float16)
        out.append({"image": image, "lowres": lowres, "text_embeds": embeds, "key": f"k{i}"})
    return out


def test_to_device_is_bitwise_the_old_float_batch_from_a_quarter_of_the_bytes():
    samples = ramp_samples()
    batch = collate(samples)
    reference = _float_collate_reference(samples)
    dev = to_device(batch, torch.device("cpu"))
    for name in ("image", "lowres", "text_embeds"):
        assert dev[name].dtype == reference[name].dtype == torch.float32
        assert dev[name].shape == reference[name].shape
        assert torch.equal(dev[name].view(torch.int32), reference[name].view(torch.int32)), name  # bitwise
    assert dev["image"].min() == -1.0 and dev["image"].max() == 1.0  # 0 and 255, exactly
    assert dev["image"].is_contiguous()
    # The bytes that cross from a worker (and to the GPU): 4 images of 3x16x16, 7 tokens x 32.
    assert batch["image"].nbytes == 3072 and reference["image"].nbytes == 4 * 3072
    assert batch["lowres"].nbytes == 768 and reference["lowres"].nbytes == 4 * 768
    assert batch["text_embeds"].nbytes == 4 * 7 * 32 * 2 and reference["text_embeds"].nbytes == 2 * 1792
    # channels_last: same values, NHWC memory.
    last = to_device(batch, torch.device("cpu"), channels_last=True)
    assert last["image"].is_contiguous(memory_format=torch.channels_last)
    assert not last["image"].is_contiguous()
    assert torch.equal(last["image"], reference["image"]) and torch.equal(last["lowres"], reference["lowres"])
    again = to_device(dev, torch.device("cpu"))  # marked as normalised: a second pass keeps the values
    assert torch.equal(again["image"], reference["image"])
    unmarked = {k: v for k, v in dev.items() if k != "pixels"}
    with pytest.raises(TypeError, match=r"batch\['image'\] is torch.float32; it takes collate's uint8"):
        to_device(unmarked, torch.device("cpu"))  # float pixels of unknown scale are refused
    # a CPU run normalises in the workers (the same arithmetic), and to_device passes them through
    in_workers = collate(samples, normalize=True)
    assert in_workers["pixels"] == "float" and in_workers["image"].dtype == torch.float32
    for name in ("image", "lowres"):
        assert torch.equal(in_workers[name].view(torch.int32), reference[name].view(torch.int32)), name
        assert torch.equal(to_device(in_workers, torch.device("cpu"))[name], reference[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_on_cuda_matches_the_cpu_bitwise():
    """CUDA divides by a host scalar as a multiply by its reciprocal (an ulp off for 126 of 256
    byte values); to_device divides by a device tensor, so the GPU gets the CPU's floats."""
    batch = collate(ramp_samples())
    cpu = to_device(batch, torch.device("cpu"))
    pinned = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
    gpu = to_device(pinned, torch.device("cuda"), channels_last=True)
    assert gpu["image"].is_cuda and gpu["image"].is_contiguous(memory_format=torch.channels_last)
    for name in ("image", "lowres", "text_embeds"):
        assert torch.equal(gpu[name].cpu().view(torch.int32), cpu[name].view(torch.int32)), name
    assert gpu["text_mask"].is_cuda and gpu["keys"] == ["k0", "k1", "k2", "k3"]


def test_images_are_the_keys_own_pixels(dataset):
    """No flip, 36-wide image cropped to its centre: the batch holds exactly that key's pixels."""
    cfg = config(dataset, image_size=24, random_flip=False, batch_size=5)
    for batch in take(cfg, 4):
        for key, image in zip(batch["keys"], batch["image"], strict=True):
            s, i = int(key[:5]), int(key[5:])
            if i != 0:
                continue  # only sample 0 is 24 px high: no resize, exact pixels
            pixels = np.asarray(Image.open(io.BytesIO(sample_png(s, i))))[:, 6:30]
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels)


def short_side(key: str) -> int:
    """The fixture's image of ``key`` is (24 + 2 i) x 36 px."""
    return min(24 + 2 * int(key[5:]), 36)


def test_stage_leaves_out_images_smaller_than_it(dataset):
    """A 28 px stage never sees the 24 and 26 px high images: they are out of the plan (counted),
    not upscaled; the others are all read, each once per epoch."""
    _, _, keys, _ = dataset
    cfg = config(dataset, image_size=28, batch_size=4, random_flip=False)
    loader = make_loader(cfg)
    big = [k for k in keys if short_side(k) >= 28]
    assert loader.data_counts == {"data_samples": len(big), "data_excluded_too_small": len(keys) - len(big)} \
        == {"data_samples": 12, "data_excluded_too_small": 8}
    flat = keys_of(list(islice(iter(loader), 6)))  # two epochs of 12
    assert sorted(flat[:12]) == sorted(big) and sorted(flat[12:]) == sorted(big)
    with pytest.raises(ValueError, match="at least 40 px"):
        make_loader(config(dataset, image_size=40))


def test_without_recorded_sides_small_images_are_skipped_not_upscaled(dataset, tmp_path, caplog):
    """Embeddings written before ``image_side`` existed: the decoder catches the small images."""
    data, emb, keys, _ = dataset
    old = tmp_path / "old"
    old.mkdir()
    for name in os.listdir(emb):
        table = pq.read_table(os.path.join(emb, name))
        pq.write_table(table.drop_columns(["image_side"]), old / name)
    cfg = TrainDataConfig(data=data, embeddings=str(old), image_size=28, batch_size=5, random_flip=False)
    loader = make_loader(cfg)
    assert loader.data_counts == {"data_samples": 20, "data_excluded_too_small": 0}  # unknown up front
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batches = list(islice(iter(loader), 4))
    assert all(short_side(k) >= 28 for k in keys_of(batches))  # gaps filled from the same batch
    assert all(b["image"].shape == (5, 3, 28, 28) for b in batches)
    assert "smaller than this stage's 28 px: never upscaled" in caplog.text
    with pytest.raises(TooSmall):
        decode_image(sample_png(0, 0), cfg)


def test_sr_stage_trains_on_random_crops_with_lowres_from_the_same_crop(dataset, tmp_path, monkeypatch):
    """Short side to 24, a random 16 px crop, its 8 px input by area averaging (2x2 means)."""
    monkeypatch.setenv("IMAGEN_DATA_AUDIT", str(tmp_path / "audit"))
    cfg = config(dataset, image_size=24, crop_size=16, lowres_crop_size=8, random_crop=True, batch_size=5)
    batches = take(cfg, 8)  # two epochs
    for batch in batches:
        assert batch["image"].shape == (5, 3, 16, 16) and batch["lowres"].shape == (5, 3, 8, 8)
        means = batch["image"].float().reshape(5, 3, 8, 2, 8, 2).mean(dim=(3, 5))
        assert (means - batch["lowres"].float()).abs().max() <= 1.0
    # random crops: two epochs give the same key different crops
    first = {}
    differs = 0
    for batch in batches:
        for key, image in zip(batch["keys"], batch["image"], strict=True):
            if key in first:
                differs += not torch.equal(first[key], image)
            first.setdefault(key, image)
    assert differs > 0
    lines = [json.loads(x) for f in (tmp_path / "audit").iterdir() for x in f.read_text().splitlines()]
    assert len(lines) == 40 and all(min(x["stored"]) >= 24 and x["crop"] == [16, 16] for x in lines)


def test_crop_must_fit_the_stage():
    with pytest.raises(ValueError, match="crop_size 32"):
        TrainDataConfig(data="d", embeddings="e", image_size=16, crop_size=32)
    with pytest.raises(ValueError, match="lowres_crop_size 16"):
        TrainDataConfig(data="d", embeddings="e", image_size=32, crop_size=16, lowres_crop_size=16)


def test_loader_is_endless_deterministic_and_covers_every_key(dataset):
    _, _, keys, _ = dataset
    cfg = config(dataset, batch_size=5, seed=3)
    first = take(cfg, 8)  # two epochs of 20 samples
    again = take(cfg, 8)
    other = take(config(dataset, batch_size=5, seed=4), 8)
    flat = keys_of(first)
    assert sorted(flat[:20]) == sorted(keys) and sorted(flat[20:]) == sorted(keys)
    assert flat[:20] != flat[20:]  # reshuffled per epoch
    assert [b["keys"] for b in first] == [b["keys"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again, strict=True))
    assert keys_of(other) != flat
    assert "lowres" not in first[0]
    assert len({b["text_mask"].shape[1] for b in first}) > 1  # padded per batch (no pad_text_to)
    # Windows of 2 shards: the first 10 samples come from 2 shards, 5 from each.
    window = config(dataset, batch_size=5, seed=3, shuffle_shards=2)
    shards = [k[:5] for k in keys_of(take(window, 2))]
    assert len(set(shards)) == 2 and all(shards.count(s) == 5 for s in set(shards))


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
    seen = [set(keys_of(take(cfg, len(keys), rank, 2))) for rank in range(2)]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(keys)
    assert abs(len(seen[0]) - len(seen[1])) <= 1


@pytest.mark.parametrize(("num_workers", "rank", "world"), [(0, 0, 1), (2, 1, 2)])
def test_start_batch_resumes_exactly(dataset, monkeypatch, num_workers, rank, world):
    """Batches k, k+1, ... of a fresh stream equal those at start_batch=k, across epochs."""
    cfg = config(dataset, num_workers=num_workers, seed=5, random_crop=True, lowres_crop_size=8)
    full = take(cfg, 13, rank, world)
    decoded = []
    if num_workers == 0:  # count decodes in-process: skipped batches must cost none
        real = decode_image
        monkeypatch.setattr("pipeline.data.loader.decode_image", lambda *a: decoded.append(1) or real(*a))
    for k in (1, 6, 11):
        resumed = take(TrainDataConfig(**{**vars(cfg), "start_batch": k}), 13 - k, rank, world)
        for a, b in zip(full[k:], resumed, strict=True):
            assert a["keys"] == b["keys"]
            for name in ("image", "lowres", "text_embeds", "text_mask"):
                assert torch.equal(a[name], b[name]), (k, name)
    if num_workers == 0:
        assert len(decoded) == 4 * (12 + 7 + 2)
    # Random crops and flips really vary: the same key is augmented differently per epoch.
    crops = {}
    for batch in full:
        for key, image in zip(batch["keys"], batch["image"], strict=True):
            crops.setdefault(key, []).append(image)
    assert any(not torch.equal(v[0], v[1]) for v in crops.values() if len(v) > 1)


def test_worker_processes_split_the_stream(dataset):
    _, _, keys, _ = dataset
    flat = keys_of(take(config(dataset, num_workers=2, batch_size=5), 4))
    assert sorted(flat) == sorted(keys)  # one epoch across both workers, no duplicates


def test_mismatched_embeddings_are_refused(tmp_path, dataset):
    with pytest.raises(ValueError, match="expects 'other-t5@sha256:0'"):
        make_loader(config(dataset, expected_encoder_id="other-t5@sha256:0"))
    with pytest.raises(ValueError, match="dim=32, but this run expects 4096"):
        make_loader(config(dataset, expected_dim=4096))
    with pytest.raises(ValueError, match="max_length=32, but this run expects 128"):
        make_loader(config(dataset, expected_max_length=128))
    # The same weights in a folder of another name are the same encoder.
    renamed = "copied-t5@sha256:" + dataset[3].rsplit(":", 1)[1]
    assert take(config(dataset, expected_encoder_id=renamed), 1)[0]["image"].shape[0] == 4
    # One shard from another encoder among good ones: refused at start, naming that file.
    mixed = tmp_path / "emb"
    shutil.copytree(dataset[1], mixed)
    table = pq.read_table(mixed / "000002.parquet")
    meta = {**table.schema.metadata, b"encoder_id": b"other@sha256:1"}
    pq.write_table(table.replace_schema_metadata(meta), mixed / "000002.parquet")
    with pytest.raises(ValueError, match=r"000002.parquet: embeddings .* differ from"):
        make_loader(config(dataset, embeddings=str(mixed)))


def test_embeddings_parent_dir_is_accepted(dataset):
    cfg = config(dataset, embeddings=os.path.dirname(dataset[1]))
    assert take(cfg, 1)[0]["image"].shape == (4, 3, 16, 16)


def test_missing_keys_both_ways_are_counted_and_skipped(tmp_path, dataset, caplog):
    """Shard 0 lost 2 parquet rows; shard 1's tar lost key 00001 0002 after embedding."""
    data, emb, keys, _ = dataset
    partial, tars = tmp_path / "emb", tmp_path / "data"
    shutil.copytree(emb, partial)
    shutil.copytree(data, tars)
    table = pq.read_table(partial / "000000.parquet")
    pq.write_table(table.slice(0, 3), partial / "000000.parquet")  # metadata still says 5
    write_tar(tars / "000001.tar", [m for i in (0, 1, 3, 4) for m in sample_members(1, i)])
    cfg = TrainDataConfig(data=str(tars), embeddings=str(partial), image_size=16, batch_size=6)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batches = take(cfg, 6)  # 18 slots per epoch, two epochs
    gone = {"000000003", "000000004", "000010002"}
    assert set(keys_of(batches)) == set(keys) - gone
    assert all(len(b["keys"]) == 6 == b["image"].shape[0] for b in batches)
    assert "000000.tar: skipped keys: 2 in the tar without embedding" in caplog.text
    assert "000001.tar: skipped keys: 1 embedded but not in the tar" in caplog.text


def test_undecodable_image_is_skipped_and_counted(tmp_path, t5_dir, caplog):
    root = tmp_path / "filtered"
    write_filtered_shards(root, num_shards=1, per_shard=4)
    members = [m for i in range(4) for m in sample_members(0, i, b"not a png" if i == 2 else None)]
    write_tar(root / "000000.tar", members)
    out = embed_shards(str(root), str(tmp_path / "emb"), t5_dir, max_length=16)
    cfg = TrainDataConfig(data=str(root), embeddings=out["output"], image_size=16, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batches = take(cfg, 3)
    assert all(b["image"].shape[0] == 4 for b in batches)
    assert set(keys_of(batches)) == {"000000000", "000000001", "000000003"}
    assert caplog.text.count("skipping key 000000002, undecodable image") == 3


def test_shard_rewritten_in_place_is_reindexed(tmp_path, dataset, caplog):
    """Same members in another order (same size): recorded offsets are stale, names catch it."""
    data, emb, _, _ = dataset
    tars = tmp_path / "data"
    shutil.copytree(data, tars)
    write_tar(tars / "000003.tar", [m for i in (4, 3, 2, 1, 0) for m in sample_members(3, i)])
    assert (tars / "000003.tar").stat().st_size == os.path.getsize(os.path.join(data, "000003.tar"))
    cfg = TrainDataConfig(data=str(tars), embeddings=emb, image_size=24, batch_size=5,
                          random_flip=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batches = take(cfg, 4)
    assert "re-indexing the tar" in caplog.text
    index = keys_of(batches).index("000030000")
    image = torch.cat([b["image"] for b in batches])[index]
    pixels = np.asarray(Image.open(io.BytesIO(sample_png(3, 0))))[:, 6:30]
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), pixels)


def test_decode_image_exact_values(dataset):
    pixels = np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    plain = decode_image(buf.getvalue(), config(dataset, random_flip=False))["image"]
    np.testing.assert_array_equal(plain, pixels)
    cfg = config(dataset, random_flip=True)
    np.testing.assert_array_equal(decode_image(buf.getvalue(), cfg, (0, 0, 0.7))["image"], pixels)
    np.testing.assert_array_equal(decode_image(buf.getvalue(), cfg, (0, 0, 0.2))["image"],
                                  pixels[:, ::-1])  # fmt: skip
    # Random crop of a 16x20 image to 16: the x draw picks the column offset 0..4.
    wide = np.random.default_rng(2).integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    crop = config(dataset, random_crop=True, random_flip=False)
    for u, left in ((0.0, 0), (0.5, 2), (0.99, 4)):
        got = decode_image(buf.getvalue(), crop, (u, 0.3, 1.0))["image"]
        np.testing.assert_array_equal(got, wide[:, left : left + 16])
    # Solid colour survives resize + crop exactly; to_device maps pixel p to p / 127.5 - 1.
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (255, 0, 51)).save(buf, "PNG")
    out = decode_image(buf.getvalue(), config(dataset, lowres_crop_size=4))
    batch = collate([{**out, "text_embeds": np.zeros((1, 2), np.float16), "key": "k"}])
    assert batch["image"][0, :, 0, 0].tolist() == [255, 0, 51]
    batch = to_device(batch, torch.device("cpu"))
    for t, side in ((batch["image"][0], 16), (batch["lowres"][0], 4)):
        assert t.shape == (3, side, side)
        torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, -0.6]), rtol=0, atol=1e-6)
        assert t.std(dim=(1, 2)).max() < 1e-6
    assert batch["image"].max() == 1.0 and batch["image"].min() == -1.0  # exactly, no overshoot
    # Every byte value maps to p / 127.5 - 1, within float32 rounding.
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    got = to_device(collate([{"image": ramp, "text_embeds": np.zeros((1, 2), np.float16), "key": "r"}]),
                    torch.device("cpu"))  # fmt: skip
    expected = torch.from_numpy(ramp).permute(2, 0, 1).double() / 127.5 - 1
    torch.testing.assert_close(got["image"][0].double(), expected, rtol=0, atol=1e-7)


def test_config_validation(dataset):
    with pytest.raises(ValueError, match="lowres_crop_size"):
        config(dataset, lowres_crop_size=16)
    with pytest.raises(ValueError, match="start_batch must be >= 0"):
        config(dataset, start_batch=-1)
    with pytest.raises(ValueError, match="rank 2"):
        make_loader(config(dataset), rank=2, world_size=2)
    with pytest.raises(ValueError, match="no NNNNNN.tar shards in /nonexistent-dir"):
        make_loader(TrainDataConfig(data="/nonexistent-dir", embeddings=dataset[1]))

