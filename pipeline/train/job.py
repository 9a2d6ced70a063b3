"""Train one cascade stage: one process, or many under ``torchrun`` (DDP or FSDP).

    imagen-pipeline train --stage base64 --preset tiny --data ROOT/filtered \\
        --embeddings ROOT/embeddings/<encoder> --max-steps 200 \\
        --checkpoint-dir ROOT/checkpoints/base64/run1 [--resume latest]
    torchrun --standalone --nproc_per_node=2 -m pipeline.train --stage base64 ...   # same flags

This module is the job: ``TrainJob``, the single source of the train options and their
defaults (its fields generate the command-line flags: ``add_arguments``; ``job_to_argv`` is the
reverse), and the config it resolves to (``resolve_config``). One training process is worker.py, the loop
trainer.py, and launch.py starts processes for the CLI and the DAGs.

The model code in ``imagen/`` is single-device; DDP/FSDP wrapping, autocast and gradient
checkpointing are applied here (pipeline/train/parallel.py). Checkpoints (pipeline/train/checkpointing.py)
hold model, EMA, optimizer, step, every rank's RNGs and the data position, so a run killed
at any moment and resumed with ``--resume latest`` ends bitwise identical to one that never
stopped. ``<checkpoint-dir>/final`` holds the last weights for evaluation and registration.

Rank 0 logs to MLflow (params, per-step metrics, system metrics, a sample grid of fixed
validation captions every ``--sample-every`` steps); a tracking server that is down costs a
warning, never the run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from imagen.config import LR_SCHEDULES, PRESETS, STAGES
from pipeline.options import add_options, flag, option, options_from_args


def preset_override(help: str, **argparse_kwargs: Any) -> Any:
    """A TrainJob option that overrides the preset's ``TrainConfig`` field of the same name:
    its default is None, "the preset's", so the value itself is declared once, in the preset."""
    return dataclasses.field(default=None, metadata={"help": help, "_preset": True, **argparse_kwargs})


@dataclass(kw_only=True)
class TrainJob:
    """What one training job needs: the single source of the ``train`` options and their
    defaults. The CLI's ``train`` flags and ``torchrun -m pipeline.train``'s are generated from
    these fields (:func:`add_arguments`); a None training hyper-parameter means the preset's."""

    stage: str = option(help="cascade stage to train", choices=list(STAGES))
    preset: str | None = option(None, "model preset (default: the stage's paper preset; tiny: a CPU-sized "
                                      "model of the stage)", choices=list(PRESETS))
    # required to train (job_from_args checks them); --dry-run resolves the job without them
    data: str | None = option(None, "filtered shards directory (ROOT/filtered); required")
    embeddings: str | None = option(None, "embeddings directory of one encoder; required")
    checkpoint_dir: str | None = option(None, "where step-N checkpoints and final/ go; required")
    root: str | None = option(None, "the run's data root, a path or fsspec URI: its tracking store, recorded "
                                    "in every checkpoint (default: the folder holding --data)")
    max_steps: int | None = preset_override("override the preset's step count")
    global_batch: int | None = preset_override("images per optimizer step over all processes (default: the "
                                               "preset's, the paper's: 2048 base, 4096 SR)")
    micro_batch: int | None = preset_override("images per device and forward pass (default: the preset's, or "
                                              "the largest that divides the per-process share); the gradient "
                                              "accumulation follows from the global batch")
    lr: float | None = preset_override("peak learning rate (default: preset's)")
    warmup_steps: int | None = preset_override("linear warmup steps (default: preset's, capped at 10%% of "
                                               "--max-steps)")
    lr_schedule: str | None = preset_override("after the warm-up: constant (the paper's; the paper presets') "
                                              "or cosine decay to 10%% (the tiny preset's)",
                                              choices=list(LR_SCHEDULES))
    # Imagen trains the base model with Adafactor
    optimizer: str = option("adamw", "optimizer (default: adamw)", choices=["adamw", "adafactor"])
    parallel: str = option("ddp", "data parallelism across processes (fsdp shards params for large presets)",
                           choices=["ddp", "fsdp"])
    precision: str = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = option(False, "recompute activations")
    # see bench/train.py: slower on the CPU here
    compile: bool = option(False, "torch.compile the U-Net (pays a compile of a minute or more; on GPUs for "
                                  "long runs)")
    checkpoint_every: int | None = preset_override("steps between checkpoints")
    keep_checkpoints: int | None = preset_override("how many step-N dirs to keep")
    log_every: int | None = preset_override("steps between metric logs")
    sample_every: int | None = preset_override("steps between validation sample grids (0: off)")
    eval_every: int | None = preset_override("steps between validation losses on the held-out split (0: only "
                                             "at the end)")
    eval_samples: int | None = preset_override("validation samples scored at each validation (at most)")
    resume: str | None = option(None, "'latest' or a step-N directory")
    allow_data_change: bool = option(False, "resume even though the data's manifest differs from the one the "
                                            "checkpoint was trained on (refiltered data; exact resume is lost)")
    tracking_uri: str | None = option(None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite "
                                            "under the data root)")
    experiment: str = option("imagen", "MLflow experiment name")
    run_name: str | None = option(None, "MLflow run name (default: STAGE-PRESET)")
    num_workers: int = option(0, "DataLoader workers per process")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: the local GPU if any)")
    seed: int | None = preset_override("override the preset's seed")

    def __post_init__(self) -> None:
        from imagen.config import stage_preset

        if self.stage in STAGES:  # the one preset rule (imagen.config.resolve_presets)
            self.preset = stage_preset(self.preset, self.stage)


