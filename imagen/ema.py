"""Exponential moving average of model weights, used for sampling (Imagen appendix F).

    ema = EMA(model, EMAConfig(max_decay=0.9999))
    ...optimizer.step(); ema.update(model, step)
    ema.copy_to(sampling_model)

The decay warms up as in ema-pytorch (Karras et al. 2022's power-law profile): the shadow
copies the weights until ``update_after_step``, then folds them in every ``update_every``
steps with decay ``1 - (1 + n / inv_gamma) ** -power`` (n = steps since the warm-up ended),
capped at ``max_decay``. A fixed 0.9999 from step 0 would keep 61% of the random initial
weights after 5k steps; with power 2/3 the decay is 0.99 at 1k steps and 0.9995 at 100k.

The shadow weights are a plain dict of fp32 tensors, so they save to safetensors as is. The
shadow is a pure function of the weights seen at each step, so exact resume holds. An update
is one ``torch._foreach_lerp_`` over all fp32 weights (a few fused kernels, not one launch per
tensor: a 2B U-Net has about a thousand).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class EMAConfig:
    """The EMA's schedule (ema-pytorch's defaults, except ``max_decay`` per preset)."""

    max_decay: float = 0.9999
    update_after_step: int = 100  # before: the shadow is a copy of the weights
    update_every: int = 10  # fold the weights in every N steps (cheaper; the decay accounts for it)
    inv_gamma: float = 1.0
    power: float = 2 / 3


class EMA:
    def __init__(self, model: nn.Module, config: EMAConfig | None = None):
        self.config = config or EMAConfig()
        self.shadow: dict[str, Tensor] = {
            k: v.detach().float().clone() for k, v in model.state_dict().items()
        }

    def decay_at(self, step: int) -> float:
        """The decay applied at optimizer step ``step`` (0 = copy the weights)."""
        c = self.config
        n = step - c.update_after_step - 1
        if n <= 0:
            return 0.0
        return min(c.max_decay, max(0.0, 1 - (1 + n / c.inv_gamma) ** -c.power))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float | None:
        """Fold ``model``'s weights in after optimizer step ``step``; returns the decay used,
        or None when this step is skipped (between ``update_every`` updates)."""
        c = self.config
        if step > c.update_after_step and step % c.update_every:
            return None
        decay = self.decay_at(step)
        # Skipping update_every - 1 steps: apply the decay of all of them at once.
        decay = decay ** c.update_every if decay and c.update_every > 1 else decay
        floats, targets = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point and v.dtype == self.shadow[k].dtype:
                floats.append(self.shadow[k])
                targets.append(v.detach())
            elif v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - decay)
            else:
                self.shadow[k].copy_(v)
        if floats:  # one fused kernel per group of tensors instead of one launch per tensor
            torch._foreach_lerp_(floats, targets, 1.0 - decay)
        return decay

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]} ...")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
