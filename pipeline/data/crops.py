"""A training sample's pixels for one cascade stage, from the image bytes a shard holds.

The image's short side is resized to the stage's ``image_size`` (never up: a smaller image raises
:class:`TooSmall`, and the loader skips and counts it; a stage learns only from real pixels at its
own resolution, Imagen sec. 2.5), then a ``crop_size`` square is cut (centred, or at random for SR
stages) and maybe flipped; an SR stage's low-res input is the same crop downsampled by area
averaging::

    from pipeline.data.crops import decode_image
    out = decode_image(data, cfg, aug=(0.5, 0.5, 1.0))    # cfg: a loader TrainDataConfig
    out["image"]      # uint8 [C, C, 3]
    out["lowres"]     # uint8 [c, c, 3], SR stages only

Used by the training and validation loaders (:mod:`pipeline.data.loader`), in their workers.
"""

from __future__ import annotations

import io
from typing import Protocol

import numpy as np

from pipeline.data.images import to_rgb


class CropSettings(Protocol):
    """What a crop needs of the loader's ``TrainDataConfig`` (declared here, so crops does not
    import the loader that imports it)."""

    image_size: int
    crop_size: int
    lowres_crop_size: int | None
    random_crop: bool
    random_flip: bool

# Downscale by an integer box reduction first, then bicubic over the last factor <= 2
# (PIL's reducing_gap): 2x faster than plain bicubic at 256 -> 64, within a few grey levels.
_REDUCING_GAP = 2.0


class TooSmall(ValueError):
    """The image is smaller than the stage: it is skipped, never upscaled."""


def _resize_short_side(img, size: int):
    from PIL import Image

    w, h = img.size
    if min(w, h) < size:
        raise TooSmall(f"{w}x{h} image is smaller than this stage's {size} px: never upscaled")
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if img.format == "JPEG" and scale <= 0.5:
        # Decode at 1/2..1/8 scale in the DCT (JPEG draft mode): far faster, same geometry.
        img.draft("RGB", new)
    img = to_rgb(img)  # 16-bit scaled, alpha on white, CMYK via its ICC profile, EXIF upright
    if (img.width > img.height) != (w > h):
        new = new[::-1]  # EXIF orientation swapped the axes (never in shards img2dataset wrote)
    if img.size != new:
        img = img.resize(new, Image.Resampling.BICUBIC, reducing_gap=_REDUCING_GAP)
    return img


def decode_image(
    data: bytes, cfg: CropSettings, aug: tuple[float, float, float] = (0.5, 0.5, 1.0)
) -> dict[str, np.ndarray]:
    """Bytes -> {"image": uint8 [C,C,3], "lowres"?: uint8 [c,c,3]}: resize, crop, flip.

    The short side is resized to ``cfg.image_size`` (an image smaller than that raises
    :class:`TooSmall`: never upscaled), then a ``cfg.crop_size`` square is cut.
    ``aug`` = uniform draws (crop x, crop y, flip): the crop is centred unless
    ``cfg.random_crop``; the image is flipped when ``cfg.random_flip`` and the draw < 0.5.
    The arrays are read-only views of PIL's pixels (``collate`` copies them once). ``cfg`` is a
    :class:`pipeline.data.loader.TrainDataConfig` (image_size, crop_size, lowres_crop_size,
    random_crop, random_flip).
    """
    from PIL import Image

    size = cfg.crop_size
    img = _resize_short_side(Image.open(io.BytesIO(data)), cfg.image_size)
    w, h = img.size
    if cfg.random_crop:
        left = min(int(aug[0] * (w - size + 1)), w - size)
        top = min(int(aug[1] * (h - size + 1)), h - size)
    else:
        left, top = (w - size) // 2, (h - size) // 2
    if (w, h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    if cfg.random_flip and aug[2] < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = {"image": np.asarray(img)}
    if cfg.lowres_crop_size is not None:
        out["lowres"] = np.asarray(_lowres(img, cfg.lowres_crop_size))
    return out


def _lowres(img, side: int):
    """The SR stage's conditioning input (Imagen sec. 2.5), from the same crop and flip.

    Area averaging (box filter), as img2dataset downsamples by default: the SR stage is
    conditioned on images made like the base stage's training images (and so like its
    samples). An integer factor is a plain block mean, the fastest path.
    """
    from PIL import Image

    factor = img.size[0] / side
    if factor == int(factor):
        return img.reduce(int(factor))
    return img.resize((side, side), Image.Resampling.BOX)
