"""Stage weights on disk: safetensors plus the resolved config as JSON. Loading never unpickles.

    save_weights(dir, model.state_dict(), cfg, ema=ema.state_dict(), metadata={...})
    model, cfg = load_model(dir)               # EMA weights when present (what sampling wants)

Layout of a weights directory::

    config.json         StageConfig.to_dict() plus "metadata" (encoder id, code version, ...)
    model.safetensors   raw weights
    ema.safetensors     EMA weights (optional)

Training checkpoints (optimizer, RNG, data position) add files beside these; see
``pipeline/train.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from imagen.config import StageConfig
from imagen.unet import UNet

CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_weights(directory: str, state: dict[str, Tensor], cfg: StageConfig,
                 ema: dict[str, Tensor] | None = None, metadata: dict[str, Any] | None = None) -> None:
    """Write config.json, model.safetensors and (optionally) ema.safetensors to a local dir."""
    os.makedirs(directory, exist_ok=True)
    save_file(_contiguous(state), os.path.join(directory, MODEL_NAME), metadata={"stage": cfg.stage})
    if ema is not None:
        save_file(_contiguous(ema), os.path.join(directory, EMA_NAME), metadata={"stage": cfg.stage})
    doc = {**cfg.to_dict(), "metadata": metadata or {}}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)


def load_config(directory: str) -> tuple[StageConfig, dict[str, Any]]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {directory} a stage weights directory?")
    with open(path) as f:
        doc = json.load(f)
    metadata = doc.pop("metadata", {})
    return StageConfig.from_dict(doc), metadata


def load_model(directory: str, use_ema: bool = True, device: str | torch.device = "cpu"
               ) -> tuple[UNet, StageConfig, dict[str, Any]]:
    """Build the U-Net from config.json and load its (EMA, if present and asked) weights."""
    cfg, metadata = load_config(directory)
    name = EMA_NAME if use_ema and os.path.exists(os.path.join(directory, EMA_NAME)) else MODEL_NAME
    model = UNet(cfg.unet)
    model.load_state_dict(load_file(os.path.join(directory, name), device=str(device)))
    return model.to(device).eval(), cfg, metadata
