"""The contract every sampler in ``imagen/samplers/`` implements.

A sampler owns one update rule and its loop; ``imagen.sampling.sample`` owns the network
(text encoding, guidance, autocast) and hands the sampler a denoiser:

    sampler = get_sampler("dpmpp_2m")
    times = sampler.timesteps(steps, diffusion, device)   # [steps + 1], from t=1 down to t=0
    x = sampler.run(denoise, x_1, times, diffusion, generator, progress)

``denoise(x_t, t)`` takes an image batch and its noise levels ``t`` [B] and returns the
thresholded x0 prediction in fp32, one network evaluation (one guided batch) per call. Every
sampler here calls it once per step (so ``steps`` counts network evaluations per image) and
returns the last step's x0 prediction as the sample: the final step goes to sigma = 0.

Rules for a sampler: the update math is fp32 on ``x``'s device; nothing is read back to the
host inside the loop (no ``.item()``, no branch on a tensor's value), so a CUDA stream never
waits; ``generator`` is drawn from only by stochastic samplers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from imagen.diffusion import GaussianDiffusion

Denoiser = Callable[[Tensor, Tensor], Tensor]
Progress = Callable[[int, int], None]


class Sampler:
    """One update rule. ``name`` is what configs and ``--sampler`` call it."""

    name: str

    def timesteps(self, steps: int, diffusion: GaussianDiffusion,
                  device: torch.device | str) -> Tensor:
        """The time grid: ``steps + 1`` levels from t=1 (pure noise) to t=0; here uniform in t."""
        return torch.linspace(1.0, 0.0, steps + 1, device=device)

    def run(self, denoise: Denoiser, x: Tensor, times: Tensor, diffusion: GaussianDiffusion,
            generator: torch.Generator | None = None, progress: Progress | None = None) -> Tensor:
        """Denoise ``x`` (noise at ``times[0]``) along ``times``; return the sample.

        Args:
            denoise: x0 prediction, see the module docstring.
            x: [B, ...] fp32 start, x_1 ~ N(0, I).
            times: the grid of ``timesteps``; ``len(times) - 1`` steps, one evaluation each.
            diffusion: the schedule (``logsnr``, ``alpha_sigma``) the network was trained on.
            generator: RNG of stochastic samplers; deterministic ones never draw from it.
            progress: called as ``progress(step, steps)`` after every step.
        """
        raise NotImplementedError
