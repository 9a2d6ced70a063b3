"""Samplers, one algorithm per file, chosen by name (as diffusers keeps one scheduler per file).

    from imagen.samplers import get_sampler
    sampler = get_sampler("dpmpp_2m")     # ValueError naming the choices for an unknown name

- ``ddpm``: ancestral, a draw from the forward posterior each step (Ho et al. 2020).
- ``ddim``: deterministic, first-order ODE step (Song et al. 2021).
- ``dpmpp_2m``: DPM-Solver++(2M), second-order multistep ODE solver in x0 form (Lu et al.
  2022); the most accurate per network evaluation on an exact denoiser.
- ``dpmpp_2m_sde``: its SDE form, fresh noise every step as ``ddpm``: on an imperfect model
  the better of the two in few steps (the tiny base's figures in its file).

Each file defines ``SAMPLER``, an instance of ``imagen.samplers.base.Sampler`` (the contract:
``timesteps`` and ``run``). A new sampler is a new file and one line in ``SAMPLERS``. The
modules import torch, so they load on first use: listing the names (the CLI's ``--sampler``
choices) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagen.samplers.base import Sampler

# name -> the module that defines it as SAMPLER
SAMPLERS: dict[str, str] = {
    "ddim": "imagen.samplers.ddim",
    "ddpm": "imagen.samplers.ddpm",
    "dpmpp_2m": "imagen.samplers.dpmpp_2m",
    "dpmpp_2m_sde": "imagen.samplers.dpmpp_2m_sde",
}
SAMPLER_NAMES: tuple[str, ...] = tuple(sorted(SAMPLERS))


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name`` (a config's ``diffusion.sampler``, ``--sampler``)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    return importlib.import_module(SAMPLERS[name]).SAMPLER
