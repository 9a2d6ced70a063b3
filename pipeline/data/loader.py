"""Training and validation data loaders: filtered WebDataset shards joined with precomputed T5 embeddings.

Each filtered shard ``DATA/NNNNNN.tar`` (``KEY.png``, ``KEY.txt``, ``KEY.json``) is paired
with ``EMBEDDINGS/NNNNNN.parquet`` written by :mod:`pipeline.data.embed`; samples are joined on
``__key__`` when the shard is opened. The training loader is an endless stream of batches::

    from pipeline.data.batch import to_device
    from pipeline.data.loader import TrainDataConfig, make_loader
    cfg = TrainDataConfig(data="data/filtered", embeddings="data/embeddings/t5-...")
    batch = next(iter(make_loader(cfg, rank=0, world_size=1)))
    batch["image"]        # uint8 [B, 3, C, C] (channels first, contiguous), C = cfg.crop_size
    batch["lowres"]       # uint8 [B, 3, c, c], only when cfg.lowres_crop_size
    batch["text_embeds"]  # float16 [B, L, D], L = cfg.pad_text_to (None: longest caption)
    batch["text_mask"]    # bool [B, L], True at real tokens
    batch["keys"]         # list[str]
    batch = to_device(batch, torch.device("cuda"), channels_last=True)
    batch["image"]        # float32 [B, 3, C, C] in [-1, 1] on the device (lowres too)
    batch["text_embeds"]  # float32 [B, L, D] on the device

Batches cross from the workers to the training process, and from pinned host memory to the
GPU, as the stored bytes (uint8 pixels, float16 embeddings as the embed step wrote them): 4x
fewer image bytes and 2x fewer text bytes than float32, and no per-pixel float arithmetic in
the workers. :func:`pipeline.data.batch.to_device` does that arithmetic on the device. A fixed ``pad_text_to``
gives every batch the same shape, so a compiled training step is compiled once. A CPU run has
no device beside the host: ``normalize_in_workers`` makes the workers ship float32 pixels
(``batch["pixels"] == "float"``), so the arithmetic stays off the training process's critical
path, and :func:`to_device` passes them through.

How the order is made, so that it is exact and cheap to resume:

- A *reader* is one (rank, DataLoader worker) pair; there are ``world_size * num_workers``.
  With at least as many shards as readers each reader owns a disjoint set of shards,
  balanced by rows (readers still differ by up to one shard: use many shards per reader);
  with fewer, every reader takes a disjoint stride of every shard's rows.
- The parquet rows are the index: their count fixes each reader's epoch length and the
  embed step recorded where every image lies in its tar, so an image is one seek + read.
- Per epoch a reader shuffles its shards, cuts them into windows of ``shuffle_shards``
  shards and visits each window's samples in a random permutation. Orders and crop/flip
  draws come from ``numpy`` generators seeded with (seed, epoch, reader, window), so batch
  ``m`` of a reader is a pure function of ``m``: ``start_batch`` jumps there by
  arithmetic, without decoding anything it skips (:class:`pipeline.data.order.ReaderPlan`).
- A worker yields whole batches and the DataLoader takes them round-robin (worker
  ``j % W`` makes batch ``j``); resuming at ``start_batch`` rotates the roles accordingly.

A stage learns only from real pixels at its own resolution (Imagen sec. 2.5): samples whose
stored short side (``image_side``, recorded by the embed step from the image header) is below
``image_size`` are left out of the plan before anything is read, and counted
(:attr:`Shard.excluded`). The image is resized so its short side is ``image_size`` (never up),
then cropped to ``crop_size`` (centred, or random for SR stages); an SR stage's low-res input
is the same crop downsampled by area averaging (:mod:`pipeline.data.crops`). Tar members are
read through :mod:`pipeline.data.shards`, which checks each member's name exactly.

A sample whose image is missing, undecodable or (without a recorded side) smaller than the
stage is counted, logged, and its slot in the batch is filled with another sample of the same
batch (batches keep their size and their place in the stream); it is never upscaled.
``IMAGEN_DATA_AUDIT=DIR`` makes every reader append one JSON line per image it yields to
``DIR/<pid>.jsonl`` (key, stored size, crop size): a check that each stage sees only images
at least as large as itself. A shard's embeddings stay in memory while its window is read.
Paths are fsspec URIs; on object stores consider fsspec's ``simplecache::`` so the random
reads hit a local copy.

The held-out validation split (``val-NNNNNN.tar`` + ``val-NNNNNN.parquet``, chosen by the filter
step: :mod:`pipeline.data.split`) is read by :func:`make_validation_loader`, one finite pass in a
fixed order, through the same reader and decoder. The training loader lists only ``NNNNNN.tar``,
so it never yields a validation sample::

    if validation_shards_exist(cfg.data):
        for batch in make_validation_loader(cfg, rank, world_size, limit=1000): ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from imagen.text import same_recorded_encoder
from pipeline import storage
from pipeline.data.batch import collate
from pipeline.data.crops import TooSmall, decode_image
from pipeline.data.embed import (
    embedding_files,
    resolve_embeddings_dir,
    scan_tar,
    shard_stem,
)
from pipeline.data.embeddings import load_embeddings, read_footer
from pipeline.data.order import ReaderPlan
from pipeline.data.shards import member_name, read_after, read_at
from pipeline.data.split import TRAIN, VAL, VAL_SHARD, shard_pattern

log = logging.getLogger(__name__)


@dataclass
class TrainDataConfig:
    """Where the training data lives and how samples become tensors.

    Attributes:
        data: directory of filtered ``NNNNNN.tar`` shards.
        embeddings: directory of ``NNNNNN.parquet`` embeddings (``embed_shards``'s
            ``output``); its parent also works when it holds exactly one encoder folder.
        image_size: the stage's side: the image's short side is resized to it (never up);
            samples whose short side is smaller are left out.
        crop_size: side of the square training crop (None: ``image_size``).
        lowres_crop_size: SR stages: also return the crop downsampled to this side (the
            stage's conditioning input, Imagen sec. 2.5; ``StageSpec.lowres_crop_size``, not
            the whole image's ``lowres_size``); None for the base stage.
        max_tokens: captions longer than this are truncated (keep <= embed max_length).
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes per rank.
        seed: seeds shard order, shuffling, crops and flips (>= 0).
        random_flip: horizontal flip with probability 1/2.
        expected_encoder_id: refuse embeddings from any other encoder (``encoder_id``).
        random_crop: random instead of center crop after the short-side resize.
        shuffle_shards: shards whose samples are shuffled together (memory: their
            embeddings are held at once).
        expected_dim: refuse embeddings of another width (the U-Net's text_embed_dim).
        expected_max_length: refuse embeddings made with another token limit (the limit
            the sampler encodes prompts with).
        start_batch: resume: the first batch is batch ``start_batch`` of the stream that
            ``start_batch=0`` gives (same seed, rank, world size and num_workers).
        pad_text_to: pad every batch's text to this many tokens (>= ``max_tokens``), so
            batch shapes are static; None pads to each batch's longest caption.
        normalize_in_workers: ship float32 pixels in [-1, 1] made by the workers (for training
            on a CPU, where the workers run beside the step; 6% faster tiny training on 2
            cores) instead of uint8 for :func:`to_device` to normalise on the device.
    """

    data: str
    embeddings: str
    image_size: int = 64
    lowres_crop_size: int | None = None
    max_tokens: int = 128
    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    random_flip: bool = True
    expected_encoder_id: str | None = None
    random_crop: bool = False
    shuffle_shards: int = 4
    expected_dim: int | None = None
    expected_max_length: int | None = None
    start_batch: int = 0
    crop_size: int | None = None
    pad_text_to: int | None = None
    normalize_in_workers: bool = False
    audit_dir: str | None = dataclasses.field(default_factory=lambda: os.environ.get("IMAGEN_DATA_AUDIT"))

    def __post_init__(self) -> None:
        if self.crop_size is None:
            self.crop_size = self.image_size
        if not 0 < self.crop_size <= self.image_size:
            raise ValueError(f"crop_size {self.crop_size} must be between 1 and image_size {self.image_size}")
        if self.lowres_crop_size is not None and not 0 < self.lowres_crop_size < self.crop_size:
            raise ValueError(
                f"lowres_crop_size {self.lowres_crop_size} must be between 1 and crop_size {self.crop_size}"
            )
        for name in ("image_size", "max_tokens", "batch_size", "shuffle_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainDataConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_workers", "seed", "start_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainDataConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.pad_text_to is not None and self.pad_text_to < self.max_tokens:
            raise ValueError(
                f"TrainDataConfig.pad_text_to {self.pad_text_to} is below max_tokens {self.max_tokens}: "
                "captions are cut to max_tokens, then padded to pad_text_to. Set pad_text_to to at least "
                "max_tokens (the model's max_text_len), or to None to pad to each batch's longest caption"
            )


@dataclass(frozen=True)
class Shard:
    """One filtered tar, its embeddings parquet, and the rows of it this stage reads.

    ``eligible`` lists those parquet rows (None: all of them); ``excluded`` counts the rows
    left out because their image is smaller than the stage.
    """

    tar: str
    parquet: str
    rows: int
    eligible: tuple[int, ...] | None = None
    excluded: int = 0


_IDENTITY = ("encoder_id", "dim", "max_length")


def check_embeddings(meta: dict, path: str, cfg: TrainDataConfig, first: dict | None = None):
    """Raise if the embeddings in ``path`` do not fit the run (or differ from ``first``)."""
    got = {k: meta.get(k) for k in _IDENTITY}
    if cfg.expected_encoder_id is not None and not same_recorded_encoder(
        cfg.expected_encoder_id, got["encoder_id"]
    ):
        raise ValueError(
            f"{path}: embeddings were made by encoder {got['encoder_id']!r}, but this run "
            f"expects {cfg.expected_encoder_id!r}. Re-run the embed step with the training "
            "text encoder, or point TrainDataConfig.embeddings at that encoder's folder."
        )
    for field, want in (("dim", cfg.expected_dim), ("max_length", cfg.expected_max_length)):
        if want is not None and got[field] != want:
            raise ValueError(
                f"{path}: embeddings have {field}={got[field]}, but this run expects {want}. "
                f"Re-run the embed step with the run's encoder and --max-length, or change "
                f"the run's config to match."
            )
    if first is not None and any(not _same(k, got[k], first.get(k)) for k in _IDENTITY):
        raise ValueError(
            f"{path}: embeddings {got} differ from the other shards' "
            f"{ {k: first.get(k) for k in _IDENTITY} }: shards of one run must come from one "
            "encoder. Re-run the embed step over all shards into a fresh folder."
        )


def _same(field: str, a, b) -> bool:
    return same_recorded_encoder(a, b) if field == "encoder_id" else a == b


def discover(cfg: TrainDataConfig, split: str = TRAIN) -> tuple[list[Shard], dict]:
    """Shards of ``split`` with embeddings (sorted) and the metadata every parquet must agree with.

    Every parquet footer is read (in parallel) here, in the launching process, so a wrong
    or mixed encoder fails at start, not inside a DataLoader worker mid-epoch. Only the shards
    of ``split`` are listed (``pipeline.data.split.shard_pattern``): the training split never
    sees a ``val-NNNNNN.tar``. For the validation split, no sample at the stage's size is no
    error: the shards come back with no rows.
    """
    tars = storage.list_shards(cfg.data, shard_pattern(split))
    if not tars and split == VAL:
        raise ValueError(f"no validation shards (val-NNNNNN.tar) in {cfg.data}: it was filtered before the "
                         "validation split existed, or with val_fraction=0; rerun the filter step (and embed) "
                         "to hold some samples out")
    if not tars:
        raise ValueError(f"no NNNNNN.tar shards in {cfg.data}; run the filter step first")
    emb_dir = resolve_embeddings_dir(cfg.embeddings)
    parquets = {shard_stem(p): p for p in embedding_files(emb_dir, split)}
    pairs = [(t, parquets[shard_stem(t)]) for t in tars if shard_stem(t) in parquets]
    unembedded = [shard_stem(t) for t in tars if shard_stem(t) not in parquets]
    if unembedded:
        log.warning(
            "%d of %d shards have no embeddings in %s and are skipped (%s...); run embed on them",
            len(unembedded), len(tars), emb_dir, ", ".join(unembedded[:5]),
        )  # fmt: skip
    if not pairs:
        raise ValueError(f"none of the {split} shards in {cfg.data} has embeddings in {emb_dir}; run the "
                         "embed step on them")
    with ThreadPoolExecutor(max_workers=16) as pool:  # footers: latency-bound on object stores
        footers = list(pool.map(read_footer, [p for _, p in pairs]))
        first = footers[0][1]
        for (_, parquet), (_, meta) in zip(pairs, footers, strict=True):
            check_embeddings(meta, parquet, cfg, first)
        sides = list(pool.map(_image_sides, [p for _, p in pairs]))
    shards = []
    for (tar, parquet), (rows, _), side in zip(pairs, footers, sides, strict=True):
        if side is None:  # an older parquet: sizes are checked as images are decoded
            shards.append(Shard(tar, parquet, rows))
            continue
        # -1 (unknown) stays in: the decoder checks it and counts it if it is too small
        small = (side >= 0) & (side < cfg.image_size)
        keep = np.flatnonzero(~small)
        shards.append(Shard(tar, parquet, len(keep), tuple(keep.tolist()), int(small.sum())))
    if not any(s.rows for s in shards) and split == TRAIN:
        raise ValueError(
            f"no image in {cfg.data} is at least {cfg.image_size} px on its short side, which this "
            f"stage needs ({sum(s.excluded for s in shards)} smaller ones left out): download sources "
            "at this stage's resolution, or train a stage with a smaller image size"
        )
    return shards, first


def _image_sides(parquet: str) -> np.ndarray | None:
    """The ``image_side`` column of one embeddings parquet (None: written before it existed)."""
    import pyarrow.parquet as pq

    with storage.open(parquet, "rb") as fh:
        pf = pq.ParquetFile(fh)
        if "image_side" not in pf.schema_arrow.names:
            return None
        return pf.read(columns=["image_side"]).column(0).to_numpy()


def data_counts(shards: list[Shard]) -> dict[str, int]:
    """What a stage can train on: ``data_samples`` and ``data_excluded_too_small``."""
    return {"data_samples": sum(s.rows for s in shards),
            "data_excluded_too_small": sum(s.excluded for s in shards)}


class _ShardReader:
    """An open shard: its embeddings in memory and random access to its images.

    Opening trusts the recorded image offsets when the tar has the size the embed step saw
    (no hashing of the whole tar at every open: that would double the reads). Each read then
    checks the member name in the image's own tar header (a moved member triggers a re-index)
    and the image bytes' sha256 against the one recorded at embed time (a changed image is
    skipped with a warning naming it), so a shard changed in place never pairs an image with
    another caption's embedding. The hash is about 4% of a worker's time on 256 px PNGs
    (0.1 ms beside a 2 ms decode, bench/loader.py): a digest of every byte handed out, which
    no cheaper check (PNG's CRCs, sizes, names) replaces. The embed step itself matches
    whole shards by the tar's sha256.
    """

    def __init__(self, shard: Shard, cfg: TrainDataConfig, first: dict, warn: bool = True):
        self.shard, self.warn = shard, warn
        # plan position -> parquet row (the plan counts only the rows large enough for the stage)
        self.rows = np.asarray(shard.eligible) if shard.eligible is not None else None
        self.emb = load_embeddings(shard.parquet)
        check_embeddings(self.emb.meta, shard.parquet, cfg, first)
        meta = self.emb.meta
        fast = (
            self.emb.image_offset is not None
            and meta.get("num_samples") == len(self.emb.keys)
            and meta.get("source_size") == storage.size(shard.tar)
        )
        self.scanned = False
        self.report = self._use_recorded() if fast else self._scan()
        self._log_report()
        self.fh = storage.open(shard.tar, "rb")

    def _log_report(self) -> None:
        parts = [f"{n} {what}" for what, n in self.report.items() if n]
        if parts and self.warn:
            log.warning("%s: skipped keys: %s (embeddings %s)", self.shard.tar,
                        ", ".join(parts), self.shard.parquet)  # fmt: skip

    def _use_recorded(self) -> dict[str, int]:
        emb = self.emb
        self.ext, self.offset, self.size = emb.image_ext, emb.image_offset, emb.image_size
        in_tar = emb.meta.get("tar_samples", len(emb.keys))
        return {
            "in the tar without embedding": in_tar - len(emb.keys),
            "embedded but not in the tar": 0,
            "without image": int((self.offset < 0).sum()),
        }

    def _scan(self) -> dict[str, int]:
        """The tar changed since embedding (or an old parquet): index it by its headers."""
        index = scan_tar(self.shard.tar, captions=False)
        self.scanned = True
        where = [index.images.get(k, ("", -1, -1)) for k in self.emb.keys]
        self.ext = [w[0] for w in where]
        self.offset = np.array([w[1] for w in where], dtype=np.int64)
        self.size = np.array([w[2] for w in where], dtype=np.int64)
        in_tar, in_parquet = set(index.all_keys), set(self.emb.keys)
        return {
            "in the tar without embedding": len(in_tar - in_parquet),
            "embedded but not in the tar": len(in_parquet - in_tar),
            "without image": len((in_parquet & in_tar) - set(index.images)),
        }

    def read_image(self, row: int) -> bytes | None:
        offset, size = int(self.offset[row]), int(self.size[row])
        if offset < 0:
            return None
        # The member's name in its own header must be exactly this key's image: a shard
        # rewritten to the same size must not hand out another sample's image.
        expected = member_name(self.emb.keys[row], self.ext[row])
        data = read_at(self.fh, offset, expected, size)
        if data is None:
            if self.scanned:  # its own index disagrees: the file changed while we read it
                log.warning("%s: member at offset %d is not %r; skipping it",
                            self.shard.tar, offset, expected)  # fmt: skip
                return None
            log.warning("%s: member at offset %d is not %r; re-indexing the tar",
                        self.shard.tar, offset, expected)  # fmt: skip
            self.report, self.warn = self._scan(), True
            self._log_report()
            return self.read_image(row)
        digests = self.emb.image_sha256
        if digests is not None and digests[row] is not None and hashlib.sha256(data).digest() != digests[row]:
            log.warning("%s: the image of key %s changed since it was embedded; skipping it (re-run the embed "
                        "step on this shard)", self.shard.tar, self.emb.keys[row])  # fmt: skip
            return None
        return data

    def row(self, position: int) -> int:
        """The parquet row of the shard's ``position``-th sample for this stage."""
        return int(self.rows[position]) if self.rows is not None else position

    def read_caption(self, row: int) -> str | None:
        """The caption member the filter step writes right after the image (one header read,
        its name checked), or None when it is not there."""
        offset, size = int(self.offset[row]), int(self.size[row])
        if offset < 0:
            return None
        text = read_after(self.fh, offset, size, member_name(self.emb.keys[row], "txt"))
        return None if text is None else text.decode("utf-8", "replace").strip()

    def close(self) -> None:
        self.fh.close()


class ShardStream(IterableDataset):
    """Endless stream of batches for one rank; each DataLoader worker is one reader."""

    split = TRAIN

    def __init__(self, cfg: TrainDataConfig, shards: list[Shard], first: dict, rank: int,
                 world_size: int):  # fmt: skip
        super().__init__()
        self.cfg, self.shards, self.first = cfg, shards, first
        self.rank, self.world_size = rank, world_size
        self._reported: set[int] = set()
        self.too_small = 0  # images smaller than the stage met while decoding (skipped)

    def _reader(self) -> tuple[int, int, int]:
        """(reader index, readers, first batch of this reader) for this worker."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # The DataLoader takes batch j from worker j % W. Resuming at batch k, worker i
        # plays the role worker (k + i) % W had, from that worker's batch (k + i) // W on.
        first, role = divmod(self.cfg.start_batch + worker, workers)
        return self.rank * workers + role, self.world_size * workers, first

    def __iter__(self) -> Iterator[dict]:
        split, nsplit, first_batch = self._reader()
        plan = ReaderPlan([s.rows for s in self.shards], split, nsplit, self.cfg.seed,
                          self.cfg.shuffle_shards)  # fmt: skip
        if plan.epoch_len == 0:
            raise ValueError(
                f"rank {self.rank} reader {split} of {nsplit} got no samples from "
                f"{len(self.shards)} shard(s); use fewer ranks/num_workers or more data"
            )
        samples = self._samples(plan, first_batch * self.cfg.batch_size)
        while True:
            batch = [next(samples) for _ in range(self.cfg.batch_size)]
            yield collate(_fill_gaps(batch), self.cfg.pad_text_to, self.cfg.normalize_in_workers)

    def _samples(self, plan: ReaderPlan, position: int) -> Iterator[dict | None]:
        for _epoch, (shard_ids, rows, augs), start in plan.from_position(position):
            readers = {}
            try:
                for s in np.unique(shard_ids[start:]).tolist():
                    # Each shard's skipped keys are logged once per worker, not every epoch.
                    warn = s not in self._reported
                    readers[s] = _ShardReader(self.shards[s], self.cfg, self.first, warn)
                    self._reported.add(s)
                for j in range(start, len(rows)):
                    yield self._sample(readers[int(shard_ids[j])], int(rows[j]), augs[j])
            finally:
                for reader in readers.values():
                    reader.close()

    def _sample(self, reader: _ShardReader, position: int, aug: np.ndarray) -> dict | None:
        row = reader.row(position)
        key = reader.emb.keys[row]
        data = reader.read_image(row)
        if data is None:
            return None  # counted in the shard's report
        try:
            sample = decode_image(data, self.cfg, aug)
        except TooSmall as err:  # no recorded side (an older parquet): caught here instead
            self.too_small += 1
            log.warning("%s: skipping key %s: %s (%d so far)", reader.shard.tar, key, err, self.too_small)
            return None
        except Exception as err:  # one bad image must not end a training run
            log.warning("%s: skipping key %s, undecodable image (%s)", reader.shard.tar, key, err)
            return None
        sample["text_embeds"] = reader.emb.get(row)[: self.cfg.max_tokens]
        sample["key"] = key
        if self.cfg.audit_dir:
            self._audit(key, data, sample)
        return sample

    def _audit(self, key: str, data: bytes, sample: dict) -> None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            stored = list(img.size)
        line = {"key": key, "stored": stored, "image_size": self.cfg.image_size,
                "crop": list(sample["image"].shape[:2]), "rank": self.rank, "split": self.split}
        os.makedirs(self.cfg.audit_dir, exist_ok=True)
        with open(os.path.join(self.cfg.audit_dir, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")


def _fill_gaps(batch: list[dict | None]) -> list[dict]:
    """Fill skipped slots with other samples of the batch, so batches keep their size."""
    good = [s for s in batch if s is not None]
    if not good:
        raise RuntimeError(
            f"all {len(batch)} samples of a batch were missing or undecodable (see the "
            "warnings above for shards and keys); re-run the filter and embed steps"
        )
    return [s if s is not None else good[i % len(good)] for i, s in enumerate(batch)]


def make_loader(cfg: TrainDataConfig, rank: int = 0, world_size: int = 1) -> Iterable[dict]:
    """Endless iterable of batches for ``rank`` of ``world_size`` (see the module doc).

    Raises ``ValueError`` when there are no shards, no embeddings, or the embeddings do
    not fit the run (encoder, dim, max length; see :func:`check_embeddings`).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    shards, first = discover(cfg)
    stream = ShardStream(cfg, shards, first, rank, world_size)
    loader = DataLoader(
        stream,
        batch_size=None,  # the stream yields whole batches (their order must not depend on timing)
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    loader.data_counts = data_counts(shards)  # what this stage trains on, for the run's params
    return loader


# --- the validation split ---------------------------------------------------------------------

def validation_shards_exist(data: str) -> bool:
    """Whether the filtered folder ``data`` holds a validation split (``val-NNNNNN.tar``); one listing."""
    return bool(storage.list_shards(data, VAL_SHARD))


class ValidationStream(ShardStream):
    """One pass over one rank's share of the validation split, in a fixed order.

    The order is shard order, then parquet row order, over the samples large enough for the
    stage; sample ``i`` of it (after ``limit``) belongs to rank ``i % world_size``, whose
    samples are cut into batches in order. DataLoader worker ``w`` of ``W`` makes batches
    ``w, w + W, ...`` and the DataLoader takes them round-robin, so the batches come out in
    order whatever the worker count. Reading and decoding are the training stream's own.
    """

    split = VAL

    def __init__(self, cfg: TrainDataConfig, shards: list[Shard], first: dict, rank: int, world_size: int,
                 limit: int | None = None):  # fmt: skip
        super().__init__(cfg, shards, first, rank, world_size)
        order = [(s, position) for s, shard in enumerate(shards) for position in range(shard.rows)]
        mine = order[:limit][rank::world_size]
        self.batches = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        self.samples = len(order[:limit])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers: dict[int, _ShardReader] = {}
        centre = np.array([0.5, 0.5, 1.0])  # no random draw: cfg has random crop and flip off
        try:
            for batch in self.batches[worker::workers]:
                samples = []
                for s, position in batch:
                    for old in [k for k in readers if k < s]:  # shards come in order: done with these
                        readers.pop(old).close()
                    if s not in readers:
                        readers[s] = _ShardReader(self.shards[s], self.cfg, self.first)
                    sample = self._sample(readers[s], position, centre)
                    if sample is not None:  # unreadable: skipped and counted (logged), never replaced
                        sample["caption"] = readers[s].read_caption(readers[s].row(position))
                        samples.append(sample)
                if samples:
                    out = collate(samples, self.cfg.pad_text_to, self.cfg.normalize_in_workers)
                    if all(x["caption"] is not None for x in samples):
                        out["captions"] = [x["caption"] for x in samples]
                    yield out
        finally:
            for reader in readers.values():
                reader.close()


def make_validation_loader(cfg: TrainDataConfig, rank: int = 0, world_size: int = 1,
                           limit: int | None = None) -> Iterable[dict]:
    """Finite, one pass: every validation sample eligible for ``cfg.image_size`` (short side >=
    it), exactly once across the ranks, in a fixed order (shard order, then row order) that does
    not depend on world_size, num_workers or seed. Sample i of that order (after ``limit``,
    which keeps the first ``limit`` of the order) goes to rank ``i % world_size``. Centre crop
    to ``cfg.crop_size``, no flip. Batches of ``cfg.batch_size`` (the last may be smaller; so is
    one with an unreadable image, which is skipped and logged) in :func:`make_loader`'s format,
    plus ``"captions"`` (each sample's caption from its shard).

    Reads ``val-NNNNNN.tar`` with their ``val-NNNNNN.parquet`` embeddings through the training
    reader. ``loader.data_counts`` says what it covers: ``{"val_samples": n (after limit),
    "val_excluded_too_small": m}``; a stage no validation sample reaches yields nothing (n = 0).
    Raises ``ValueError`` when ``cfg.data`` has no validation shards (see
    :func:`validation_shards_exist`) or their embeddings do not fit the run.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if limit is not None and limit < 0:
        raise ValueError(f"limit {limit}: use >= 0, or None for the whole validation split")
    cfg = dataclasses.replace(cfg, random_crop=False, random_flip=False, start_batch=0)
    shards, first = discover(cfg, VAL)
    stream = ValidationStream(cfg, shards, first, rank, world_size, limit)
    counts = {"val_samples": stream.samples, "val_excluded_too_small": sum(s.excluded for s in shards)}
    if not stream.samples and rank == 0:
        log.warning("no validation sample in %s is at least %d px on its short side (%d smaller); this "
                    "stage is not validated", cfg.data, cfg.image_size, counts["val_excluded_too_small"])
    loader = DataLoader(stream, batch_size=None, num_workers=min(cfg.num_workers, len(stream.batches)),
                        pin_memory=torch.cuda.is_available())
    loader.data_counts = counts
    return loader
