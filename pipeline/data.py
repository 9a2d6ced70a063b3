"""Training data loader: filtered WebDataset shards joined with precomputed T5 embeddings.

Each filtered shard ``DATA/NNNNNN.tar`` (``KEY.png``, ``KEY.txt``, ``KEY.json``) is paired
with ``EMBEDDINGS/NNNNNN.parquet`` written by :mod:`pipeline.embed`; samples are joined on
``__key__`` when the shard is opened. The loader is an endless stream of batches::

    from pipeline.data import TrainDataConfig, make_loader
    cfg = TrainDataConfig(data="data/filtered", embeddings="data/embeddings/t5-...")
    batch = next(iter(make_loader(cfg, rank=0, world_size=1)))
    batch["image"]        # float32 [B, 3, H, W] in [-1, 1]
    batch["lowres"]       # float32 [B, 3, h, w] in [-1, 1], only when cfg.lowres_size
    batch["text_embeds"]  # float32 [B, L, D], L = longest caption in the batch
    batch["text_mask"]    # bool [B, L], True at real tokens
    batch["keys"]         # list[str]

Under DDP every (rank, DataLoader worker) pair reads a disjoint set of shards, or, with
fewer shards than pairs, a disjoint subset of every shard's samples. The order is
deterministic given ``seed``. Paths are fsspec URIs.
"""

from __future__ import annotations

import io
import logging
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.embed import (
    embedding_files,
    read_embeddings,
    read_metadata,
    resolve_embeddings_dir,
    shard_stem,
    split_key,
)

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class TrainDataConfig:
    """Where the training data lives and how samples become tensors.

    Attributes:
        data: directory of filtered ``NNNNNN.tar`` shards.
        embeddings: directory of ``NNNNNN.parquet`` embeddings (``embed_shards``'s
            ``output``); its parent also works when it holds exactly one encoder folder.
        image_size: side of the square training image.
        lowres_size: SR stages: also return the image downsampled to this side (the
            stage's conditioning input, Imagen sec. 2.5); None for the base stage.
        max_tokens: captions longer than this are truncated (keep <= embed max_length).
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes per rank.
        seed: seeds shard order, shuffling, crops and flips.
        random_flip: horizontal flip with probability 1/2.
        expected_encoder_id: refuse embeddings from any other encoder (``encoder_id``).
        random_crop: random instead of center crop after the short-side resize.
        shuffle_buffer: samples held for shuffling (encoded bytes, not decoded images).
    """

    data: str
    embeddings: str
    image_size: int = 64
    lowres_size: int | None = None
    max_tokens: int = 128
    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    random_flip: bool = True
    expected_encoder_id: str | None = None
    random_crop: bool = False
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        if self.lowres_size is not None and not 0 < self.lowres_size < self.image_size:
            raise ValueError(
                f"lowres_size {self.lowres_size} must be between 1 and image_size {self.image_size}"
            )
        for name in ("image_size", "max_tokens", "batch_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainDataConfig.{name} must be >= 1, got {getattr(self, name)}")


def check_encoder(meta: dict, path: str, expected: str | None) -> None:
    """Raise if the embeddings in ``path`` come from an encoder other than ``expected``."""
    if expected is not None and meta.get("encoder_id") != expected:
        raise ValueError(
            f"{path}: embeddings were made by encoder {meta.get('encoder_id')!r}, but this run "
            f"expects {expected!r}. Re-run the embed step with the training text encoder, or "
            "point TrainDataConfig.embeddings at that encoder's folder."
        )


def discover(cfg: TrainDataConfig) -> tuple[list[tuple[str, str]], str]:
    """Sorted (tar, parquet) URI pairs and the encoder_id every parquet must carry."""
    tars = storage.list_shards(cfg.data, r"\d+\.tar")
    if not tars:
        raise ValueError(f"no NNNNNN.tar shards in {cfg.data}; run the filter step first")
    emb_dir = resolve_embeddings_dir(cfg.embeddings)
    parquets = {shard_stem(p): p for p in embedding_files(emb_dir)}
    pairs = [(t, parquets[shard_stem(t)]) for t in tars if shard_stem(t) in parquets]
    unembedded = [shard_stem(t) for t in tars if shard_stem(t) not in parquets]
    if unembedded:
        log.warning(
            "%d of %d shards have no embeddings in %s and are skipped (%s...); run embed on them",
            len(unembedded), len(tars), emb_dir, ", ".join(unembedded[:5]),
        )  # fmt: skip
    if not pairs:
        raise ValueError(f"none of the shards in {cfg.data} has embeddings in {emb_dir}")
    # The first footer is read eagerly so a wrong encoder fails here, in the launching
    # process, not later inside a DataLoader worker; every shard is re-checked when it is
    # opened (ShardStream._load_shard).
    first = read_metadata(pairs[0][1])
    check_encoder(first, pairs[0][1], cfg.expected_encoder_id)
    return pairs, first.get("encoder_id")


def _crop_box(w: int, h: int, size: int, rng: random.Random | None) -> tuple[int, int, int, int]:
    left = (w - size) // 2 if rng is None else rng.randint(0, w - size)
    top = (h - size) // 2 if rng is None else rng.randint(0, h - size)
    return left, top, left + size, top + size


