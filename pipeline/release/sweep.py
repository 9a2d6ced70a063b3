"""Choose how a trained SR stage samples: its guidance weight and noise-augmentation level, swept
on held-out images (Imagen sec. 2.5: the augmentation level is random in training, fixed at
sampling, and "we sweep over its different values to find the optimal sample quality").

    result = sweep_sr(model, cfg, lowres, target, text, mask, seed=0)
    result.values   # {"guidance_scale": 1.0, "lowres_aug_sample": 0.05}: the best pair
    result.table    # one row per pair: lowres_aug, guidance_scale, psnr, ssim, seconds

The grid is :data:`AUG_LEVELS` within the levels the stage trained on (up to
``lowres_aug_max``) times :data:`GUIDANCE_WEIGHTS`, plus the stage config's own pair (the
preset's anchor, e.g. DeepFloyd IF's 4 and 0.25 for the paper SR presets). Every pair
super-resolves the same real low-res inputs from the same seed (the same starting and
augmentation noise), so the pairs differ only in the setting. The score is PSNR against the real
high-resolution images (:data:`METRIC`), ties broken by SSIM, then by the anchor, then by the lower
weight (the cheaper sampler: w = 1 needs no unconditional pass).

PSNR rewards the posterior mean, so it leans towards low augmentation and little guidance on a
stage's own validation inputs; at scale, where FID on thousands of images is affordable, a
sharper criterion may pick another pair. The sweep is cheap beside training: len(grid) x the
evaluation's SR samples (16 by default), the guided pairs at twice the cost.

`evaluate` runs it for every SR stage it scores (``EvalOptions.sweep``), logs the table (metrics
``eval/<stage>/sweep/psnr_aug<a>_w<w>`` and ``eval/sweep_<stage>.json``) and stores the chosen
pair with the stage (``imagen.checkpoint.save_sampling``: ``sampling.json``), so `register`,
`sample`, the pyfunc and the cascade sample with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

AUG_LEVELS = (0.0, 0.05, 0.1, 0.25)  # those above the stage's lowres_aug_max are left out
GUIDANCE_WEIGHTS = (1.0, 2.0, 4.0)
METRIC = "psnr"  # higher is better; ties: ssim


@dataclass
class SweepResult:
    values: dict[str, float]  # the chosen pair, as DiffusionConfig fields
    table: list[dict[str, float]] = field(default_factory=list)  # one row per pair, grid order
    images: np.ndarray | None = None  # uint8 [B, H, W, 3]: the chosen pair's outputs
    seconds: float = 0.0  # sampling time of the chosen pair

    def record(self, source: str, images: int, seed: int) -> dict[str, Any]:
        """How the pair was chosen, for sampling.json's record and the MLflow summary."""
        return {"chosen_by": "pipeline/release/sweep.py", "metric": METRIC, "source": source,
                "images": images, "seed": seed, "table": self.table}


def grid(cfg) -> list[tuple[float, float]]:
    """(augmentation level, guidance weight) pairs for stage config ``cfg``, levels ascending."""
    d = cfg.diffusion
    levels = sorted({a for a in AUG_LEVELS if a <= d.lowres_aug_max} | {float(d.lowres_aug_sample)})
    weights = sorted(set(GUIDANCE_WEIGHTS) | {float(d.guidance_scale)})
    return [(a, w) for a in levels for w in weights]


def metric_name(aug: float, weight: float) -> str:
    """``psnr_aug0.05_w2.0``: one metric key per pair (MLflow allows no '=' or ',')."""
    return f"{METRIC}_aug{aug:g}_w{weight:.1f}"


def sweep_sr(model, cfg, lowres, target: np.ndarray, text, mask, seed: int = 0, steps: int | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> SweepResult:
    """Sample every pair of :func:`grid` on ``lowres`` [B, 3, s, s] in [-1, 1] (on the model's
    device) against ``target`` uint8 [B, H, W, 3]; return the best (module docstring)."""
    import torch

    from imagen.cascade import StageOptions, run_stage, to_uint8
    from pipeline.release.metrics import psnr_ssim

    device = next(model.parameters()).device
    d = cfg.diffusion
    anchor = (float(d.lowres_aug_sample), float(d.guidance_scale))
    rows, outputs = [], []
    for aug, weight in grid(cfg):
        gen = torch.Generator(device).manual_seed(seed)  # every pair: the same noise
        t0 = time.perf_counter()
        with torch.no_grad():
            x = run_stage(model, cfg, StageOptions(steps=steps, guidance_scale=weight, lowres_aug=aug),
                          text.to(device).float(), mask.to(device).bool(), lowres, gen, progress)
        images = to_uint8(x)
        seconds = time.perf_counter() - t0
        rows.append({"lowres_aug": aug, "guidance_scale": weight, **psnr_ssim(images, target),
                     "seconds": round(seconds, 3)})
        outputs.append((images, seconds))

    def rank(i: int) -> tuple:
        r = rows[i]
        return (r["psnr"], r["ssim"], (r["lowres_aug"], r["guidance_scale"]) == anchor, -r["guidance_scale"])

    best = max(range(len(rows)), key=rank)
    values = {"guidance_scale": rows[best]["guidance_scale"], "lowres_aug_sample": rows[best]["lowres_aug"]}
    return SweepResult(values, rows, *outputs[best])
