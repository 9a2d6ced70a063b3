"""Continuous-time Gaussian diffusion with log-SNR schedules (Imagen sec. 2.4, appendix A).

Contract (all tensors batch-first, ``t`` is a float tensor in [0, 1] of shape [B]):

- ``logsnr(t)``: the schedule, log(alpha^2 / sigma^2), decreasing in t.
- ``alpha_sigma(t)``: alpha_t = sqrt(sigmoid(logsnr)), sigma_t = sqrt(sigmoid(-logsnr)),
  so alpha^2 + sigma^2 = 1 (variance preserving).
- ``q_sample(x0, t, noise)``: x_t = alpha_t x0 + sigma_t noise.
- ``target(x0, noise, t)``: what the network predicts: eps, or v = alpha eps - sigma x0
  (Salimans & Ho 2022, used by Imagen Video and most SR models).
- ``predict_x0`` / ``predict_eps``: recover x0 and eps from a network output.
- ``loss(model_out, x0, noise, t)``: per-sample MSE, optionally min-SNR weighted.

Schedules: "cosine" (Nichol & Dhariwal 2021, in log-SNR form) for the 64 and 256 stages,
"linear" (the continuous form of DDPM's linear betas) for the 1024 stage, as in Imagen.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from imagen.config import DiffusionConfig

LOGSNR_MIN, LOGSNR_MAX = -20.0, 20.0


def cosine_logsnr(t: Tensor) -> Tensor:
    """log-SNR of the cosine schedule, clipped to [LOGSNR_MIN, LOGSNR_MAX] at the ends."""
    b = math.atan(math.exp(-0.5 * LOGSNR_MAX))
    a = math.atan(math.exp(-0.5 * LOGSNR_MIN)) - b
    return -2.0 * torch.log(torch.tan(a * t + b))


def linear_logsnr(t: Tensor) -> Tensor:
    """log-SNR of DDPM's linear beta schedule (beta 1e-4 -> 0.02) in continuous time."""
    return -torch.log(torch.expm1(1e-4 + 10.0 * t**2))


SCHEDULES = {"cosine": cosine_logsnr, "linear": linear_logsnr}


def _bc(x: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample [B] tensor against an image batch."""
    return x.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class GaussianDiffusion:
    """Forward process, training targets and loss for one stage. Holds no parameters."""

    def __init__(self, cfg: DiffusionConfig):
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if cfg.prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {cfg.prediction!r}; choose 'eps' or 'v'")
        self.cfg = cfg
        self._logsnr = SCHEDULES[cfg.schedule]

    def logsnr(self, t: Tensor) -> Tensor:
        return self._logsnr(t.float())

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lam = self.logsnr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return _bc(alpha, x0) * x0 + _bc(sigma, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.cfg.prediction == "eps":
            return noise
        alpha, sigma = self.alpha_sigma(t)
        return _bc(alpha, x0) * noise - _bc(sigma, x0) * x0

    def predict_x0(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t)
        a, s = _bc(alpha, x_t), _bc(sigma, x_t)
        if self.cfg.prediction == "eps":
            return (x_t - s * out) / a
        return a * x_t - s * out

    def predict_eps(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t)
        a, s = _bc(alpha, x_t), _bc(sigma, x_t)
        if self.cfg.prediction == "eps":
            return out
        return s * x_t + a * out

    def loss(self, model_out: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Per-sample loss [B]. With ``min_snr_gamma`` the MSE on the target is reweighted so
        that the implied x0-weight is min(SNR, gamma) (Hang et al. 2023)."""
        target = self.target(x0, noise, t)
        mse = (model_out.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        gamma = self.cfg.min_snr_gamma
        if gamma is None:
            return mse
        snr = self.logsnr(t).exp()
        clipped = snr.clamp(max=gamma)
        weight = clipped / snr if self.cfg.prediction == "eps" else clipped / (snr + 1)
        return mse * weight

    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        """Training noise levels, uniform in (0, 1)."""
        return torch.rand(batch, generator=generator, device=device).clamp(1e-5, 1 - 1e-5)
