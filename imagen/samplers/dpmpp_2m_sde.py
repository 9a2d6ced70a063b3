"""DPM-Solver++(2M) SDE: the second-order multistep solver of the diffusion SDE in data (x0)
prediction form (Lu et al. 2022, "DPM-Solver++", sec. 5; diffusers'
``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)``, midpoint).

The same grid and the same extrapolated x0 estimate D as :mod:`imagen.samplers.dpmpp_2m`
(lambda = logsnr / 2, h = lambda_s - lambda_t, D = (1 + 1/(2r)) x0_hat_i - 1/(2r) x0_hat_{i-1}),
but each step also forgets part of x_t and adds fresh noise, as the ancestral sampler does:

    x_s = (sigma_s / sigma_t) e^-h x_t + alpha_s (1 - e^-2h) D + sigma_s sqrt(1 - e^-2h) z

The noise corrects errors of an imperfect model along the way, where the ODE carries them to the
end. Measured on the demo's tiny base (2000 steps, guidance 3, 192 samples, colour and shape both
right): ddpm 32 steps 0.849; dpmpp_2m 16 steps 0.630 (12 steps 0.615); dpmpp_2m_sde 16 steps
0.792. One network evaluation per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from imagen.samplers.dpmpp_2m import DPMSolverPP2M


class DPMSolverPP2MSDE(DPMSolverPP2M):
    name = "dpmpp_2m_sde"

    def update(self, x: Tensor, d: Tensor, h: Tensor, alpha_s: Tensor, sigma_s: Tensor, sigma_t: Tensor,
               generator: torch.Generator | None) -> Tensor:
        """The SDE's step: part of x_t forgotten, fresh noise added (module docstring)."""
        kept = -torch.expm1(-2 * h)  # 1 - e^-2h
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return sigma_s / sigma_t * torch.exp(-h) * x + alpha_s * kept * d + sigma_s * kept.sqrt() * noise


SAMPLER = DPMSolverPP2MSDE()
