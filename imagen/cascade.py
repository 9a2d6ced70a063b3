"""Run cascade stages in order, from text to the final image (Imagen fig. A.4).

    cascade = Cascade.from_dirs(["ckpt/base64/final", "ckpt/sr256/final"], encoder=T5TextEncoder(...))
    images = cascade.generate(["a red circle"], seed=0)      # uint8 [B, H, W, 3]

Any prefix of the stages works (base only, base + sr256, ...). Each stage has its own
guidance weight, step count and, for SR stages, the fixed noise-augmentation level of the
low-res input at sampling (Imagen sec. 2.5); defaults come from each stage's config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from imagen.config import StageConfig
from imagen.diffusion import GaussianDiffusion
from imagen.sampling import sample
from imagen.unet import UNet


@dataclass
class StageOptions:
    """Per-stage sampling overrides; None = the stage config's default."""

    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    lowres_aug: float | None = None


class Cascade:
    def __init__(self, stages: Sequence[tuple[UNet, StageConfig]], encoder=None):
        """``stages`` in cascade order; ``encoder`` turns prompts into (embeds, mask)."""
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        for (_, prev), (_, cur) in zip(stages, stages[1:], strict=False):
            if cur.lowres_size != prev.image_size:
                raise ValueError(f"stage {cur.stage} expects {cur.lowres_size}px input but "
                                 f"{prev.stage} makes {prev.image_size}px images")
        if stages[0][1].lowres_size is not None:
            raise ValueError(f"the first stage must be a base stage, got {stages[0][1].stage}")
        self.stages = list(stages)
        self.encoder = encoder

    @classmethod
    def from_dirs(cls, dirs: Sequence[str], encoder=None, device: str = "cpu") -> Cascade:
        from imagen.checkpoint import load_model

        return cls([load_model(d, device=device)[:2] for d in dirs], encoder)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | None = None,
        text_embeds: Tensor | None = None,
        text_mask: Tensor | None = None,
        seed: int = 0,
        options: Sequence[StageOptions] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> np.ndarray:
        """Images as uint8 [B, H, W, 3]. Pass prompts (needs an encoder) or embeddings."""
        if text_embeds is None:
            if self.encoder is None or prompts is None:
                raise ValueError("pass prompts with an encoder, or text_embeds and text_mask")
            text_embeds, text_mask = self.encoder.encode(list(prompts))
        device = next(self.stages[0][0].parameters()).device
        text_embeds = text_embeds.to(device).float()
        text_mask = text_mask.to(device).bool()
        options = list(options or [])
        gen = torch.Generator(device=device).manual_seed(seed)
        x = None
        for i, (model, cfg) in enumerate(self.stages):
            opt = options[i] if i < len(options) else StageOptions()
            x = self._run_stage(model, cfg, opt, text_embeds, text_mask, x, gen, progress)
        return to_uint8(x)

    def _run_stage(self, model, cfg: StageConfig, opt: StageOptions, text, mask, lowres, gen,
                   progress) -> Tensor:
        d = cfg.diffusion
        diffusion = GaussianDiffusion(d)
        b = text.shape[0]
        cond = {}
        if cfg.lowres_size is not None:
            level = d.lowres_aug_sample if opt.lowres_aug is None else opt.lowres_aug
            aug_t = torch.full((b,), float(level), device=text.device)
            noise = torch.randn(lowres.shape, generator=gen, device=lowres.device)
            cond = {"lowres": diffusion.q_sample(lowres, aug_t, noise) if level > 0 else lowres,
                    "lowres_t": aug_t}
        steps = opt.steps or d.sample_steps

        def report(step: int, total: int) -> None:
            if progress is not None:
                progress(cfg.stage, step, total)

        return sample(
            model, diffusion, text, mask, (b, cfg.unet.out_channels, cfg.image_size, cfg.image_size),
            steps=steps,
            guidance_scale=d.guidance_scale if opt.guidance_scale is None else opt.guidance_scale,
            sampler=opt.sampler or d.sampler, threshold=d.dynamic_threshold, generator=gen,
            progress=report, **cond,
        )


def to_uint8(x: Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W, C]."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
