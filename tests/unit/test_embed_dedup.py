"""Each distinct caption is encoded once (issue 27 item 6): grouped within a shard, and kept in a
content-addressed cache (pipeline.data.caption_cache) keyed by the caption and the encoder identity.

HF_HUB_OFFLINE=1 python -m pytest tests/unit/test_embed_dedup.py -q
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagen.text import T5TextEncoder, pins_weights
from pipeline.data.caption_cache import (
    CACHE_DIR,
    CaptionCache,
    CorruptEntry,
    caption_dedup_saving,
    caption_key,
    identity_key,
    pack_entry,
    unpack_entry,
)
from pipeline.data.embed import embed_shards, encode_captions, encoder_identity, encoder_slug
from pipeline.data.embeddings import read_embeddings
from pipeline.dev.tinymodels import build_tiny_t5

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Web-like alt texts: a few repeat a lot, within a shard and across shards.
SHARDS = [
    ["a red circle", "image", "a red circle", "photo of a blue square", "image", "stock photo"],
    ["image", "a green triangle on a white background", "stock photo", "a red circle", "image"],
    ["stock photo", "image", "a purple square", "a purple square"],
]


def write_shards(root: Path, shards: list[list[str]] = SHARDS) -> dict[str, str]:
    """Filtered shards NNNNNN.tar (KEY.png/.txt/.json) with these captions; returns {key: caption}."""
    root.mkdir(parents=True, exist_ok=True)
    captions = {}
    for s, texts in enumerate(shards):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for i, caption in enumerate(texts):
                key = f"{s:05d}{i:04d}"
                captions[key] = caption
                buf = io.BytesIO()
                Image.new("RGB", (16 + i, 16), (30 * i, 20 * s, 90)).save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps({"key": key}).encode())):  # fmt: skip
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return captions


class CountingEncoder(T5TextEncoder):
    """The tiny T5, recording every caption (as token ids) that reaches the forward pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.forwarded: list[tuple[int, ...]] = []

    def encode_ids(self, ids):
        self.forwarded.extend(tuple(x) for x in ids)
        return super().encode_ids(ids)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> str:
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5") / "tiny-t5"))


@pytest.fixture
def data(tmp_path) -> tuple[Path, dict[str, str]]:
    return tmp_path / "filtered", write_shards(tmp_path / "filtered")


def encoder(t5_dir: str, **kwargs) -> CountingEncoder:
    return CountingEncoder(t5_dir, **{"max_length": 16, "device": "cpu", **kwargs})


def all_vectors(out_dir: str) -> dict[str, np.ndarray]:
    found = {}
    for name in sorted(os.listdir(out_dir)):
        found.update(read_embeddings(os.path.join(out_dir, name))[0])
    return found


def cache_entries(root: Path) -> list[Path]:
    return sorted((root / CACHE_DIR).rglob("*.emb"))


def test_identical_captions_are_encoded_once_across_shards(tmp_path, t5_dir, data):
    src, captions = data
    enc = encoder(t5_dir)
    out = embed_shards(str(src), str(tmp_path / "emb"), enc, batch_size=3)
    distinct = sorted(set(captions.values()))
    assert sorted(enc.forwarded) == sorted(tuple(x) for x in enc.token_ids(distinct))  # each one once
    dedup = out["caption_dedup"]
    assert (dedup["captions"], dedup["captions_encoded"]) == (len(captions), len(distinct))
    # a shard's first sight of a caption another shard already encoded is a cache hit
    per_shard_distinct = sum(len(set(texts)) for texts in SHARDS)
    assert dedup["distinct"] == per_shard_distinct and dedup["cache_hits"] == per_shard_distinct - len(distinct)
    assert len(cache_entries(tmp_path / "emb")) == len(distinct)
    vectors = all_vectors(out["output"])
    assert sorted(vectors) == sorted(captions)  # every row keeps its own key
    for key, caption in captions.items():
        twin = next(k for k, c in captions.items() if c == caption)
        assert np.array_equal(vectors[key], vectors[twin])  # one caption, one set of vectors


def test_output_equals_the_uncached_path(tmp_path, t5_dir, data):
    """Per key, the vectors are those encode_captions gives over every caption of the shard (the
    path before dedup), within float16: only the batches' composition differs."""
    src, captions = data
    enc = encoder(t5_dir)
    out = embed_shards(str(src), str(tmp_path / "emb"), enc, batch_size=3)
    vectors = all_vectors(out["output"])
    keys = sorted(captions)
    flat, lengths, _ = encode_captions(enc, enc.token_ids([captions[k] for k in keys]), 256, 16384)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tol = 2**-10 * max(1.0, float(np.abs(flat).max()))  # one float16 step at the largest value
    for i, key in enumerate(keys):
        reference = flat[offsets[i] : offsets[i + 1]].astype(np.float32)
        assert vectors[key].shape == reference.shape
        assert np.abs(vectors[key].astype(np.float32) - reference).max() <= tol, key
    off = embed_shards(str(src), str(tmp_path / "emb-off"), encoder(t5_dir), batch_size=3, caption_cache=False)
    assert off["caption_dedup"]["cache"] is None and not (tmp_path / "emb-off" / CACHE_DIR).exists()
    plain = all_vectors(off["output"])
    assert all(np.abs(plain[k].astype(np.float32) - vectors[k]).max() <= tol for k in keys)


