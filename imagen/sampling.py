"""Sampling one stage: classifier-free guidance and dynamic thresholding (Imagen sec.
2.2-2.3) around a sampler from ``imagen.samplers``.

    x = sample(model, diffusion, text_embeds, text_mask, shape=(4, 3, 64, 64),
               steps=64, guidance_scale=5.0, sampler="ddpm", generator=g)

``model(x_t, t, text_embeds, text_mask, **cond)`` returns the network output (eps or v, as
``diffusion.cfg.prediction`` says). ``sample`` turns it into a denoiser, x_t -> thresholded
x0_hat, and hands the loop to the sampler named by ``sampler`` (one file each, see
``imagen/samplers/``): it picks its time grid from t=1 to t=0 and owns the update math.

- ddpm: ancestral, samples the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020; log-SNR form,
  Kingma et al. 2021, eq. 33).
- ddim: deterministic, x_s = alpha_s x0_hat + sigma_s eps_hat (Song et al. 2021).
- dpmpp_2m: DPM-Solver++(2M), second-order multistep in x0 form (Lu et al. 2022), on a
  log-SNR-uniform grid; on Gaussian data 10 of its steps beat the variance error of 256
  ddpm steps (tests/unit/test_samplers.py).

``steps`` counts network evaluations per image: each of these samplers evaluates once per step,
and the last step returns x0_hat.

Guidance: out = uncond + w (cond - uncond), unconditional = all-False text mask, so w = 1
is exactly the conditional prediction. Dynamic thresholding: per sample, s = max(1,
quantile_p(|x0_hat|)), x0_hat = clip(x0_hat, -s, s) / s; ``threshold=None`` clips to [-1, 1].

Speed: a model with ``encode_text`` (the U-Net) has its text-only work (norm, pooling, every
cross-attention key and value) done once per call, on the guided batch, and gets it as
``model(x_t, t, text_context=ctx, **cond)`` at every step; a plain callable gets the text.
``autocast_dtype`` runs the network calls, and only those, under autocast: guidance, x0
prediction, thresholding and the update stay in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from imagen.diffusion import GaussianDiffusion, _bc
from imagen.samplers import get_sampler

if TYPE_CHECKING:
    from imagen.unet import TextContext

ModelFn = Callable[..., Tensor]


def dynamic_threshold(x0: Tensor, p: float | None) -> Tensor:
    """Imagen sec. 2.3. ``p=None`` is static clipping to [-1, 1]."""
    if p is None:
        return x0.clamp(-1.0, 1.0)
    s = torch.quantile(x0.abs().flatten(1).float(), p, dim=1).clamp(min=1.0)
    s = _bc(s, x0)
    return x0.clamp(-s, s) / s


def guidance_text(text: Tensor, mask: Tensor, guidance_scale: float) -> tuple[Tensor, Tensor]:
    """The text and mask of the network's batch: as given without guidance, else the
    [cond; uncond] halves, the text twice with the second half's mask all False."""
    if guidance_scale == 1.0:
        return text, mask
    return torch.cat([text, text]), torch.cat([mask, torch.zeros_like(mask)])


def guided_output(model: ModelFn, x: Tensor, t: Tensor, text: Tensor, mask: Tensor,
                  guidance_scale: float, text_context: TextContext | None = None,
                  **cond: Tensor) -> Tensor:
    """Classifier-free guidance in one batched forward pass (cond and uncond halves), in fp32.

    ``text_context``: ``model.encode_text(*guidance_text(text, mask, guidance_scale))``, then
    passed to the model in place of ``text`` and ``mask``; None calls the model with them.
    """
    guided = guidance_scale != 1.0
    if guided:
        x, t, cond = torch.cat([x, x]), torch.cat([t, t]), {k: torch.cat([v, v]) for k, v in cond.items()}
    if text_context is None:
        out = model(x, t, *guidance_text(text, mask, guidance_scale), **cond).float()
    else:
        out = model(x, t, text_context=text_context, **cond).float()
    if not guided:
        return out
    c, u = out.chunk(2)
    return u + guidance_scale * (c - u)


def _network(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The context the network runs in: autocast to ``dtype``, or nothing for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def sample(
    model: ModelFn,
    diffusion: GaussianDiffusion,
    text_embeds: Tensor,
    text_mask: Tensor,
    shape: tuple[int, ...],
    steps: int = 64,
    guidance_scale: float = 1.0,
    sampler: str = "ddpm",
    threshold: float | None = 0.995,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
    **cond: Tensor,
) -> Tensor:
    """Draw images of ``shape`` in [-1, 1].

    Args:
        model: the network (see module docstring).
        diffusion: the stage's schedule and prediction type.
        text_embeds, text_mask: [B, L, D] and [B, L]; B must equal shape[0].
        shape: output shape [B, C, H, W].
        steps: network evaluations per image (any positive integer): one per step for every
            sampler in ``imagen.samplers``; the guided pass is one evaluation.
        guidance_scale: classifier-free guidance weight w (1 = no guidance).
        sampler: a name in ``imagen.samplers.SAMPLER_NAMES``: "ddpm" (ancestral), "ddim"
            (deterministic) or "dpmpp_2m" (DPM-Solver++(2M), the fewest steps).
        threshold: dynamic-thresholding percentile p, or None for static clipping.
        generator: torch RNG for reproducible samples: the start noise, and the per-step
            noise of a stochastic sampler (ddpm).
        progress: called as progress(step, steps) after every step.
        autocast_dtype: run the network under autocast to this dtype (e.g. torch.bfloat16
            on CUDA); None runs it as it is.
        **cond: extra model inputs, e.g. ``lowres`` and ``lowres_t`` for SR stages.
    """
    method = get_sampler(sampler)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = text_embeds.device
    x = torch.randn(shape, generator=generator, device=device)
    ctx = None
    if callable(getattr(model, "encode_text", None)):
        with _network(device, autocast_dtype):  # the same text at every step: encode it once
            ctx = model.encode_text(*guidance_text(text_embeds, text_mask, guidance_scale))

    def denoise(x_t: Tensor, t: Tensor) -> Tensor:
        with _network(device, autocast_dtype):
            out = guided_output(model, x_t, t, text_embeds, text_mask, guidance_scale, ctx, **cond)
        return dynamic_threshold(diffusion.predict_x0(x_t, t, out), threshold)

    times = method.timesteps(steps, diffusion, device)
    return method.run(denoise, x, times, diffusion, generator, progress).clamp(-1.0, 1.0)
