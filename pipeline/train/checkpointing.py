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

Several nodes: ``rank`` is the global rank (``RANK``, not ``LOCAL_RANK``), so global rank 0
alone writes the full state and every rank its own ``rng-<rank>.pt`` into one directory that
every node must see (a shared filesystem or an object store). Each barrier is an agreement
(``parallel.agreed``): an I/O error on one rank, e.g. on a node without the shared directory,
raises on every rank at once.

``ckpt_dir`` is a local path or an fsspec URI (``s3://bucket/run/checkpoints/base64/x``), through
``pipeline.storage``. An object store has no atomic folder rename, so there a step directory
also gets a ``_COMPLETE`` marker after its last file, and only marked ones count.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load

from imagen.checkpoint import (
    CONFIG_NAME,
    EMA_NAME,
    MODEL_NAME,
    SAMPLING_FIELDS,
    load_config,
    save_weights,
)
from imagen.config import StageConfig
from imagen.text import same_recorded_encoder
from pipeline import storage
from pipeline.layout import STEP_NAME, RunDir
from pipeline.train.parallel import agreed

SHARED_HINT = (". With several nodes, every node must see the same --checkpoint-dir: a shared filesystem "
               "or an object store")
COMPLETE = "_COMPLETE"  # object stores only: written after a step directory's last file


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
    """Complete ``step-N`` directories under ``checkpoint_dir``, oldest first."""
    if not storage.isdir(checkpoint_dir):
        return []
    found = [storage.join(checkpoint_dir, storage.basename(u)) for u in storage.list_files(checkpoint_dir)
             if STEP_NAME.match(storage.basename(u))]
    if not storage.is_local(checkpoint_dir):
        found = [u for u in found if storage.exists(storage.join(u, COMPLETE))]
    return sorted(found)


def find_resume(checkpoint_dir: str, resume: str | None) -> str | None:
    """``None``, ``"latest"`` (None when there is nothing yet) or an explicit step dir."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    if not storage.exists(storage.join(resume, CONFIG_NAME)):
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no {CONFIG_NAME})")
    return resume


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


def gather_to_rank0(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor] | None:
    """Whole tensors on global rank 0 (on its CPU when sharded), None elsewhere. Call on every
    rank: each DTensor is gathered in turn and dropped at once on the other ranks, so no rank
    ever holds more than one whole tensor on its device (a full fp32 EMA of the 2B base model
    is 7 GB: it must not land on every GPU at every checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if hasattr(v, "full_tensor"):
            whole = v.full_tensor()  # a collective
            if rank == 0:
                out[k] = whole.cpu()
            del whole
        elif rank == 0:
            out[k] = v
    return out if rank == 0 else None


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
    final = RunDir(checkpoint_dir).step(step)
    tmp = final + ".tmp"
    model_sd, optim_sd = _full_state(state)  # every rank: may be a collective
    ema_sd = gather_to_rank0(state.ema.state_dict(), rank)  # every rank: a collective under FSDP

    def make_tmp() -> None:
        if rank == 0:
            storage.rmtree(tmp)
            storage.makedirs(tmp)

    def write() -> None:
        # numpy/python RNG states hold tuples and ndarrays: torch.save them as plain containers
        rng = rng_state(state.generator)
        rng["numpy"] = list(rng["numpy"][:1]) + [torch.from_numpy(rng["numpy"][1].copy())] + list(rng["numpy"][2:])
        _torch_save(rng, storage.join(tmp, f"rng-{rank}.pt"))  # one per global rank, on every node
        if rank == 0:  # global rank 0 alone writes the full state, whatever the node count
            save_weights(tmp, model_sd, state.cfg, ema=ema_sd, storage=storage,
                         metadata={**state.metadata, "step": step, "world_size": world})
            _torch_save(optim_sd, storage.join(tmp, "optimizer.pt"))

    def publish() -> None:
        if rank == 0:
            storage.move_dir(tmp, final)
            if not storage.is_local(final):
                storage.write_bytes(storage.join(final, COMPLETE), b"")
            for old in list_checkpoints(checkpoint_dir)[:-keep]:
                storage.rmtree(old)

    # Each phase is per-rank I/O, then one collective in place of a barrier: the next phase
    # starts once every rank finished this one, and an error on any rank (a full disk, a node
    # that does not see the shared directory) raises on every rank instead of leaving the
    # others waiting in the next barrier until the process-group timeout.
    agreed(make_tmp, world, f"creating {tmp}", SHARED_HINT)
    agreed(write, world, f"writing {tmp}", SHARED_HINT)
    agreed(publish, world, f"publishing {final}", SHARED_HINT)
    return final


def _torch_save(obj: Any, uri: str) -> None:
    if storage.is_local(uri):
        torch.save(obj, uri)
        return
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(uri, buf.getvalue())


def check_compatible(directory: str, cfg: StageConfig, metadata: dict[str, Any],
                     allow_data_change: bool = False) -> dict[str, Any]:
    """Refuse a checkpoint of another stage, model config or text encoder, and, unless
    ``allow_data_change``, one trained on other data (another filtered manifest): exact resume
    promises the same samples in the same order, which a refiltered folder no longer holds."""
    saved, meta = load_config(directory, storage)
    if saved.stage != cfg.stage:
        raise ValueError(f"checkpoint {directory} is for stage {saved.stage!r}, not {cfg.stage!r}: "
                         "point --checkpoint-dir at this stage's runs")
    # how a stage samples (what an evaluation may have chosen since: sampling.json) is not what it learned
    learned = {f: None for f in SAMPLING_FIELDS}
    if saved.unet != cfg.unet or replace(saved.diffusion, **learned) != replace(cfg.diffusion, **learned):
        raise ValueError(f"checkpoint {directory} was trained with another model config (preset "
                         f"{saved.preset!r}); resume with the same preset, or use a new --checkpoint-dir")
    want = metadata.get("encoder_id")
    if want and meta.get("encoder_id") and not same_recorded_encoder(meta["encoder_id"], want):
        raise ValueError(f"checkpoint {directory} was trained on embeddings of encoder "
                         f"{meta['encoder_id']}, these are from {want}: use matching embeddings")
    trained_on, now = meta.get("manifest_sha256"), metadata.get("manifest_sha256")
    if trained_on and now and trained_on != now and not allow_data_change:
        raise ValueError(f"checkpoint {directory} was trained on data whose manifest had sha256 {trained_on}, "
                         f"but the data's manifest.json now has sha256 {now} (refiltered or replaced): resuming "
                         "would go on with other samples. Pass --allow-data-change to resume on the new data "
                         "anyway, or train a new run (--new-run, or another --checkpoint-dir)")
    return meta


def load_checkpoint(directory: str, state: TrainState, rank: int, world: int,
                    device: torch.device, allow_data_change: bool = False) -> dict[str, Any]:
    """Restore model, EMA, optimizer and this rank's RNGs from ``directory``; return metadata.
    Call on every rank: the files are read first, and a rank that cannot read them (another
    node that does not see ``directory``) stops every rank (``agreed``). A checkpoint of other
    data is refused unless ``allow_data_change`` (:func:`check_compatible`)."""

    def read() -> tuple[dict[str, Any], dict, Any, dict, Any]:
        meta = check_compatible(directory, state.cfg, state.metadata, allow_data_change)
        # A run of the same size wrote one rng-<global rank>.pt per rank: without this rank's,
        # the resume would not be exact, so a missing one is an error, not a skip.
        same_world = int(meta.get("world_size", world)) == world
        rng = _tensors_only(storage.join(directory, f"rng-{rank}.pt")) if same_world else None
        return (meta, _safetensors(storage.join(directory, MODEL_NAME)),
                _tensors_only(storage.join(directory, "optimizer.pt")),
                _safetensors(storage.join(directory, EMA_NAME)), rng)

    meta, model_sd, optim_sd, ema_sd, rng = agreed(read, world, f"reading {directory}", SHARED_HINT)
    if state.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(state.model, state.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        state.model.load_state_dict(model_sd)
        state.optimizer.load_state_dict(optim_sd)
    load_ema(state.ema, ema_sd)
    if rng is not None:
        _restore_rng(rng, state.generator)
    return meta


def _safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load(storage.read_bytes(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): resume from an earlier "
                         "step directory (--resume DIR) or delete this one") from None


def _tensors_only(path: str) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only. A pickle
    of anything else (planted as optimizer.pt or rng-N.pt) is refused, never run."""
    try:
        return torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=True, map_location="cpu")
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
    """Copy the weights (not optimizer/RNG) of ``source`` to ``final``, unless ``final`` already
    holds exactly those files (a rerun of a finished run writes nothing).

    Local disk: written under ``final.tmp`` and renamed, atomically. An object store has no
    rename (a folder "move" copies object by object, in name order, so config.json would land
    first): there the old ``config.json`` is deleted first and the new one is the last object
    written, so a folder with a ``config.json`` is always whole (readers and launch.py's reuse
    check look for it; launch.py's result.json, written after this, marks the run finished)."""
    names = (MODEL_NAME, EMA_NAME, CONFIG_NAME)  # config.json last: the folder's marker
    if _same_files(final, source, names):
        return
    if storage.is_local(final):
        tmp = final + ".tmp"
        storage.rmtree(tmp)
        storage.makedirs(tmp)
        for name in names:
            storage.copy(storage.join(source, name), storage.join(tmp, name))
        storage.move_dir(tmp, final)
        return
    storage.remove(storage.join(final, CONFIG_NAME))  # unpublished before any weight changes
    storage.rmtree(final)
    for name in names:
        storage.copy(storage.join(source, name), storage.join(final, name))


def _same_files(folder: str, source: str, names: tuple[str, ...]) -> bool:
    """Every one of ``names`` is in ``folder`` with the bytes it has in ``source`` (and the
    marker, config.json, is there: a half-published folder on an object store is not the same)."""
    try:
        if any(storage.size(storage.join(folder, n)) != storage.size(storage.join(source, n)) for n in names):
            return False
        return all(storage.read_bytes(storage.join(folder, n)) == storage.read_bytes(storage.join(source, n))
                   for n in names)
    except FileNotFoundError:
        return False