def test_saving_figure_is_the_share_of_tokens_not_encoded(tmp_path, t5_dir, data):
    src, captions = data
    enc = encoder(t5_dir)
    out = embed_shards(str(src), str(tmp_path / "emb"), enc)
    tokens = dict(zip(captions.values(), enc.token_lengths(list(captions.values())), strict=True))
    total = sum(tokens[c] for c in captions.values())
    encoded = sum(tokens[c] for c in set(captions.values()))
    dedup = out["caption_dedup"]
    assert (dedup["tokens"], dedup["tokens_encoded"]) == (total, encoded)
    assert encoded == sum(len(ids) for ids in enc.forwarded)  # what really reached the forward pass
    assert caption_dedup_saving(out) == pytest.approx(1 - encoded / total, abs=1e-4)
    assert caption_dedup_saving(out) > 0.3  # 15 rows, 6 distinct captions
    assert dedup["captions_saving"] == pytest.approx(1 - len(set(captions.values())) / len(captions), abs=1e-4)
    # a rerun over the same output with the parquets gone encodes nothing: all from the cache
    for parquet in Path(out["output"]).glob("*.parquet"):
        parquet.unlink()
    again_enc = encoder(t5_dir)
    again = embed_shards(str(src), str(tmp_path / "emb"), again_enc)
    assert again_enc.forwarded == [] and caption_dedup_saving(again) == 1.0
    assert again["caption_dedup"]["cache_hits"] == again["caption_dedup"]["distinct"]
    skipped = embed_shards(str(src), str(tmp_path / "emb"), encoder(t5_dir))  # nothing left to embed
    assert skipped["skipped"] == len(SHARDS) and caption_dedup_saving(skipped) == 0.0


def test_different_encoder_identity_gives_different_keys(tmp_path, t5_dir, data):
    enc = encoder(t5_dir)
    base = encoder_identity(enc, t5_dir)
    changed = [{**base, "max_length": 32}, {**base, "dtype": "bfloat16"},
               {**base, "encoder_id": base["encoder_id"].replace("@sha256:", "@sha256:0")},
               {**base, "storage_dtype": "float32"}]  # fmt: skip
    keys = {identity_key(i) for i in [base, *changed]}
    assert len(keys) == 1 + len(changed)
    assert len({caption_key(k, "image") for k in keys}) == len(keys)
    assert identity_key({**base, "encoder_name": "/elsewhere/tiny-t5"}) == identity_key(base)  # weights, not path
    src, captions = data
    embed_shards(str(src), str(tmp_path / "emb"), enc)
    shorter = encoder(t5_dir, max_length=12)  # same weights, another token limit: nothing reused
    out = embed_shards(str(src), str(tmp_path / "emb"), shorter)
    assert out["caption_dedup"]["captions_encoded"] == len(shorter.forwarded) == len(set(captions.values()))
    assert len(list((tmp_path / "emb" / CACHE_DIR).iterdir())) == 2  # one folder per identity


def test_corrupt_or_truncated_entries_are_recomputed_never_served(tmp_path, t5_dir, data):
    src, captions = data
    first = embed_shards(str(src), str(tmp_path / "emb"), encoder(t5_dir))
    before = all_vectors(first["output"])
    truncated, flipped, swapped, donor, *_ = cache_entries(tmp_path / "emb")
    truncated.write_bytes(truncated.read_bytes()[:-7])
    raw = bytearray(flipped.read_bytes())
    raw[60] ^= 0x40  # one bit of a vector
    flipped.write_bytes(bytes(raw))
    swapped.write_bytes(donor.read_bytes())  # a whole, valid entry, but of another caption
    for parquet in Path(first["output"]).glob("*.parquet"):
        parquet.unlink()
    enc = encoder(t5_dir)
    again = embed_shards(str(src), str(tmp_path / "emb"), enc)
    assert again["caption_dedup"]["corrupt_entries"] == 3 and again["caption_dedup"]["captions_encoded"] == 3
    assert len(enc.forwarded) == 3
    after = all_vectors(again["output"])
    tol = 2**-10 * max(1.0, max(float(np.abs(v).max()) for v in before.values()))
    assert all(np.abs(after[k].astype(np.float32) - before[k]).max() <= tol for k in captions)
    dim = next(iter(before.values())).shape[1]
    for path in (truncated, flipped, swapped):  # rewritten whole, under their own key
        unpack_entry(path.read_bytes(), bytes.fromhex(path.stem), dim)


