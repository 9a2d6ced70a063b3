"""Run cascade stages in order, from text to the final image (Imagen fig. A.4).

    cascade = Cascade.from_dirs(["ckpt/base64/final", "ckpt/sr256/final"], encoder=open_encoder(...))
    images = cascade.generate(["a red circle"], seed=0)      # uint8 [B, H, W, 3]
    out = cascade.run(["a red circle"], seed=0, num_stages=1) # + per-stage images and seconds

Any prefix of the stages works (base only, base + sr256, ...); a cascade may also start with
an SR stage, then ``run`` takes the low-res images to upsample. Each stage has its own
guidance weight, step count and, for SR stages, the fixed noise-augmentation level of the
low-res input at sampling (Imagen sec. 2.5); defaults come from each stage's config.
``run_stage`` runs one stage on its own, e.g. an SR stage on given low-res images (what
super-resolution metrics need).

Precision (``StageOptions.precision``): "auto" runs the network under bf16 autocast with TF32
matmuls on CUDA and in plain fp32 elsewhere; "fp32" and "bf16" force one. The TF32 setting is
changed only while a stage samples and restored after; the sampler's update math is fp32.

Every stage must have been trained on the text encoder that encodes the prompts: the
encoder id saved in each stage's ``config.json`` metadata is checked against the others and
against the encoder given, so a mismatch is an error at load time, not a silent bad image.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from imagen.config import StageConfig, check_chain
from imagen.diffusion import GaussianDiffusion
from imagen.sampling import sample
from imagen.text import same_encoder, same_recorded_encoder
from imagen.unet import UNet

Progress = Callable[[str, int, int], None]


@dataclass
class StageOptions:
    """Per-stage sampling overrides; None = the stage config's default."""

    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    lowres_aug: float | None = None
    precision: str = "auto"  # network: "auto" (bf16 on CUDA, else fp32), "fp32" or "bf16"


PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the network samples in under autocast for ``precision`` on ``device``;
    None = no autocast (plain fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@contextlib.contextmanager
def tf32_allowed(enabled: bool) -> Iterator[None]:
    """Let fp32 matmuls and convs use TF32 inside the block (when ``enabled``), then put the
    caller's settings back: nothing global changes at import or for good."""
    if not enabled:
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


@dataclass
class CascadeOutput:
    """What :meth:`Cascade.run` returns."""

    images: np.ndarray  # uint8 [B, H, W, 3] of the last stage run
    stage_images: list[Tensor] = field(default_factory=list)  # [B, 3, h, w] in [-1, 1] per stage
    seconds: list[float] = field(default_factory=list)  # wall-clock seconds per stage


def check_encoders(stages: Sequence[str], encoder_ids: Sequence[str | None], encoder=None) -> str | None:
    """The one encoder id the stages were trained on (None if none is recorded); ValueError when
    two stages disagree, or when ``encoder`` (anything with ``encoder_id``) is another one, by
    the identity rule of :func:`imagen.text.same_encoder`. Unknown ids are not checked."""
    known = [(s, i) for s, i in zip(stages, encoder_ids, strict=True) if i]
    for stage, enc in known[1:]:
        if not same_recorded_encoder(known[0][1], enc):
            raise ValueError(f"stage {stage} was trained on text encoder {enc} but stage "
                             f"{known[0][0]} on {known[0][1]}: train every stage on the same encoder")
    common = known[0][1] if known else None
    given = getattr(encoder, "encoder_id", None) if encoder is not None else None
    if common and given and not same_encoder(common, given):
        raise ValueError(f"stage {known[0][0]} was trained on text encoder {common}, but the encoder "
                         f"given is {given}: use the encoder named in the stage's config.json metadata")
    return common


class Cascade:
    def __init__(self, stages: Sequence[tuple[UNet, StageConfig]], encoder=None,
                 metadata: Sequence[dict[str, Any]] | None = None):
        """``stages`` in cascade order; ``encoder`` turns prompts into (embeds, mask);
        ``metadata`` per stage (config.json's "metadata": encoder_id, ...), when known."""
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        check_chain([cfg.spec for _, cfg in stages])
        self.stages = list(stages)
        self.metadata = [dict(m) for m in metadata] if metadata else [{} for _ in self.stages]
        self.encoder_id = self._common_encoder_id()
        self.encoder = None
        if encoder is not None:
            self.set_encoder(encoder)

    @classmethod
    def from_dirs(cls, dirs: Sequence[str], encoder=None, device: str = "cpu") -> Cascade:
        from imagen.checkpoint import load_model

        loaded = [load_model(d, device=device) for d in dirs]
        return cls([(m, c) for m, c, _ in loaded], encoder, metadata=[meta for _, _, meta in loaded])

    def _common_encoder_id(self) -> str | None:
        return check_encoders([cfg.stage for _, cfg in self.stages],
                              [meta.get("encoder_id") for meta in self.metadata])

    def set_encoder(self, encoder) -> None:
        """Use ``encoder`` for prompts, after checking it is the one the stages were trained on."""
        check_encoders([cfg.stage for _, cfg in self.stages],
                       [meta.get("encoder_id") for meta in self.metadata], encoder)
        dim = self.stages[0][1].unet.text_embed_dim
        if getattr(encoder, "is_local", True) and hasattr(encoder, "dim") and encoder.dim != dim:
            raise ValueError(f"the encoder gives {encoder.dim}-d embeddings, the stages expect {dim}-d")
        self.encoder = encoder

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str] | None = None,
        text_embeds: Tensor | None = None,
        text_mask: Tensor | None = None,
        seed: int = 0,
        options: Sequence[StageOptions] | None = None,
        progress: Progress | None = None,
        num_stages: int | None = None,
        lowres: Tensor | None = None,
    ) -> np.ndarray:
        """Images as uint8 [B, H, W, 3]. Pass prompts (needs an encoder) or embeddings."""
        return self.run(prompts, text_embeds, text_mask, seed, options, progress, num_stages,
                        lowres).images

    @torch.no_grad()
    def run(
        self,
        prompts: Sequence[str] | None = None,
        text_embeds: Tensor | None = None,
        text_mask: Tensor | None = None,
        seed: int = 0,
        options: Sequence[StageOptions] | None = None,
        progress: Progress | None = None,
        num_stages: int | None = None,
        lowres: Tensor | None = None,
    ) -> CascadeOutput:
        """Run the first ``num_stages`` stages (all by default); keep each stage's output and time.

        Args:
            prompts: text prompts (needs ``encoder``), or give ``text_embeds``/``text_mask``.
            seed: one torch generator seeded with it draws all noise, stage after stage, so
                the same prompts and seed give the same images.
            options: per-stage overrides, in stage order (missing entries: defaults).
            progress: called as progress(stage_name, step, steps) after every step.
            num_stages: how many stages to run, from the first stage on.
            lowres: [B, 3, s, s] in [-1, 1], the input of a cascade that starts with an SR
                stage (e.g. an ``imagen-sr256`` model on its own); ignored otherwise.
        """
        text_embeds, text_mask = self._text(prompts, text_embeds, text_mask)
        n = len(self.stages) if num_stages is None else num_stages
        if not 1 <= n <= len(self.stages):
            raise ValueError(f"num_stages must be between 1 and {len(self.stages)}, got {num_stages}")
        options = list(options or [])
        device = text_embeds.device
        gen = torch.Generator(device=device).manual_seed(seed)
        out = CascadeOutput(images=np.empty(0, np.uint8))
        x = None if lowres is None else lowres.to(device).float()  # a base stage ignores it
        for i, (model, cfg) in enumerate(self.stages[:n]):
            opt = options[i] if i < len(options) else StageOptions()
            t0 = time.perf_counter()
            x = run_stage(model, cfg, opt, text_embeds, text_mask, x, gen, progress)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.seconds.append(time.perf_counter() - t0)
            out.stage_images.append(x)
        out.images = to_uint8(x)
        return out

    def _text(self, prompts, text_embeds, text_mask) -> tuple[Tensor, Tensor]:
        if text_embeds is None:
            if self.encoder is None or prompts is None:
                raise ValueError("pass prompts with an encoder, or text_embeds and text_mask")
            text_embeds, text_mask = self.encoder.encode(list(prompts))
        device = next(self.stages[0][0].parameters()).device
        return text_embeds.to(device).float(), text_mask.to(device).bool()


