"""Train one cascade stage: single process or under ``torchrun`` (DDP, gloo on CPU, nccl on GPU).

    imagen-pipeline train --stage base64 --preset tiny --data ROOT/filtered \\
        --embeddings ROOT/embeddings/<encoder> --max-steps 60 --checkpoint-dir ROOT/checkpoints/base64/run1
    torchrun --standalone --nproc_per_node=2 -m pipeline.train --stage base64 ...   # same flags

The model code in ``imagen/`` is single-device; DDP wrapping happens here. Each run writes
``<checkpoint-dir>/step-NNNNNNNN/`` atomically (temp dir, then rename) with the weights
(safetensors), the EMA, the optimizer and RNG states; ``--resume latest`` continues from the
newest. ``<checkpoint-dir>/final`` holds the last weights for evaluation and registration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pipeline.train")

STEP_DIR = re.compile(r"^step-(\d{8})$")


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
    resume: str | None = None  # None, "latest" or a step directory
    tracking_uri: str | None = None
    experiment: str = "imagen"
    run_name: str | None = None
    num_workers: int = 0
    device: str | None = None
    seed: int | None = None


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _embedding_metadata(embeddings: str) -> dict[str, Any]:
    from pipeline.embed import read_metadata

    return read_metadata(embeddings)


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
    cfg.max_text_len = min(cfg.max_text_len, int(emb_meta.get("max_length", cfg.max_text_len)))
    t = cfg.train
    t.max_steps = job.max_steps or t.max_steps
    t.batch_size = job.batch_size or t.batch_size
    t.lr = job.lr or t.lr
    t.seed = t.seed if job.seed is None else job.seed
    t.warmup_steps = min(t.warmup_steps, max(1, t.max_steps // 10))
    return cfg


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def list_checkpoints(checkpoint_dir: str) -> list[str]:
    if not os.path.isdir(checkpoint_dir):
        return []
    names = sorted(n for n in os.listdir(checkpoint_dir) if STEP_DIR.match(n))
    return [os.path.join(checkpoint_dir, n) for n in names]


def find_resume(checkpoint_dir: str, resume: str | None) -> str | None:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return resume


def run(job: TrainJob) -> dict[str, Any]:
    """Train; returns {"checkpoint": final weights dir, "step", "loss", "run_id"}."""
    import torch
    import torch.distributed as dist

    rank, world, local_rank = _dist_env()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    device = torch.device(job.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        return _train(job, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(job: TrainJob, rank: int, world: int, device) -> dict[str, Any]:
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from imagen.checkpoint import load_config
    from imagen.diffusion import GaussianDiffusion
    from imagen.ema import EMA
    from imagen.unet import UNet
    from pipeline.data import TrainDataConfig, make_loader
    from pipeline.tracking import RunLogger, flatten, resolve_tracking_uri

    emb_meta = _embedding_metadata(job.embeddings)
    cfg = resolve_config(job, emb_meta)
    tc = cfg.train
    resume_dir = find_resume(job.checkpoint_dir, job.resume)
    if resume_dir:
        saved, _ = load_config(resume_dir)
        if (saved.stage, saved.unet) != (cfg.stage, cfg.unet):
            raise ValueError(f"checkpoint {resume_dir} is for stage {saved.stage!r} with another "
                             "model config; resume it with the preset it was trained with")

    torch.manual_seed(tc.seed + rank)
    model = UNet(cfg.unet).to(device)
    ema = EMA(model, tc.ema_decay, tc.ema_start)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    step = 0
    if resume_dir:
        step = _load_state(resume_dir, model, ema, opt, rank, device)
        log.info("resumed from %s at step %d", resume_dir, step)
    ddp = DDP(model) if world > 1 else model
    diffusion = GaussianDiffusion(cfg.diffusion)

    root = os.path.dirname(os.path.abspath(job.data.rstrip("/")))
    tracker = RunLogger(resolve_tracking_uri(job.tracking_uri, root), job.experiment,
                        job.run_name or f"{cfg.stage}-{job.preset}",
                        artifact_root=os.path.join(root, "mlartifacts"), enabled=rank == 0,
                        tags={"stage": cfg.stage, "preset": job.preset})
    tracker.log_params({**flatten(cfg.to_dict()), "world_size": world,
                        "encoder_id": emb_meta.get("encoder_id"), "data": job.data})
    tracker.log_dict(cfg.to_dict(), "config.json")

    data_cfg = TrainDataConfig(
        data=job.data, embeddings=job.embeddings, image_size=cfg.image_size,
        lowres_size=cfg.lowres_size, max_tokens=cfg.max_text_len, batch_size=tc.batch_size,
        num_workers=job.num_workers, seed=tc.seed + step, expected_encoder_id=emb_meta.get("encoder_id"))
    batches = iter(make_loader(data_cfg, rank=rank, world_size=world))
    gen = torch.Generator().manual_seed(tc.seed * 1000 + rank + step)

    loss_val, t_last, wait = float("nan"), time.perf_counter(), 0.0
    ddp.train()
    while step < tc.max_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.lr, tc.warmup_steps, tc.max_steps)
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        loss = _loss(ddp, diffusion, cfg, batch, gen, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step}; the last good checkpoint is kept in "
                f"{job.checkpoint_dir}. Lower --lr or check the data, then --resume latest")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        ema.update(model, step)
        loss_val = loss.item()
        if step % tc.log_every == 0 or step == tc.max_steps:
            dt = time.perf_counter() - t_last
            n = min(tc.log_every, step) or 1
            metrics = {"loss": loss_val, "lr": opt.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                       "images_per_s": n * tc.batch_size * world / dt, "step_time_s": dt / n,
                       "data_wait_fraction": wait / dt}
            tracker.log_metrics(metrics, step)
            if rank == 0:
                print(f"[train {cfg.stage}] step {step}/{tc.max_steps} loss {loss_val:.4f} "
                      f"{metrics['images_per_s']:.1f} img/s", flush=True)
            t_last, wait = time.perf_counter(), 0.0
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            _save_checkpoint(job.checkpoint_dir, step, model, ema, opt, cfg, emb_meta, rank, world,
                             tc.keep_checkpoints)

    final = os.path.join(job.checkpoint_dir, "final")
    if rank == 0:
        _publish_final(final, list_checkpoints(job.checkpoint_dir)[-1])
        tracker.log_metrics({"final_loss": loss_val}, step)
        tracker.set_tags({"checkpoint": os.path.abspath(final)})
        tracker.end()
    return {"checkpoint": final, "step": step, "loss": loss_val, "run_id": tracker.run_id,
            "stage": cfg.stage}


def _loss(model, diffusion, cfg, batch, gen, device):
    """One training loss: noise images at a random level, drop text for CFG (Imagen sec. 2.2),
    noise the low-res input at a random augmentation level for SR stages (sec. 2.5)."""
    import torch

    x0 = batch["image"].to(device)
    text = batch["text_embeds"].to(device)
    mask = batch["text_mask"].to(device)
    b = x0.shape[0]
    drop = torch.rand(b, generator=gen) < cfg.diffusion.cond_drop_prob
    mask = mask & ~drop.to(device)[:, None]
    t = diffusion.sample_t(b, gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    x_t = diffusion.q_sample(x0, t, noise)
    extra = {}
    if cfg.lowres_size:
        lowres = batch["lowres"].to(device)
        aug_t = (torch.rand(b, generator=gen) * cfg.diffusion.lowres_aug_max).to(device)
        aug_noise = torch.randn(lowres.shape, generator=gen).to(device)
        extra = {"lowres": diffusion.q_sample(lowres, aug_t, aug_noise), "lowres_t": aug_t}
    out = model(x_t, t, text, mask, **extra)
    return diffusion.loss(out, x0, noise, t).mean()


def _save_checkpoint(checkpoint_dir, step, model, ema, opt, cfg, emb_meta, rank, world, keep):
    """Every rank saves its RNG state; rank 0 writes the rest, into a temp dir renamed into place.
    All ranks meet at barriers, so no rank waits on a collective another never calls."""
    import torch
    import torch.distributed as dist

    from imagen.checkpoint import save_weights

    final = os.path.join(checkpoint_dir, f"step-{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if world > 1:
        dist.barrier()
    torch.save({"torch": torch.get_rng_state()}, os.path.join(tmp, f"rng-{rank}.pt"))
    if rank == 0:
        meta = {"step": step, "encoder_id": emb_meta.get("encoder_id"),
                "encoder_name": emb_meta.get("encoder_name"), "world_size": world}
        save_weights(tmp, model.state_dict(), cfg, ema=ema.state_dict(), metadata=meta)
        torch.save(opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
    if world > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()


def _load_state(directory, model, ema, opt, rank, device) -> int:
    import torch
    from safetensors.torch import load_file

    from imagen.checkpoint import EMA_NAME, MODEL_NAME, load_config

    _, meta = load_config(directory)
    model.load_state_dict(load_file(os.path.join(directory, MODEL_NAME), device=str(device)))
    ema.load_state_dict(load_file(os.path.join(directory, EMA_NAME)))
    # weights_only=True: tensors and plain containers only, never arbitrary objects
    opt.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), weights_only=True,
                                   map_location=device))
    rng_path = os.path.join(directory, f"rng-{rank}.pt")
    if os.path.exists(rng_path):
        torch.set_rng_state(torch.load(rng_path, weights_only=True)["torch"])
    return int(meta["step"])


def _publish_final(final: str, source: str) -> None:
    """Copy the weights (not optimizer/RNG) of the last checkpoint to ``final`` atomically."""
    from imagen.checkpoint import CONFIG_NAME, EMA_NAME, MODEL_NAME

    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in (CONFIG_NAME, MODEL_NAME, EMA_NAME):
        shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, choices=["base64", "sr256", "sr1024"])
    p.add_argument("--preset", default="tiny", help="tiny | base64 | sr256 | sr1024 (default: tiny)")
    p.add_argument("--data", required=True, help="filtered shards directory (ROOT/filtered)")
    p.add_argument("--embeddings", required=True, help="embeddings directory of one encoder")
    p.add_argument("--checkpoint-dir", required=True, help="where step-N checkpoints and final/ go")
    p.add_argument("--max-steps", type=int, help="override the preset's step count")
    p.add_argument("--batch-size", type=int, help="per-process batch size (default: preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: preset's)")
    p.add_argument("--resume", help="'latest' or a step-N directory")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                          "else sqlite under the data root)")
    p.add_argument("--experiment", default="imagen", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name (default: STAGE-PRESET)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the local GPU if any)")
    p.add_argument("--seed", type=int, help="override the preset's seed")


def job_from_args(a: argparse.Namespace) -> TrainJob:
    return TrainJob(stage=a.stage, preset=a.preset, data=a.data, embeddings=a.embeddings,
                    checkpoint_dir=a.checkpoint_dir, max_steps=a.max_steps, batch_size=a.batch_size,
                    lr=a.lr, resume=a.resume, tracking_uri=a.tracking_uri, experiment=a.experiment,
                    run_name=a.run_name, num_workers=a.num_workers, device=a.device, seed=a.seed)


def job_to_argv(job: TrainJob) -> list[str]:
    """The command-line form of ``job``, for ``torchrun -m pipeline.train`` and launchers."""
    argv: list[str] = []
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        if value is not None:
            argv += [f"--{f.name.replace('_', '-')}", str(value)]
    return argv


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``torchrun -m pipeline.train``."""
    p = argparse.ArgumentParser(prog="pipeline.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(job_from_args(p.parse_args(argv)))
    if _dist_env()[0] == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
