"""Train one cascade stage: one process, or many under ``torchrun`` (DDP or FSDP).

    imagen-pipeline train --stage base64 --preset tiny --data ROOT/filtered \\
        --embeddings ROOT/embeddings/<encoder> --max-steps 200 \\
        --checkpoint-dir ROOT/checkpoints/base64/run1 [--resume latest]
    torchrun --standalone --nproc_per_node=2 -m pipeline.train --stage base64 ...   # same flags

This module is the job: ``TrainJob``, its command-line flags (``add_arguments``, ``job_to_argv``)
and the config it resolves to (``resolve_config``). One training process is worker.py, the loop
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

from imagen.config import PRESETS, STAGES


@dataclass
class TrainJob:
    """What one training job needs; the CLI and ``torchrun -m pipeline.train`` fill it."""

    stage: str
    preset: str
    data: str
    embeddings: str
    checkpoint_dir: str
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    grad_accum: int | None = None
    optimizer: str = "adamw"  # adamw | adafactor (Imagen trains the base model with Adafactor)
    parallel: str = "ddp"  # ddp | fsdp
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the U-Net (see bench/train.py: slower on the CPU here)
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = None
    log_every: int | None = None
    sample_every: int | None = None
    resume: str | None = None  # None, "latest" or a step directory
    tracking_uri: str | None = None
    experiment: str = "imagen"
    run_name: str | None = None
    num_workers: int = 0
    device: str | None = None
    seed: int | None = None


def resolve_config(job: TrainJob, emb_meta: dict[str, Any]):
    """Preset + command-line overrides + facts of the embeddings = the run's config."""
    from imagen.config import preset

    cfg = preset(job.preset, job.stage)
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
    for name in ("max_steps", "batch_size", "lr", "grad_accum", "checkpoint_every", "keep_checkpoints",
                 "log_every", "sample_every", "seed"):
        if getattr(job, name) is not None:
            setattr(t, name, getattr(job, name))
    t.warmup_steps = job.warmup_steps if job.warmup_steps is not None else min(
        t.warmup_steps, max(1, t.max_steps // 10))
    return cfg


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, choices=list(STAGES))
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model preset (default: tiny)")
    p.add_argument("--data", required=True, help="filtered shards directory (ROOT/filtered)")
    p.add_argument("--embeddings", required=True, help="embeddings directory of one encoder")
    p.add_argument("--checkpoint-dir", required=True, help="where step-N checkpoints and final/ go")
    p.add_argument("--max-steps", type=int, help="override the preset's step count")
    p.add_argument("--batch-size", type=int, help="per-process micro-batch size (default: preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: preset's)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: preset's, "
                                                    "capped at 10%% of --max-steps)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    p.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"],
                   help="data parallelism across processes (fsdp shards params for large presets)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net (pays a compile of a minute or more; on GPUs for long runs)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, help="how many step-N dirs to keep")
    p.add_argument("--log-every", type=int, help="steps between metric logs")
    p.add_argument("--sample-every", type=int, help="steps between validation sample grids (0: off)")
    p.add_argument("--resume", help="'latest' or a step-N directory")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                          "else sqlite under the data root)")
    p.add_argument("--experiment", default="imagen", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name (default: STAGE-PRESET)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the local GPU if any)")
    p.add_argument("--seed", type=int, help="override the preset's seed")


def job_from_args(a: argparse.Namespace) -> TrainJob:
    names = {f.name for f in dataclasses.fields(TrainJob)}
    return TrainJob(**{k: v for k, v in vars(a).items() if k in names})


def job_to_argv(job: TrainJob) -> list[str]:
    """The command-line form of ``job``, for ``torchrun -m pipeline.train`` and launchers."""
    argv: list[str] = []
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv
