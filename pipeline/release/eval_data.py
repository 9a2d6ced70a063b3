"""What `imagen-pipeline evaluate` samples from and compares against: the held-out validation
split of the run's filtered data, a folder of user images, or renders of the tiny data.

    from pipeline.release.eval_data import validation_set, ValidationSplit, references
    val = validation_set(cfg, "ROOT/filtered", "ROOT/embeddings/ENC", limit=16, encoder_id=...)
    val.images       # uint8 [N, S, S, 3]: whole images at the stage's side, centre-cropped
    val.lowres       # uint8 [N, s, s, 3]: SR stages, the same images area-downsampled (the loader's)
    val.text_embeds, val.text_mask, val.captions, val.keys
    split = ValidationSplit(opts, encoder_id)   # per stage, read once: split.get(cfg) or split.reason(cfg)
    references(opts, 64, specs)                 # without a split: --references images, or tiny-data renders

The validation split is read only through ``pipeline.data.loader.make_validation_loader`` with
the settings ``pipeline.train.validation.validation_data`` gives the stage, so evaluation reads
the samples the validation loss reads, in the same fixed order (the first ``limit`` of it), at
the stage's whole-image size as the trainer's sample grid does: an SR stage that trains on
crops is evaluated on whole images, its input the loader's own low-res version of each.
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline import storage
from pipeline.data.images import IMAGE_EXTS

if TYPE_CHECKING:
    import torch


@dataclass
class ValidationSet:
    """The first samples of a stage's validation split, as evaluation uses them."""

    keys: list[str]
    images: np.ndarray  # uint8 [N, S, S, 3], S = the stage's image_size
    lowres: np.ndarray | None  # uint8 [N, s, s, 3] (SR stages), s = its lowres_size
    text_embeds: torch.Tensor  # float32 [N, L, D], the precomputed caption embeddings
    text_mask: torch.Tensor  # bool [N, L]
    captions: list[str] | None  # None when a shard holds no caption text

    def __len__(self) -> int:
        return len(self.keys)

    def head(self, n: int) -> ValidationSet:
        """The first ``n`` samples."""
        return ValidationSet(self.keys[:n], self.images[:n], None if self.lowres is None else self.lowres[:n],
                             self.text_embeds[:n], self.text_mask[:n],
                             None if self.captions is None else self.captions[:n])


def split_missing(data: str) -> str | None:
    """Why ``data`` has no usable validation split (a sentence saying what to do), or None."""
    from pipeline.data.loader import validation_shards_exist

    if not storage.exists(data):
        return f"{data} does not exist: pass the run's filtered shards (ROOT/filtered)"
    if not validation_shards_exist(data):
        return (f"{data} has no validation split (val-NNNNNN.tar; filtered before the split existed): "
                "rerun the filter and embed steps")
    return None


def validation_set(cfg, data: str, embeddings: str, limit: int, encoder_id: str | None = None,
                   batch_size: int = 16) -> ValidationSet | None:
    """The first ``limit`` validation samples at least ``cfg.image_size`` on their short side,
    whole (centre crop to ``cfg.image_size``) with their ``cfg.lowres_size`` inputs for an SR
    stage; None when no validation sample is that large. Raises ``ValueError`` when the
    embeddings come from another encoder than ``encoder_id``."""
    import torch

    from pipeline.data.loader import make_validation_loader
    from pipeline.train.validation import validation_data

    settings = validation_data(cfg, data, embeddings, min(batch_size, max(limit, 1)), encoder_id=encoder_id)
    # whole images at the stage's size, as the trainer's sample grid (trainer._validation_batch)
    settings = dataclasses.replace(settings, crop_size=cfg.image_size, lowres_crop_size=cfg.lowres_size,
                                   normalize_in_workers=False)
    batches = list(make_validation_loader(settings, limit=limit))
    if not batches:
        return None

    def pixels(name: str) -> np.ndarray:
        return torch.cat([b[name] for b in batches]).permute(0, 2, 3, 1).contiguous().numpy()

    captions = [c for b in batches for c in b["captions"]] if all("captions" in b for b in batches) else None
    return ValidationSet(
        keys=[k for b in batches for k in b["keys"]], images=pixels("image"),
        lowres=pixels("lowres") if cfg.lowres_size else None,
        text_embeds=torch.cat([b["text_embeds"] for b in batches]).float(),
        text_mask=torch.cat([b["text_mask"] for b in batches]).bool(), captions=captions)


class ValidationSplit:
    """Each stage's first ``num_validation`` validation samples, read once per stage; ``why``
    says why there are none (no ``data`` given, no split in it), ``used`` what was read."""

    def __init__(self, opts, encoder_id: str | None):
        """``opts``: the evaluation's options (``data``, ``embeddings``, ``num_validation``)."""
        self.opts, self.encoder_id, self.cache, self.used = opts, encoder_id, {}, {}
        if not opts.data:
            self.why = "no validation split given (--data ROOT/filtered)"
        else:
            self.why = split_missing(opts.data)
            if self.why is None and not opts.embeddings:
                self.why = "--data needs --embeddings (the split's caption embeddings, ROOT/embeddings/ENC)"

    def get(self, cfg):
        """The stage's :class:`ValidationSet`, or None (see ``reason``)."""
        if self.why is not None or self.opts.num_validation < 1:
            return None
        if cfg.stage not in self.cache:
            got = validation_set(cfg, self.opts.data, self.opts.embeddings, self.opts.num_validation,
                                 self.encoder_id)
            self.cache[cfg.stage] = got
            if got is not None:
                self.used[cfg.stage] = {"keys": got.keys, "captions": got.captions}
        return self.cache[cfg.stage]

    def reason(self, cfg) -> str:
        if self.why is not None:
            return self.why
        if self.opts.num_validation < 1:
            return "num_validation is 0"
        return f"no validation sample of {self.opts.data} is at least {cfg.image_size} px on its short side"


def references(opts, size: int, specs) -> tuple[np.ndarray, list[str]] | None:
    """Without a validation split: reference images [N, size, size, 3] and captions from
    ``opts.references`` (``num_references`` of them), else renders of the tiny dataset's
    distribution for ``specs``; None with neither."""
    from pipeline.release.metrics import resize

    if opts.references:
        imgs, caps = load_references(opts.references, opts.num_references)
        return resize(imgs, size), caps
    if specs is None:
        return None
    return render_set(specs, size, opts.seed)


def render_set(specs, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Renders of the tiny dataset's distribution, one per (colour, shape), with their captions."""
    from pipeline.release.metrics import render_references

    return render_references(specs, size, seed=seed), [f"a {c} {s} on a white background" for c, s in specs]


def load_references(path: str, limit: int) -> tuple[np.ndarray, list[str]]:
    """Up to ``limit`` images (center-cropped squares at the smallest side found) with captions
    from a folder (any fsspec URI) of images (caption from NAME.txt beside each, else "") or of
    WebDataset shards (the filter step's output, read through :mod:`pipeline.data.shards`)."""
    from pipeline.data.images import open_rgb
    from pipeline.data.shards import iter_samples
    from pipeline.release.metrics import resize

    if not storage.isdir(path):
        raise FileNotFoundError(f"--references {path}: not a folder of images or of .tar shards")
    files = storage.list_files(path)
    names = {storage.basename(uri) for uri in files}
    items: list[tuple[bytes, str]] = []
    for uri in files:
        name = storage.basename(uri)
        if name.endswith(".tar"):
            for _, parts in iter_samples(uri):
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if img is not None:
                    items.append((img, parts.get("txt", b"").decode()))
                if len(items) >= limit:
                    break
        elif name.lower().endswith(tuple(f".{e}" for e in IMAGE_EXTS)):
            txt = posixpath.splitext(name)[0] + ".txt"
            caption = ""
            if txt in names:
                with storage.open(storage.join(path, txt), "r") as f:
                    caption = f.read().strip()
            items.append((storage.read_bytes(uri), caption))
        if len(items) >= limit:
            break
    if not items:
        raise ValueError(f"--references {path} holds no images (.png/.jpg/.webp or .tar shards)")
    crops = []
    for data, _ in items[:limit]:
        img = open_rgb(data)
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        crops.append(np.asarray(img.crop((left, top, left + side, top + side))))
    side = min(x.shape[0] for x in crops)
    return np.concatenate([resize(x[None], side) for x in crops]), [c for _, c in items[:limit]]
