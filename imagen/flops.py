"""FLOPs and parameter counts of a U-Net, from shapes alone (the ``meta`` device).

The capacity planner (``imagen-pipeline plan``) turns a GPU's peak FLOP/s and an MFU into
images/s with these counts, and the GPU check (``bench/gpu.py``) turns a measured images/s
back into an MFU::

    from imagen.config import preset
    from imagen.flops import unet_forward_flops, unet_params
    cfg = preset("base64")
    unet_forward_flops(cfg.unet, 64)     # FLOPs of one image's forward pass (2 per multiply-add)
    unet_params(cfg.unet)                # 2.07e9 for the paper base model
    count_flops(torch.nn.Linear(16, 32), torch.empty(4, 16))   # 2 * 4 * 16 * 32 = 4096

The model is built on ``torch.device("meta")``: no memory is allocated and nothing is
computed, so counting the paper's 2B-parameter base model takes about a second. There,
``scaled_dot_product_attention`` decomposes into matmuls that are counted (a real CPU forward
runs it as one fused kernel that ``FlopCounterMode`` does not count; CUDA's flash and
memory-efficient kernels are counted).
``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and attention
(2 FLOPs per multiply-add); elementwise ops, norms and interpolation are not counted, the
usual convention for MFU (PaLM, appendix B). One training step of an image costs about
``TRAIN_FLOPS_PER_FORWARD`` forward passes (the backward pass is two: gradients of the
activations and of the weights), four with gradient checkpointing (one recomputed forward).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from imagen.config import UNetConfig
from imagen.unet import UNet

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (2x): the MFU convention
TEXT_TOKENS = 128  # Imagen's max caption length (appendix F): the padded upper bound


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` (a module or any callable; meta tensors cost nothing)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _meta_unet(cfg: UNetConfig) -> UNet:
    with torch.device("meta"):
        return UNet(cfg).train()


def unet_params(cfg: UNetConfig) -> int:
    """Number of parameters of ``UNet(cfg)``, counted without allocating them."""
    return _params(_frozen(cfg))


def unet_forward_flops(cfg: UNetConfig, image_size: int | None = None, text_tokens: int = TEXT_TOKENS,
                       batch: int = 1) -> int:
    """FLOPs of one forward pass of ``UNet(cfg)`` per image.

    Args:
        cfg: the U-Net's shape.
        image_size: side of the (square) input; default ``cfg.image_size``. SR stages that
            train on crops pass the crop side (e.g. 256 for the 1024 px stage); the low-res
            input is then ``image_size / 4`` as in the paper's cascade (its size only changes
            an uncounted interpolation).
        text_tokens: length of the text embeddings the model cross-attends to.
        batch: images per forward pass; the count is divided back to one image.
    """
    return _flops(_frozen(cfg), image_size or cfg.image_size, text_tokens, batch) // batch


def _frozen(cfg: UNetConfig) -> tuple:
    """A hashable key of ``cfg`` (lru_cache), turned back into a config by ``_thaw``."""
    import dataclasses

    return tuple((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))


def _thaw(key: tuple) -> UNetConfig:
    return UNetConfig(**dict(key))


@functools.lru_cache(maxsize=32)
def _params(key: tuple) -> int:
    return sum(p.numel() for p in _meta_unet(_thaw(key)).parameters())


@functools.lru_cache(maxsize=64)
def _flops(key: tuple, size: int, tokens: int, batch: int) -> int:
    cfg = _thaw(key)
    model = _meta_unet(cfg)
    with torch.device("meta"):
        x = torch.empty(batch, cfg.in_channels, size, size)
        t = torch.empty(batch)
        text = torch.empty(batch, tokens, cfg.text_embed_dim)
        mask = torch.ones(batch, tokens, dtype=torch.bool)
        extra = {}
        if cfg.lowres_cond:
            low = max(1, size // 4)
            extra = {"lowres": torch.empty(batch, cfg.in_channels, low, low), "lowres_t": torch.empty(batch)}
        return count_flops(model, x, t, text, mask, **extra)