def test_entry_checks_reject_every_damage():
    key, other = caption_key("id", "a"), caption_key("id", "b")
    vectors = np.arange(12, dtype=np.float16).reshape(3, 4)
    data = pack_entry(key, vectors)
    assert np.array_equal(unpack_entry(data, key, 4), vectors)
    for bad, dim in ((data[:-1], 4), (data + b"\0", 4), (data[:20], 4), (b"", 4), (data, 8),
                     (data.replace(b"IMGCAPE1", b"IMGCAPE0"), 4)):  # fmt: skip
        with pytest.raises(CorruptEntry):
            unpack_entry(bad, key, dim)
    with pytest.raises(CorruptEntry):
        unpack_entry(data, other, 4)  # a whole entry under another caption's name


def test_concurrent_writers_of_one_key_leave_whole_entries(tmp_path):
    identity = {"encoder_id": "t@sha256:ab", "max_length": 8, "dtype": "float32", "storage_dtype": "float16"}
    captions = [f"caption {i % 7}" for i in range(40)]
    rng = np.random.default_rng(0)
    vectors = {c: rng.standard_normal((3, 4)).astype(np.float16) for c in set(captions)}
    caches = [CaptionCache(str(tmp_path), identity, "t", 4, threads=4) for _ in range(4)]
    threads = [threading.Thread(target=c.put_many, args=(captions, [vectors[x] for x in captions])) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    found, corrupt = caches[0].get_many(sorted(vectors))
    assert corrupt == 0 and all(np.array_equal(found[i], vectors[c]) for i, c in enumerate(sorted(vectors)))
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == len(vectors) and all(p.suffix == ".emb" for p in files)  # no temporaries left


class UnpinnedEncoder(CountingEncoder):
    """The tiny T5 as a hub model whose commit was unknown (``NAME@main``: main may move)."""

    @property
    def encoder_id(self) -> str:
        return "google/t5-v1_1-xxl@main"


def test_an_unpinned_hub_id_gets_no_cache(tmp_path, t5_dir, data):
    assert pins_weights("tiny@sha256:106dc8184e2475bf") and pins_weights("google/t5-v1_1-xxl@" + "a" * 40)
    assert not pins_weights("google/t5-v1_1-xxl@main") and not pins_weights(None) and not pins_weights("t5")
    src, _ = data
    enc = UnpinnedEncoder(t5_dir, max_length=16, device="cpu")
    out = embed_shards(str(src), str(tmp_path / "emb"), enc)
    assert out["caption_dedup"]["cache"] is None and not (tmp_path / "emb" / CACHE_DIR).exists()
    assert len(enc.forwarded) == out["caption_dedup"]["captions_encoded"] == sum(len(set(t)) for t in SHARDS)


def test_cache_folder_is_named_by_encoder_and_identity(tmp_path, t5_dir):
    enc = encoder(t5_dir)
    identity = encoder_identity(enc, t5_dir)
    cache = CaptionCache(str(tmp_path / CACHE_DIR), identity, encoder_slug(enc.encoder_id), enc.dim)
    name = caption_key(identity_key(identity), "image").hex()
    assert cache.uri(bytes.fromhex(name)) == str(tmp_path / CACHE_DIR / f"{encoder_slug(enc.encoder_id)}-"
                                                 f"{identity_key(identity)[:12]}" / name[:2] / name[2:4] / f"{name}.emb")


def test_object_store_entries_are_written_in_place_and_checked(tmp_path):
    """On an object store (memory:// here, like s3://) one PUT is atomic: no temporary object."""
    from pipeline import storage

    identity = {"encoder_id": "t@sha256:cd", "max_length": 8, "dtype": "float32", "storage_dtype": "float16"}
    cache = CaptionCache("memory://capcache-unit/caption-cache", identity, "t", 4)
    vectors = [np.full((2, 4), i, dtype=np.float16) for i in range(3)]
    cache.put_many(["a", "b", "c"], vectors)
    written = storage.find("memory://capcache-unit")
    assert len(written) == 3 and all(u.endswith(".emb") for u in written)
    key = caption_key(cache.ident_key, "b")
    with storage.open(cache.uri(key), "wb") as fh:  # damaged in place
        fh.write(pack_entry(key, vectors[1])[:-1])
    found, corrupt = cache.get_many(["a", "b", "c", "d"])
    assert corrupt == 1 and sorted(found) == [0, 2] and np.array_equal(found[2], vectors[2])
    storage.rmtree("memory://capcache-unit")
