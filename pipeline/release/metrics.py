"""Image metrics for `imagen-pipeline evaluate`: prompt alignment, super-resolution quality,
FID and CLIP score. Plain functions over uint8 images [B, H, W, 3]::

    from pipeline.release import metrics
    metrics.dominant_color(img, palette), metrics.classify_shape(img)   # the tiny-data checker
    metrics.alignment(images, [("red", "circle"), ...], palette)        # fractions right
    metrics.psnr_ssim(sr_images, references)                            # SR stages
    metrics.fid(real, fake, "inception-2015-12-05.pt")                  # user-supplied weights
    metrics.clip_score(images, prompts, "/models/clip-vit-base-patch16")

The alignment checker reads what the synthetic tiny dataset renders (pipeline/dev/tinydata.py):
one filled shape of a named colour on a plain background. The background is the median of
the border pixels, the foreground every pixel far from it; the colour is the palette entry
nearest to the foreground's median, the shape comes from the foreground's bounding box (a
triangle is narrow at the top, a square fills its corners, a circle does neither).

PSNR and SSIM come from torchmetrics, FID from torchmetrics' Frechet distance over a
TorchScript feature extractor the user supplies (no weights are downloaded here, and
torch-fidelity would pull in torchvision, which does not run beside this torch build). The
CLIP score is computed with transformers' CLIPModel directly: torchmetrics 1.9's CLIPScore
expects transformers 4's feature tensors and fails on transformers 5's output objects.
"""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch

BACKGROUND_TOL = 60  # max channel distance from the background colour still called background
MIN_FOREGROUND = 0.01  # below this fraction of foreground pixels the image shows nothing
FID_SIZE = 299  # Inception-v3 input side (clean-fid resizes with PIL bicubic, Parmar et al. 2022)

Palette = dict[str, tuple[int, int, int]]


def background_color(image: np.ndarray) -> np.ndarray:
    """Median of the border pixels of a uint8 [H, W, 3] image: a shape covers less than half
    of the border even when it touches an edge."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.int32)
    return np.median(border, axis=0)


def foreground_mask(image: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """bool [H, W]: pixels farther than BACKGROUND_TOL (any channel) from the background."""
    bg = background_color(image) if background is None else np.asarray(background)
    return np.abs(image.astype(np.int32) - bg).max(axis=-1) > BACKGROUND_TOL


def dominant_color(image: np.ndarray, palette: Palette, background=None) -> str | None:
    """Name of the palette colour nearest to the median foreground pixel of a uint8
    [H, W, 3] image; None when (almost) everything is background."""
    mask = foreground_mask(image, background)
    if mask.mean() < MIN_FOREGROUND:
        return None
    centre = np.median(image[mask].astype(np.int32), axis=0)
    names = list(palette)
    dists = [np.abs(centre - np.array(palette[n])).sum() for n in names]
    return names[int(np.argmin(dists))]


def classify_shape(image: np.ndarray, background=None) -> str | None:
    """"circle", "square" or "triangle" for one filled shape; None when there is none.

    On the tiny dataset's renders (any size from 32 px up) the features separate by wide
    margins (tests/unit/test_metrics.py): a triangle's top quarter is under 0.35 as full as its
    bottom quarter (circle, square: 0.7 and up); a square fills its corners (> 0.8), a circle
    does not (< 0.2).
    """
    mask = foreground_mask(image, background)
    if mask.mean() < MIN_FOREGROUND:
        return None
    ys, xs = np.nonzero(mask)
    # 1st-99th percentile box: a few stray pixels of a generated image must not stretch it
    y0, y1 = np.round(np.percentile(ys, [1, 99])).astype(int)
    x0, x1 = np.round(np.percentile(xs, [1, 99])).astype(int)
    box = mask[y0: y1 + 1, x0: x1 + 1]
    h, w = box.shape
    q = max(1, h // 4)
    if box[:q].mean() < 0.5 * max(box[-q:].mean(), 1e-6):
        return "triangle"
    c = max(1, min(h, w) // 5)
    corners = np.mean([box[:c, :c].mean(), box[:c, -c:].mean(), box[-c:, :c].mean(), box[-c:, -c:].mean()])
    return "square" if corners > 0.5 else "circle"


def alignment_flags(images: np.ndarray, specs: list[tuple[str, str]], palette: Palette
                    ) -> dict[str, np.ndarray]:
    """Per image: does its colour, its shape, and both match the prompted (colour, shape)."""
    colour_ok, shape_ok = [], []
    for img, (colour, shape) in zip(images, specs, strict=True):
        colour_ok.append(dominant_color(img, palette) == colour)
        shape_ok.append(classify_shape(img) == shape)
    c, s = np.array(colour_ok, dtype=bool), np.array(shape_ok, dtype=bool)
    return {"color": c, "shape": s, "both": c & s}


def alignment(images: np.ndarray, specs: list[tuple[str, str]], palette: Palette) -> dict[str, float]:
    """Fractions of images whose colour, shape, and both match the prompted (colour, shape)."""
    return {k: float(v.mean()) for k, v in alignment_flags(images, specs, palette).items()}


def paired_gain(a_ok: np.ndarray, b_ok: np.ndarray) -> dict[str, float]:
    """Is A right more often than B on the same cases (same prompt, same seed)? The exact
    one-sided McNemar test: among the pairs where exactly one is right, A's wins are
    Binomial(n, 1/2) if A and B were equally good. Returns the gain in rate, the discordant
    counts and the p-value (scipy's binomtest)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a_ok, dtype=bool), np.asarray(b_ok, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_gain needs two equal, non-empty 1-d arrays, got {a.shape} and {b.shape}")
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
    return {"gain": float(a.mean() - b.mean()), "wins": wins, "losses": losses, "p_value": float(p)}


def render_references(specs: list[tuple[str, str]], size: int, seed: int = 0,
                      background: str = "white") -> np.ndarray:
    """Images of the tiny dataset's distribution for (colour, shape) specs, uint8 [B, S, S, 3]:
    drawn at the dataset's 96 px with its box sizes, then resized like the training data."""
    from PIL import Image

    from pipeline.dev.tinydata import draw_shape

    rng = random.Random(seed)
    src = 96
    out = []
    for colour, shape in specs:
        side = rng.randint(src * 2 // 5, src * 3 // 4)
        x0, y0 = rng.randint(0, src - side - 1), rng.randint(0, src - side - 1)
        img = draw_shape((src, src), colour, shape, background, (x0, y0, x0 + side, y0 + side))
        out.append(np.asarray(img.resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(out)


def resize(images: np.ndarray, size: int, method: str = "bicubic") -> np.ndarray:
    """Resize uint8 [B, H, W, 3] to [B, size, size, 3] with PIL: ``bicubic`` (the upsampling
    baseline), or ``area`` (box averaging: how the loader makes an SR stage's low-res input)."""
    from PIL import Image

    resample = {"bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX}[method]
    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), resample)) for x in images])


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def psnr_ssim(preds: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM (Gaussian window 11, sigma 1.5) of uint8 [B, H, W, 3] pairs."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    if preds.shape != target.shape:
        raise ValueError(f"PSNR/SSIM need images of one shape, got {preds.shape} and {target.shape}")
    p, t = _to_float(preds), _to_float(target)
    psnr = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(p, t, data_range=1.0)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim)}


