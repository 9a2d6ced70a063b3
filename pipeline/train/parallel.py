"""Distributed set-up for training, applied from outside the single-device model (STYLE #5).

    rank, world, local_rank = init_distributed()   # reads torchrun's env; gloo on CPU, nccl on GPU
    wrapped = parallelize(model, mode="ddp")        # or "fsdp" (FSDP2 fully_shard per U-Net level)

Under ``torchrun`` the usual variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) are
set; without them everything runs as one process and no process group is created.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device_type: str | None = None) -> tuple[int, int, int]:
    rank, world, local_rank = dist_env()
    if world > 1 and not dist.is_initialized():
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank, world, local_rank


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, mode: str, world: int) -> nn.Module:
    """Return the module the training step calls. ``mode``: "ddp" or "fsdp"."""
    if world == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # shard level by level, then the root: each level's parameters are gathered only
        # while that level runs (torchtitan's per-block wrapping)
        for levels in (model.down, model.up):
            for level in levels:
                fully_shard(level)
        fully_shard(model.mid)
        fully_shard(model)
        return model
    raise ValueError(f"unknown parallelism {mode!r}; choose 'ddp' or 'fsdp'")


def all_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a scalar over ranks (every rank gets it), for logging and NaN checks."""
    if world == 1:
        return value.detach()
    v = value.detach().clone().float()
    dist.all_reduce(v)
    return v / world


def all_equal(text: str, world: int) -> bool:
    """True when every rank passes the same string (e.g. a weights checksum)."""
    if world == 1:
        return True
    got: list[str | None] = [None] * world
    dist.all_gather_object(got, text)
    return len(set(got)) == 1
