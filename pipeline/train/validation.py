"""Validation loss as MLPerf Training's text-to-image benchmark defines it: the training
objective averaged over a fixed grid of noise levels, with fixed noise, on the held-out split.

    from pipeline.train.validation import validation_loss, eval_net, score_checkpoint
    net = eval_net(cfg, ema_state, device)                  # the EMA weights, as sampled
    validation_loss(net, cfg, batches, device, world=1)     # {"val/loss": ..., "val/loss_t0.0625": ...}
    score_checkpoint("ROOT/checkpoints/base64/RUN/final", "ROOT/filtered", "ROOT/embeddings/ENC")

Why this and not the training loss: the training loss of a batch moves with the noise levels it
happened to draw, so two runs cannot be compared on it. Here every validation sample is scored
at the same ``VAL_TIMESTEPS`` noise levels ``t = (i + 1/2) / n`` (MLPerf: 8), its noise drawn
from a generator seeded by its key and the level's index, with its full caption (no
classifier-free dropout). An SR stage's low-res input is noised at the fixed augmentation
level ``VAL_AUG_LEVEL`` (the middle of the paper's training range), its noise seeded by the
key too. The figure is therefore a function of the weights and the validation split alone:
the same checkpoint gives the same number on any world size, batch size or worker count (up
to float rounding), and a new run compares against the champion on equal terms.

Each rank scores its own share of the samples (``make_validation_loader`` gives each sample
to one rank); sums per level are kept on the device in float64 and all-reduced, and the
result is read to the host once, at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch

from imagen.config import StageConfig
from imagen.diffusion import GaussianDiffusion
from imagen.unet import UNet

VAL_TIMESTEPS = 8  # MLPerf Training text-to-image: 8 fixed timesteps
VAL_AUG_LEVEL = 0.25  # SR stages: the low-res input's noise level (training draws U(0, 0.5) in the paper)


def timestep_grid(n: int = VAL_TIMESTEPS) -> list[float]:
    """``n`` evenly spaced noise levels in (0, 1): the centres of n equal bins."""
    return [(i + 0.5) / n for i in range(n)]


def metric_name(t: float) -> str:
    return f"val/loss_t{t:.4f}"


def _seed(key: str, stream: str) -> int:
    digest = hashlib.sha256(f"{key}\0{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def fixed_noise(keys: list[str], shape: tuple[int, ...], stream: str, device: torch.device) -> torch.Tensor:
    """Standard normal noise of ``shape`` ([B, ...]) whose row b depends only on ``keys[b]``
    and ``stream``: drawn on the CPU from a generator seeded by both (the same on every device
    and in every batch composition), then copied over without blocking."""
    rows = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(_seed(k, stream))) for k in keys]
    return torch.stack(rows).to(device, non_blocking=True)


def eval_net(cfg: StageConfig, state: dict[str, torch.Tensor], device: torch.device,
             dtype: torch.dtype = torch.float32) -> UNet:
    """A U-Net in eval mode holding ``state`` (e.g. the EMA shadow), built on the meta device
    and given the tensors directly: no random initialisation, no second copy. A sharded
    (DTensor) state is gathered tensor by tensor (a collective: call on every rank)."""
    with torch.device("meta"):
        net = UNet(cfg.unet)
    whole = {}
    for k, v in state.items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        whole[k] = v.detach().to(device, dtype if v.is_floating_point() else v.dtype, copy=True)
    net.load_state_dict(whole, assign=True)
    return net.eval()


def validation_data(cfg: StageConfig, data: str, embeddings: str, batch_size: int, num_workers: int = 0,
                    encoder_id: str | None = None):
    """The loader settings of ``cfg``'s stage on the validation split: its own size and crop,
    centred, text padded to its ``max_text_len``; the trainer and :func:`score_checkpoint`
    both read the split through this."""
    from pipeline.data.loader import TrainDataConfig

    spec = cfg.spec
    return TrainDataConfig(
        data=data, embeddings=embeddings, image_size=spec.image_size, crop_size=spec.crop_size,
        lowres_crop_size=spec.lowres_crop_size, random_crop=False, random_flip=False, max_tokens=cfg.max_text_len,
        pad_text_to=cfg.max_text_len, batch_size=batch_size, num_workers=num_workers,
        expected_encoder_id=encoder_id, expected_dim=cfg.unet.text_embed_dim, expected_max_length=cfg.max_text_len)


def score_checkpoint(weights: str, data: str, embeddings: str, limit: int | None = None, batch_size: int = 16,
                     device: str | torch.device = "cpu", num_workers: int = 0) -> dict[str, float]:
    """The validation loss of a stage weights directory (a checkpoint's ``final/``, a
    registered model's stage folder; its EMA weights) on the validation split of ``data``,
    in this one process: what promotion compares a challenger and the champion on. Raises
    ``ValueError`` when the embeddings come from another encoder than the stage's."""
    from imagen.checkpoint import load_model
    from pipeline import storage
    from pipeline.data.loader import make_validation_loader
    from pipeline.train.step import uses_bf16

    device = torch.device(device)
    net, cfg, meta = load_model(weights, device=device, storage=storage)
    limit = cfg.train.eval_samples if limit is None else limit
    batches = make_validation_loader(validation_data(cfg, data, embeddings, batch_size, num_workers,
                                                     meta.get("encoder_id")), limit=limit)
    return validation_loss(net, cfg, batches, device, bf16=uses_bf16("auto", device))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, cfg: StageConfig, batches: Iterable[dict[str, Any]],
                    device: torch.device, world: int = 1, bf16: bool = False,
                    n_timesteps: int = VAL_TIMESTEPS) -> dict[str, float]:
    """The validation loss of ``model`` over ``batches`` (this rank's share of the split).

    Returns ``{"val/loss": mean over levels, "val/loss_t<level>": per level, "val/samples": n}``
    summed over all ranks (a collective when ``world > 1``: call on every rank), or ``{}`` when
    no rank had a sample. Reads one value back to the host, at the end.
    """
    from pipeline.data.batch import to_device

    diffusion = GaussianDiffusion(cfg.diffusion)
    grid = timestep_grid(n_timesteps)
    sums = torch.zeros(len(grid) + 1, dtype=torch.float64, device=device)  # per level, then the count
    for batch in batches:
        b = to_device(batch, device, channels_last=True)
        x0, keys = b["image"], list(b["keys"])
        n = x0.shape[0]
        extra = {}
        if cfg.lowres_size:
            aug_t = torch.full((n,), VAL_AUG_LEVEL, device=device)
            aug_noise = fixed_noise(keys, tuple(b["lowres"].shape), "aug", device)
            extra = {"lowres": diffusion.q_sample(b["lowres"], aug_t, aug_noise), "lowres_t": aug_t}
        for i, level in enumerate(grid):
            t = torch.full((n,), level, device=device)
            noise = fixed_noise(keys, tuple(x0.shape), f"t{i}", device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(diffusion.q_sample(x0, t, noise), t, b["text_embeds"], b["text_mask"], **extra)
            sums[i] += diffusion.loss(out.float(), x0, noise, t).double().sum()
        sums[-1] += n
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    values = sums.tolist()  # the one host read
    count = values[-1]
    if not count:
        return {}
    per_level = {metric_name(t): v / count for t, v in zip(grid, values[:-1], strict=True)}
    return {"val/loss": sum(per_level.values()) / len(per_level), **per_level, "val/samples": count}