def preset_overrides() -> list[str]:
    """The TrainJob options that override the preset's ``TrainConfig`` field of the same name."""
    return [f.name for f in dataclasses.fields(TrainJob) if f.metadata.get("_preset")]


def resolve_config(job: TrainJob, emb_meta: dict[str, Any] | None):
    """Preset + command-line overrides + facts of the embeddings = the run's config
    (``emb_meta`` None: the preset's encoder facts, for a dry run)."""
    from imagen.config import preset

    cfg = preset(job.preset, job.stage)
    emb_meta = emb_meta or {"dim": cfg.unet.text_embed_dim, "max_length": cfg.max_text_len}
    dim = int(emb_meta["dim"])
    if cfg.unet.text_embed_dim != dim:
        if job.preset != "tiny":
            raise ValueError(
                f"embeddings in {job.embeddings} are {dim}-d (encoder {emb_meta.get('encoder_name')}) "
                f"but preset {job.preset!r} expects {cfg.unet.text_embed_dim}-d: embed with the "
                "encoder the preset was designed for, or pick a matching preset")
        cfg.unet.text_embed_dim = dim  # the tiny preset adapts to whatever tiny encoder was used
    cfg.text_encoder = emb_meta.get("encoder_name", "")
    # T5 attends both ways, so a token's vector depends on the token limit it was encoded
    # with: the stage samples with the same limit the embeddings were made with
    cfg.max_text_len = int(emb_meta.get("max_length", cfg.max_text_len))
    t = cfg.train
    for name in preset_overrides():
        if name != "warmup_steps" and getattr(job, name) is not None:
            setattr(t, name, getattr(job, name))
    t.warmup_steps = job.warmup_steps if job.warmup_steps is not None else min(
        t.warmup_steps, max(1, t.max_steps // 10))
    return cfg


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is cut: ``micro_batch * grad_accum * world_size == global_batch``."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def per_process(self) -> int:
        return self.micro_batch * self.grad_accum


def batch_plan(global_batch: int, micro_batch: int, world_size: int, micro_explicit: bool = False) -> BatchPlan:
    """Cut ``global_batch`` over ``world_size`` processes into micro-batches of at most
    ``micro_batch``. An explicit micro-batch must divide each process's share; a preset's
    default shrinks to the largest divisor of the share that is not above it. An impossible
    combination is a one-line error that says what to pass."""
    for name, value in (("global batch", global_batch), ("micro-batch", micro_batch), ("world size", world_size)):
        if value < 1:
            raise ValueError(f"the {name} must be at least 1, got {value}")
    share, rest = divmod(global_batch, world_size)
    if rest:
        near = sorted({max(world_size, global_batch // world_size * world_size),
                       -(-global_batch // world_size) * world_size})
        raise ValueError(f"--global-batch {global_batch} does not split over {world_size} processes: pass "
                         f"--global-batch {' or '.join(map(str, near))}, or change the process count")
    divisors = [d for d in range(1, min(share, micro_batch) + 1) if share % d == 0]
    micro = divisors[-1]
    if micro_explicit and micro != micro_batch:
        fits = [d for d in range(1, share + 1) if share % d == 0]
        below = max(d for d in fits if d <= micro_batch)
        above = min((d for d in fits if d > micro_batch), default=None)
        hint = f"--micro-batch {below}" + (f" or {above}" if above else "")
        raise ValueError(f"--micro-batch {micro_batch} does not divide the {share} images each of "
                         f"{world_size} processes takes of --global-batch {global_batch}: pass {hint}")
    return BatchPlan(global_batch, micro, share // micro, world_size)


def job_plan(job: TrainJob, cfg, world_size: int) -> dict[str, Any]:
    """The resolved job as ``train --dry-run`` prints it and the run logs it."""
    t = cfg.train
    bp = batch_plan(t.global_batch, t.micro_batch, world_size, micro_explicit=job.micro_batch is not None)
    return {"stage": cfg.stage, "preset": cfg.preset, **dataclasses.asdict(bp), "per_process": bp.per_process,
            "max_steps": t.max_steps, "images_total": t.max_steps * bp.global_batch,
            "image_size": cfg.image_size, "crop_size": cfg.spec.crop_size, "max_text_len": cfg.max_text_len,
            "lr": t.lr, "warmup_steps": t.warmup_steps, "optimizer": job.optimizer, "parallel": job.parallel,
            "precision": job.precision, "compile": job.compile}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` flags, one per :class:`TrainJob` field (``--checkpoint-dir`` ...)."""
    add_options(p, TrainJob)


REQUIRED = ("data", "embeddings", "checkpoint_dir")


def job_from_args(a: argparse.Namespace, dry_run: bool = False) -> TrainJob:
    job = TrainJob(**options_from_args(TrainJob, a))
    missing = [flag(name) for name in REQUIRED if not getattr(job, name)]
    if missing and not dry_run:
        raise ValueError(f"train needs {', '.join(missing)} (or --dry-run to print the resolved job)")
    return job


def job_to_argv(job: TrainJob) -> list[str]:
    """The command-line form of ``job``, for ``torchrun -m pipeline.train`` and launchers."""
    argv: list[str] = []
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        if isinstance(value, bool):
            argv += [flag(f.name)] if value else []
        elif value is not None:
            argv += [flag(f.name), str(value)]
    return argv