def run_stage(model: UNet, cfg: StageConfig, opt: StageOptions, text: Tensor, mask: Tensor,
              lowres: Tensor | None, gen: torch.Generator | None,
              progress: Progress | None = None) -> Tensor:
    """Sample one stage: [B, 3, S, S] in [-1, 1]. SR stages take ``lowres`` [B, 3, s, s] in
    [-1, 1], noised at the stage's fixed sampling augmentation level (Imagen sec. 2.5). The
    network runs in ``opt.precision`` (see the module docstring)."""
    dtype = autocast_dtype(opt.precision, text.device)
    d = cfg.diffusion
    diffusion = GaussianDiffusion(d)
    b = text.shape[0]
    cond = {}
    if cfg.lowres_size is not None:
        if lowres is None or lowres.shape[-1] != cfg.lowres_size:
            got = None if lowres is None else tuple(lowres.shape)
            raise ValueError(f"stage {cfg.stage} needs low-res input [B, 3, {cfg.lowres_size}, "
                             f"{cfg.lowres_size}], got {got}")
        level = d.lowres_aug_sample if opt.lowres_aug is None else opt.lowres_aug
        aug_t = torch.full((b,), float(level), device=text.device)
        noise = torch.randn(lowres.shape, generator=gen, device=lowres.device)
        cond = {"lowres": diffusion.q_sample(lowres, aug_t, noise) if level > 0 else lowres,
                "lowres_t": aug_t}

    def report(step: int, total: int) -> None:
        if progress is not None:
            progress(cfg.stage, step, total)

    with tf32_allowed(dtype is not None and text.device.type == "cuda"):
        return sample(
            model, diffusion, text, mask, (b, cfg.unet.out_channels, cfg.image_size, cfg.image_size),
            steps=opt.steps or d.sample_steps,
            guidance_scale=d.guidance_scale if opt.guidance_scale is None else opt.guidance_scale,
            sampler=opt.sampler or d.sampler, threshold=d.dynamic_threshold, generator=gen,
            progress=report, autocast_dtype=dtype, **cond,
        )


def to_uint8(x: Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 [B, H, W, C]."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
