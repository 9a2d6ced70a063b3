"""Exponential moving average of model weights, used for sampling (Imagen appendix F).

    ema = EMA(model, decay=0.9999)
    ...optimizer.step(); ema.update(model, step)
    ema.copy_to(sampling_model)

The shadow weights are a plain dict of fp32 tensors, so they save to safetensors as is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, start_step: int = 0):
        self.decay = decay
        self.start_step = start_step
        self.shadow: dict[str, Tensor] = {
            k: v.detach().float().clone() for k, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold ``model``'s weights in. Before ``start_step`` the shadow just copies them."""
        decay = 0.0 if step < self.start_step else self.decay
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach().float(), 1.0 - decay)
            else:
                s.copy_(v)

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
