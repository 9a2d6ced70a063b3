"""DDIM: the deterministic sampler of Song et al. 2021 (eq. 12 with eta = 0).

From level t to the next level s, keep the predicted noise and swap the signal:

    eps_hat = (x_t - alpha_t x0_hat) / sigma_t,    x_s = alpha_s x0_hat + sigma_s eps_hat

It is the first-order DPM-Solver(++) step (Lu et al. 2022): an exact integrator of the
probability-flow ODE when x0_hat is constant over the step. One network evaluation per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from imagen.diffusion import GaussianDiffusion
from imagen.samplers.base import Denoiser, Progress, Sampler


class DDIM(Sampler):
    name = "ddim"

    def run(self, denoise: Denoiser, x: Tensor, times: Tensor, diffusion: GaussianDiffusion,
            generator: torch.Generator | None = None, progress: Progress | None = None) -> Tensor:
        steps = len(times) - 1
        alpha, sigma = diffusion.alpha_sigma(times)
        for i in range(steps):
            x0 = denoise(x, times[i].expand(x.shape[0]))
            if i == steps - 1:
                x = x0
            else:
                eps = (x - alpha[i] * x0) / sigma[i]
                x = alpha[i + 1] * x0 + sigma[i + 1] * eps
            if progress is not None:
                progress(i + 1, steps)
        return x


SAMPLER = DDIM()
