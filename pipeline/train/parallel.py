"""Distributed set-up for training, applied from outside the single-device model (STYLE #5).

    rank, world, local_rank = init_distributed()   # reads torchrun's env; gloo on CPU, nccl on GPU
    wrapped = parallelize(model, mode="ddp")        # or "fsdp" (FSDP2 fully_shard per U-Net level)
    value = agreed(fn, world, "what")               # per-rank I/O: an error on one rank raises on all
    value = on_rank0(fn, rank, world, "what")        # rank 0 decides, every rank gets its answer
    stop = any_rank(flag, world, flag_group(world))  # one rank's decision (a signal) for every rank

Under ``torchrun`` the usual variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) are
set; without them everything runs as one process and no process group is created.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


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


def channels_last(mode: str, world: int) -> bool:
    """Whether the step lays parameters and images out channels-last: the layout CUDA's tensor
    cores want, and oneDNN trains the tiny stages 7-11% faster in it on a CPU (base64 and sr256,
    one thread). Not under FSDP: FSDP2 refuses non-contiguous parameters (torch 2.13)."""
    return not (mode == "fsdp" and world > 1)


def parallelize(model: nn.Module, mode: str, world: int, bf16: bool = False) -> nn.Module:
    """Return the module the training step calls. ``mode``: "ddp" or "fsdp". ``bf16``: under
    FSDP, gather parameters in bf16 (half the all-gather bytes) and reduce gradients in fp32."""
    if world == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        kwargs = {"mp_policy": mp} if mp is not None else {}
        # shard level by level, then the root: each level's parameters are gathered only
        # while that level runs (torchtitan's per-block wrapping)
        for levels in (model.down, model.up):
            for level in levels:
                fully_shard(level, **kwargs)
        fully_shard(model.mid, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"unknown parallelism {mode!r}; choose 'ddp' or 'fsdp'")


def all_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """Mean of a scalar over ranks (every rank gets it), for logging and NaN checks."""
    if world == 1:
        return value.detach()
    v = value.detach().clone().float()
    dist.all_reduce(v)
    return v / world


def _error_text(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def agreed(fn: Callable[[], T], world: int, what: str, hint: str = "") -> T:
    """``fn()`` on every rank, then one collective: when it raised on any rank it raises on
    every rank (its own error where it failed, RuntimeError naming the failed ranks elsewhere),
    so no rank goes on to wait for one that left. For per-rank I/O that holds no collective."""
    error: Exception | None = None
    value: Any = None
    try:
        value = fn()
    except Exception as e:  # re-raised below, on every rank
        error = e
    if world > 1 and dist.is_initialized():
        got: list[str | None] = [None] * world
        dist.all_gather_object(got, _error_text(error))
        failed = {r: msg for r, msg in enumerate(got) if msg}
        if failed and error is None:
            listed = "; ".join(f"rank {r}: {msg}" for r, msg in failed.items())
            raise RuntimeError(f"{what} failed on another rank ({listed}){hint}")
    if error is not None:
        raise error
    return value


def on_rank0(fn: Callable[[], T], rank: int, world: int, what: str) -> T:
    """``fn()`` on global rank 0 only; its value, or its error, on every rank (one broadcast).
    For decisions every rank must share, such as which checkpoint to resume."""
    error: Exception | None = None
    value: Any = None
    if rank == 0:
        try:
            value = fn()
        except Exception as e:
            error = e
    if world > 1 and dist.is_initialized():
        box = [value, _error_text(error)]
        dist.broadcast_object_list(box, src=0)
        value, message = box
        if message and error is None:
            raise RuntimeError(f"{what} failed on rank 0: {message}")
    if error is not None:
        raise error
    return value


def all_equal(text: str, world: int) -> bool:
    """True when every rank passes the same string (e.g. a weights checksum)."""
    if world == 1:
        return True
    got: list[str | None] = [None] * world
    dist.all_gather_object(got, text)
    return len(set(got)) == 1


def flag_group(world: int) -> Any:
    """The process group :func:`any_rank` uses: gloo on the host (a CPU flag crosses no device,
    so checking it never waits on a GPU stream); the default group when that is gloo already.
    Call on every rank, in the same order (creating a group is a collective)."""
    if world == 1 or not dist.is_initialized():
        return None
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def any_rank(flag: bool, world: int, group: Any = None) -> bool:
    """True on every rank when ``flag`` is True on any (one small host collective): the ranks
    agree on a decision one of them took alone, such as stopping on a signal."""
    if world == 1 or not dist.is_initialized():
        return flag
    box = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return bool(box.numpy()[0])  # a CPU tensor: no device read
