"""Training checkpoints: atomic, collective-safe, exactly resumable.

    save_checkpoint(ckpt_dir, step, state, rank, world)   # every rank calls it
    path = find_resume(ckpt_dir, "latest")                 # newest complete step-N dir or None
    meta = load_checkpoint(path, state, rank, device)      # restores everything, returns metadata

Layout of ``<ckpt_dir>/step-00000100/``::

    config.json, model.safetensors, ema.safetensors   as imagen.checkpoint writes them
    optimizer.pt                                       optimizer state (tensors only)
    rng-<rank>.pt                                      every rank's torch/numpy/python RNGs and
                                                       its noise generator
A step directory is written under ``step-N.tmp`` and renamed when complete, so a directory
named ``step-N`` is always whole; a kill leaves at most a ``.tmp`` that the next save removes.
Every rank reaches the same barriers, and state-dict gathering (FSDP) is called on every
rank, so no rank waits on a collective another rank never calls.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file

from imagen.checkpoint import CONFIG_NAME, EMA_NAME, MODEL_NAME, load_config, save_weights
from imagen.config import StageConfig

STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """What a checkpoint holds besides the config."""

    model: torch.nn.Module  # the unwrapped module (or the FSDP-sharded one)
    ema: Any  # imagen.ema.EMA
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the noise/timestep/dropout generator of this rank
    cfg: StageConfig
    metadata: dict[str, Any] = field(default_factory=dict)  # encoder id, manifest hash, ...
    fsdp: bool = False


def list_checkpoints(checkpoint_dir: str) -> list[str]:
    if not os.path.isdir(checkpoint_dir):
        return []
    names = sorted(n for n in os.listdir(checkpoint_dir) if STEP_DIR.match(n))
    return [os.path.join(checkpoint_dir, n) for n in names]


def find_resume(checkpoint_dir: str, resume: str | None) -> str | None:
    """``None``, ``"latest"`` (None when there is nothing yet) or an explicit step dir."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    if not os.path.exists(os.path.join(resume, CONFIG_NAME)):
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no {CONFIG_NAME})")
    return resume


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _full_state(state: TrainState) -> tuple[dict, dict]:
    """Model and optimizer state dicts with full (unsharded) tensors; collective under FSDP."""
    if not state.fsdp:
        return state.model.state_dict(), state.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(state.model, state.optimizer, options=opts)


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather DTensor shards into whole tensors (a collective: call on every rank)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


def load_ema(ema, full: dict[str, torch.Tensor]) -> None:
    """Load whole EMA tensors, re-sharding them where the shadow is a DTensor (FSDP)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    missing = set(ema.shadow) ^ set(full)
    if missing:
        raise ValueError(f"EMA weights do not match the model: {sorted(missing)[:5]}")
    for k, v in ema.shadow.items():
        if isinstance(v, DTensor):
            ema.shadow[k] = distribute_tensor(full[k].to(v.dtype), v.device_mesh, v.placements)
        else:
            v.copy_(full[k])


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    out = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
           "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def save_checkpoint(checkpoint_dir: str, step: int, state: TrainState, rank: int, world: int,
                    keep: int) -> str:
    """Write ``step-N`` atomically and prune to the newest ``keep``. Call on every rank."""
    final = os.path.join(checkpoint_dir, f"step-{step:08d}")
    tmp = final + ".tmp"
    model_sd, optim_sd = _full_state(state)  # every rank: may be a collective
    ema_sd = full_tensors(state.ema.state_dict())
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(world)
    # numpy/python RNG states hold tuples and ndarrays: torch.save them as plain containers
    rng = rng_state(state.generator)
    rng["numpy"] = list(rng["numpy"][:1]) + [torch.from_numpy(rng["numpy"][1].copy())] + list(rng["numpy"][2:])
    torch.save(rng, os.path.join(tmp, f"rng-{rank}.pt"))
    if rank == 0:
        save_weights(tmp, model_sd, state.cfg, ema=ema_sd,
                     metadata={**state.metadata, "step": step, "world_size": world})
        torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
    _barrier(world)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(world)
    return final


def check_compatible(directory: str, cfg: StageConfig, metadata: dict[str, Any]) -> dict[str, Any]:
    """Refuse a checkpoint of another stage, model config or text encoder."""
    saved, meta = load_config(directory)
    if saved.stage != cfg.stage:
        raise ValueError(f"checkpoint {directory} is for stage {saved.stage!r}, not {cfg.stage!r}: "
                         "point --checkpoint-dir at this stage's runs")
    if saved.unet != cfg.unet or saved.diffusion != cfg.diffusion:
        raise ValueError(f"checkpoint {directory} was trained with another model config (preset "
                         f"{saved.preset!r}); resume with the same preset, or use a new --checkpoint-dir")
    want = metadata.get("encoder_id")
    if want and meta.get("encoder_id") and meta["encoder_id"] != want:
        raise ValueError(f"checkpoint {directory} was trained on embeddings of encoder "
                         f"{meta['encoder_id']}, these are from {want}: use matching embeddings")
    return meta


def load_checkpoint(directory: str, state: TrainState, rank: int, world: int,
                    device: torch.device) -> dict[str, Any]:
    """Restore model, EMA, optimizer and this rank's RNGs from ``directory``; return metadata."""
    meta = check_compatible(directory, state.cfg, state.metadata)
    saved_world = int(meta.get("world_size", world))
    model_sd = _safetensors(os.path.join(directory, MODEL_NAME))
    optim_sd = _tensors_only(os.path.join(directory, "optimizer.pt"))
    if state.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(state.model, state.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        state.model.load_state_dict(model_sd)
        state.optimizer.load_state_dict(optim_sd)
    load_ema(state.ema, _safetensors(os.path.join(directory, EMA_NAME)))
    rng_path = os.path.join(directory, f"rng-{rank}.pt")
    if saved_world == world and os.path.exists(rng_path):
        _restore_rng(_tensors_only(rng_path), state.generator)
    return meta


def _safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): resume from an earlier "
                         "step directory (--resume DIR) or delete this one") from None


def _tensors_only(path: str) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only. A pickle
    of anything else (planted as optimizer.pt or rng-N.pt) is refused, never run."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError (not tensors only), a truncated zip, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a tensors-only torch file ({first}): resume from an earlier "
                         "step directory (--resume DIR) or delete this one") from None


def _restore_rng(rng: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    np_state = rng["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy(), *np_state[2:]))
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def publish_final(final: str, source: str) -> None:
    """Copy the weights (not optimizer/RNG) of ``source`` to ``final`` atomically."""
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in (CONFIG_NAME, MODEL_NAME, EMA_NAME):
        shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