class TorchScriptFeatures(torch.nn.Module):
    """A TorchScript image feature extractor as the ``feature`` module of torchmetrics' FID.

    The file maps float images [B, 3, H, W] in [0, 255] to features [B, D], e.g. the
    Inception-v3 ``inception-2015-12-05.pt`` that clean-fid and StyleGAN use (called with
    ``return_features=True`` when its forward takes that argument).
    """

    def __init__(self, path: str):
        super().__init__()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FID weights {path} not found: give a TorchScript feature "
                                    "extractor file such as inception-2015-12-05.pt")
        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript, yet the standard FID Inception ships as one
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(path, map_location="cpu").eval()
        except RuntimeError as e:
            raise ValueError(f"{path} is not a TorchScript file ({str(e).splitlines()[0]}): FID takes "
                             "a TorchScript feature extractor such as inception-2015-12-05.pt") from None
        args = [a.name for a in self.net.forward.schema.arguments]
        self.kwargs = {"return_features": True} if "return_features" in args else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float(), **self.kwargs).flatten(1)


def fid(real: np.ndarray, fake: np.ndarray, weights: str, size: int = FID_SIZE) -> float:
    """Frechet distance between the features of two uint8 image sets [N, H, W, 3] (N >= 2)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real, {len(fake)} fake")
    metric = FrechetInceptionDistance(feature=TorchScriptFeatures(weights), normalize=False)
    for images, is_real in ((real, True), (fake, False)):
        x = _to_float(resize(images, size)) * 255.0
        metric.update(x, real=is_real)
    return float(metric.compute())


def clip_score(images: np.ndarray, prompts: list[str], model_dir: str) -> float:
    """Mean CLIP score 100 * max(cos(image, text), 0) (Hessel et al. 2021, torchmetrics'
    scale) with a local transformers CLIP directory (e.g. openai/clip-vit-base-patch16)."""
    from transformers import CLIPModel, CLIPProcessor

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"CLIP model {model_dir} not found: give a local directory saved "
                                "with save_pretrained (model + processor)")
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                       truncation=True)
    with torch.no_grad():
        out = model(**inputs)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    return float((100 * (img * txt).sum(-1)).clamp(min=0).mean())