def _to_tensor(img) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def decode_image(data: bytes, cfg: TrainDataConfig, rng: random.Random) -> dict[str, torch.Tensor]:
    """Bytes -> {"image": [3,S,S], "lowres"?: [3,s,s]}: short-side resize, crop, flip."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    size = cfg.image_size
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        new = (max(size, round(w * scale)), max(size, round(h * scale)))
        img = img.resize(new, Image.Resampling.BICUBIC)
        w, h = new
    img = img.crop(_crop_box(w, h, size, rng if cfg.random_crop else None))
    if cfg.random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = {"image": _to_tensor(img)}
    if cfg.lowres_size is not None:
        # Low-res input derived from the same crop and flip, so it aligns with the target.
        small = img.resize((cfg.lowres_size, cfg.lowres_size), Image.Resampling.BICUBIC)
        out["lowres"] = _to_tensor(small)
    return out


def iter_tar_samples(tar_uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) from a shard without holding the whole tar in memory.

    WebDataset writers keep a sample's members adjacent, so a sample is complete when the
    key changes.
    """
    key, parts = None, {}
    with storage.open(tar_uri, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key, ext = split_key(member.name)
            if member_key != key and key is not None:
                yield key, parts
                parts = {}
            key = member_key
            parts[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts


class ShardStream(IterableDataset):
    """Endless stream of decoded samples for one rank; splits further across workers."""

    def __init__(
        self,
        cfg: TrainDataConfig,
        pairs: list[tuple[str, str]],
        encoder_id: str,
        rank: int,
        world_size: int,
    ):
        super().__init__()
        self.cfg, self.pairs, self.encoder_id = cfg, pairs, encoder_id
        self.rank, self.world_size = rank, world_size

    def _split(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _load_shard(self, tar_uri: str, parquet_uri: str, warn: bool):
        """Yield (key, image bytes, embedding [T, D] float16) of one shard, tar order."""
        embeds, meta = read_embeddings(parquet_uri)
        check_encoder(meta, parquet_uri, self.encoder_id)  # shards must not mix encoders
        total = no_embed = no_image = 0
        for key, parts in iter_tar_samples(tar_uri):
            total += 1
            ext = next((e for e in IMAGE_EXTS if e in parts), None)
            if key not in embeds:
                no_embed += 1
            elif ext is None:
                no_image += 1
            else:
                yield key, parts[ext], embeds[key]
        if warn and (no_embed or no_image):
            log.warning(
                "%s: skipped %d of %d samples (%d without embedding in %s, %d without image)",
                tar_uri, no_embed + no_image, total, no_embed, parquet_uri, no_image,
            )  # fmt: skip

    def _epoch_items(self, epoch: int, split: int, nsplit: int, rng: random.Random) -> Iterator:
        pairs = list(enumerate(self.pairs))
        if len(pairs) >= nsplit:
            pairs, by_sample = pairs[split::nsplit], False
        else:
            by_sample = True  # fewer shards than readers: split each shard's samples instead
        rng.shuffle(pairs)
        for shard_index, (tar_uri, parquet_uri) in pairs:
            for i, item in enumerate(self._load_shard(tar_uri, parquet_uri, warn=epoch == 0)):
                # Offset by the shard index so small shards don't all favour split 0.
                if not by_sample or (shard_index + i) % nsplit == split:
                    yield item

    def __iter__(self) -> Iterator[dict]:
        split, nsplit = self._split()
        for epoch in count():
            # String seeds hash via SHA-512: identical across processes and PYTHONHASHSEED.
            rng = random.Random(f"{self.cfg.seed}/{epoch}/{split}")
            produced = 0
            items = self._epoch_items(epoch, split, nsplit, rng)
            for key, data, embed in _shuffled(items, rng, self.cfg.shuffle_buffer):
                try:
                    sample = decode_image(data, self.cfg, rng)
                except Exception as err:  # one bad image must not end a training run
                    log.warning("skipping %s: undecodable image (%s)", key, err)
                    continue
                produced += 1
                embed = embed[: self.cfg.max_tokens].astype(np.float32)
                sample["text_embeds"] = torch.from_numpy(embed)
                sample["key"] = key
                yield sample
            if produced == 0:
                raise ValueError(
                    f"rank {self.rank} reader {split} of {nsplit} got no samples from "
                    f"{len(self.pairs)} shard(s); use fewer ranks/num_workers or more data"
                )


def _shuffled(items: Iterable, rng: random.Random, buffer_size: int) -> Iterator:
    """Shuffle-buffer: keep ``buffer_size`` items, emit a random one per new item."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: list[dict]) -> dict:
    """Stack images; pad text embeddings to the batch's longest caption, with a mask."""
    lengths = [s["text_embeds"].shape[0] for s in samples]
    dim = samples[0]["text_embeds"].shape[1]
    embeds = torch.zeros(len(samples), max(lengths), dim)
    mask = torch.zeros(len(samples), max(lengths), dtype=torch.bool)
    for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        embeds[i, :n] = s["text_embeds"]
        mask[i, :n] = True
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "text_embeds": embeds,
        "text_mask": mask,
        "keys": [s["key"] for s in samples],
    }
    if "lowres" in samples[0]:
        batch["lowres"] = torch.stack([s["lowres"] for s in samples])
    return batch


def make_loader(cfg: TrainDataConfig, rank: int = 0, world_size: int = 1) -> Iterable[dict]:
    """Endless iterable of batches for ``rank`` of ``world_size`` (see the module doc).

    Raises ``ValueError`` when there are no shards, no embeddings, or the embeddings come
    from an encoder other than ``cfg.expected_encoder_id``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    pairs, encoder_id = discover(cfg)
    stream = ShardStream(cfg, pairs, encoder_id, rank, world_size)
    return DataLoader(
        stream,
        batch_size=cfg.batch_size,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
