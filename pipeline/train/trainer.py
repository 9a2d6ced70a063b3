"""The training loop of one cascade stage (run by pipeline/train/worker.py; the job: job.py).

    Trainer(job, rank, world, device).fit()  ->  {"checkpoint", "step", "loss", "run_id", ...}

The preset's batch is the global batch (Imagen appendix F): each of the ``world`` processes
takes ``global_batch / world`` images per optimizer step, as ``grad_accum`` micro-batches of
``micro_batch`` (job.py ``batch_plan``). The step itself (draws, loss, backward, optimizer, EMA)
is step.py's, which never reads a value back to the host; the loop reads the loss and
gradient norm only at logging steps and before each checkpoint, where a non-finite step
stops training before it could be saved. Every random draw comes from this rank's generator
on the device, checkpointed with the step and the data position, which makes resume exact.

Each logging interval logs ``loss``, ``grad_norm``, ``lr``, ``perf/images_per_s``,
``perf/mfu`` (model FLOPs per second over the device's bf16 peak, from
``pipeline/calibration.json``; on a CPU ``perf/tflops`` instead), step time and the fraction
of it spent waiting for data. Every ``eval_every`` steps and at the end, the EMA weights are
scored on the held-out validation split (validation.py): ``val/loss`` and one
``val/loss_t<level>`` per fixed noise level, the figure runs are compared and promoted on.
The sample grid (``sample_every``) samples the first validation captions.

SIGINT or SIGTERM stops the loop at the next step boundary (stopping.py): every rank agrees on
the step, checkpoints it, the MLflow run is ended KILLED and ``TrainingStopped`` is raised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from typing import Any

import torch

from imagen.unet import UNet
from pipeline import storage
from pipeline.layout import RunDir, RunLayout, manifest_sha256
from pipeline.tracking import code_version
from pipeline.train import checkpointing as ckpt
from pipeline.train import perf
from pipeline.train.job import TrainJob, batch_plan, job_plan, resolve_config
from pipeline.train.parallel import all_equal, any_rank, flag_group, on_rank0
from pipeline.train.step import StepOptions, TrainStep
from pipeline.train.stopping import StopSignals, TrainingStopped

log = logging.getLogger("pipeline.train")
VAL_SAMPLES = 8  # fixed validation captions in the sample grid


def lr_at(step: int, base: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warmup (Imagen: 10k steps), then the base rate ("constant", as the paper) or a
    cosine decay to 10% of it at ``total`` ("cosine")."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class Trainer:
    def __init__(self, job: TrainJob, rank: int, world: int, device: torch.device):
        from pipeline.data.embed import read_metadata
        from pipeline.tracking import RunLogger

        self.job, self.rank, self.world, self.device = job, rank, world, device
        emb_meta = read_metadata(job.embeddings)
        self.cfg = cfg = resolve_config(job, emb_meta)
        self.tc = cfg.train
        self.plan = batch_plan(self.tc.global_batch, self.tc.micro_batch, world,
                               micro_explicit=job.micro_batch is not None)
        self.layout = layout = RunLayout(job.root) if job.root else RunLayout.around(job.data)
        metadata = {"encoder_id": emb_meta.get("encoder_id"), "encoder_name": emb_meta.get("encoder_name"),
                    "manifest_sha256": manifest_sha256(job.data),
                    "code_version": code_version(), "root": layout.root}
        opts = StepOptions(parallel=job.parallel, precision=job.precision, optimizer=job.optimizer,
                           compile=job.compile, gradient_checkpointing=job.gradient_checkpointing)
        self.runner = TrainStep(cfg, opts, self.plan, rank, world, device)
        self.model, self.ema, self.optimizer = self.runner.model, self.runner.ema, self.runner.optimizer
        self.state = ckpt.TrainState(self.model, self.ema, self.optimizer, self.runner.generator, cfg, metadata,
                                     fsdp=job.parallel == "fsdp" and world > 1)
        self.flops_per_image = perf.train_flops_per_image(cfg)
        self.peak_flops = perf.peak_flops(device)
        self.step = self.saved_step = 0
        self.stop_group = flag_group(world)  # where the ranks agree to stop on a signal
        # rank 0 picks the step to resume and every rank loads that one: a node whose view of a
        # shared directory lags (NFS listing caches) must not resume another step or none
        resume_dir = on_rank0(lambda: ckpt.find_resume(job.checkpoint_dir, job.resume), rank, world,
                              "finding the checkpoint to resume")
        if resume_dir:
            self.step = int(ckpt.load_checkpoint(resume_dir, self.state, rank, world, device,
                                                 allow_data_change=job.allow_data_change)["step"])
            self.saved_step = self.step
            if rank == 0:
                print(f"[train {cfg.stage}] resumed from {resume_dir} at step {self.step}", flush=True)

        self.tracker = RunLogger(layout.tracking_uri(job.tracking_uri), job.experiment,
                                 job.run_name or f"{cfg.stage}-{job.preset}",
                                 artifact_root=layout.artifacts, enabled=rank == 0,
                                 run_id=self._previous_run_id(resume_dir),
                                 tags={"stage": cfg.stage, "preset": job.preset})
        try:
            self._start_run(resume_dir, metadata)
        except BaseException as e:  # Ctrl-C or an input error while starting: no run left RUNNING
            self.tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise

    def _start_run(self, resume_dir: str | None, metadata: dict[str, Any]) -> None:
        """After the MLflow run is open: the data, the run's parameters, validation."""
        from pipeline.tracking import flatten

        cfg, job, rank, world = self.cfg, self.job, self.rank, self.world
        loader = self._loader(start_batch=self.step * self.plan.grad_accum)
        # what this stage trains on: the samples at least its size, and those left out (sec. 2.5)
        self.data_counts = dict(loader.data_counts)
        if rank == 0:
            print(f"[train {cfg.stage}] {self.data_counts['data_samples']} samples of at least "
                  f"{cfg.image_size} px; {self.data_counts['data_excluded_too_small']} smaller ones "
                  "left out of this stage", flush=True)
        if not resume_dir:
            resolved = {k: v for k, v in job_plan(job, cfg, world).items() if k not in ("stage", "preset")}
            self.tracker.log_params({**flatten(cfg.to_dict()), **metadata, **resolved,
                                     "data": job.data, "embeddings": job.embeddings,
                                     "flops_per_image": self.flops_per_image, **self.data_counts})
            self.tracker.log_dict(cfg.to_dict(), "config.json")
            if metadata["manifest_sha256"]:
                self.tracker.log_dataset(storage.normalize(job.data), "filtered-shards", metadata["manifest_sha256"])
        self.state.metadata["mlflow_run_id"] = self.tracker.run_id
        self.batches = iter(loader)
        self.has_val = self._has_validation()
        # every eval_every steps, but at least four times in a run: a short run logs a series too
        self.eval_every = max(1, min(self.tc.eval_every, self.tc.max_steps // 4)) if self.tc.eval_every else 0
        self.val_loss: float | None = None
        self.val_batch = self._validation_batch() if rank == 0 and self.tc.sample_every else None

    def _previous_run_id(self, resume_dir: str | None) -> str | None:
        """A resumed job continues the MLflow run of the checkpoint it resumes."""
        if not resume_dir:
            return None
        from imagen.checkpoint import load_config

        return load_config(resume_dir, storage)[1].get("mlflow_run_id")

    def _loader(self, start_batch: int, **overrides):
        from pipeline.data.loader import make_loader

        data_cfg = self._data_config(start_batch)
        return make_loader(dataclasses.replace(data_cfg, **overrides), rank=self.rank,
                           world_size=self.world if not overrides else 1)

    def _data_config(self, start_batch: int = 0):
        from pipeline.data.loader import TrainDataConfig

        cfg, spec = self.cfg, self.cfg.spec
        return TrainDataConfig(
            data=self.job.data, embeddings=self.job.embeddings, image_size=spec.image_size,
            crop_size=spec.crop_size, lowres_crop_size=spec.lowres_crop_size, random_crop=spec.random_crop,
            max_tokens=cfg.max_text_len, pad_text_to=cfg.max_text_len, batch_size=self.plan.micro_batch,
            # on a CPU the workers run beside the step: they normalise the pixels (to_device
            # passes them through); on a GPU uint8 crosses and the device normalises
            normalize_in_workers=self.device.type == "cpu",
            num_workers=self.job.num_workers, seed=self.tc.seed,
            expected_encoder_id=self.state.metadata["encoder_id"], expected_dim=cfg.unet.text_embed_dim,
            expected_max_length=cfg.max_text_len,
            start_batch=start_batch)

    def _has_validation(self) -> bool:
        from pipeline.data.loader import validation_shards_exist

        if validation_shards_exist(self.job.data):
            return True
        if self.rank == 0:
            print(f"[train {self.cfg.stage}] WARNING: {self.job.data} has no validation split (filtered "
                  "before it existed): no val/loss is logged; rerun the filter step to get one", flush=True)
        return False

    def _validation_batch(self) -> dict[str, Any]:
        """The first validation samples in their fixed order: their captions are the fixed
        prompts of the sample grid, their precomputed embeddings spare the trainer a T5 load.
        Whole images, centre-cropped: a stage that trains on crops samples at its full size.
        Without a validation split (older data), the first training samples instead."""
        from pipeline.data.loader import make_validation_loader

        whole = {"batch_size": VAL_SAMPLES, "num_workers": 0, "crop_size": self.cfg.image_size,
                 "lowres_crop_size": self.cfg.lowres_size}  # the whole image is the crop here
        if self.has_val:
            from pipeline.train.validation import validation_data

            data = validation_data(self.cfg, self.job.data, self.job.embeddings, VAL_SAMPLES,
                                   encoder_id=self.state.metadata["encoder_id"])
            first = next(iter(make_validation_loader(dataclasses.replace(data, **whole), limit=VAL_SAMPLES)), None)
            if first is not None:
                return first
        return next(iter(self._loader(0, random_flip=False, random_crop=False, **whole)))

    @torch.no_grad()
    def _validate(self) -> None:
        """The validation loss of the EMA weights (validation.py), logged as ``val/loss`` and
        one ``val/loss_t<level>`` per noise level. Called on every rank: each scores its share
        of the split and the sums are all-reduced (gathering sharded EMA weights is a
        collective too)."""
        from pipeline.data.loader import make_validation_loader
        from pipeline.train.validation import eval_net, validation_data, validation_loss

        net = eval_net(self.cfg, self.ema.state_dict(), self.device)
        data = validation_data(self.cfg, self.job.data, self.job.embeddings, self.plan.micro_batch,
                               self.job.num_workers, self.state.metadata["encoder_id"])
        batches = make_validation_loader(data, rank=self.rank, world_size=self.world, limit=self.tc.eval_samples)
        metrics = validation_loss(net, self.cfg, batches, self.device, self.world, bf16=self.runner.bf16)
        del net
        if not metrics:
            return
        self.val_loss = metrics["val/loss"]
        self.tracker.log_metrics(metrics, self.step)
        if self.rank == 0:
            print(f"[train {self.cfg.stage}] validation at step {self.step}: val/loss {self.val_loss:.4f} "
                  f"({int(metrics['val/samples'])} held-out samples)", flush=True)

    # ----------------------------------------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step (nothing read back to the host); returns seconds waiting for data."""
        lr = lr_at(self.step, self.tc.lr, self.tc.warmup_steps, self.tc.max_steps, self.tc.lr_schedule)
        wait = self.runner.run(self.batches, self.step, lr)
        self.step += 1
        return wait

    def fit(self) -> dict[str, Any]:
        """Train to ``max_steps``; on SIGINT/SIGTERM, stop at the next step boundary with a
        checkpoint of that step and raise :class:`~pipeline.train.stopping.TrainingStopped`."""
        tc, loss = self.tc, float("nan")
        timing = {"last": time.perf_counter(), "wait": 0.0, "steps": 0}  # since the last log
        self.totals = {"steps": 0, "seconds": 0.0, "wait": 0.0}  # after the first log interval
        self.runner.wrapped.train()
        with StopSignals() as stop:  # Ctrl-C / SIGTERM: stop at the next step boundary (stopping.py)
            while self.step < tc.max_steps:
                loss = self._fit_step(loss, timing)
                if self.step < tc.max_steps and any_rank(stop.signum is not None, self.world, self.stop_group):
                    self._stop_here(stop.name or "a signal on another rank")
        return self._finish(loss)

    def _fit_step(self, loss: float, timing: dict[str, float]) -> float:
        """One optimizer step with what falls due after it: logs, checkpoint, validation, grid.
        Returns the loss last read back (``loss`` when this step read none)."""
        tc = self.tc
        timing["wait"] += self.train_step()
        timing["steps"] += 1
        log_now = self.step % tc.log_every == 0 or self.step == tc.max_steps
        save_now = self.step % tc.checkpoint_every == 0 or self.step == tc.max_steps
        if log_now or save_now:
            # the only host sync of the loop; raises on every rank when a step went non-finite,
            # so a checkpoint never holds weights after a bad step
            metrics = self.runner.read_metrics()
            loss = metrics["loss"]
        if log_now:
            dt, steps, wait = time.perf_counter() - timing["last"], int(timing["steps"]), timing["wait"]
            self._log(metrics, steps, dt, wait)
            if self.step > tc.log_every:  # the first interval holds start-up costs
                self.totals = {"steps": self.totals["steps"] + steps,
                               "seconds": self.totals["seconds"] + dt, "wait": self.totals["wait"] + wait}
            timing.update(last=time.perf_counter(), wait=0.0, steps=0)
        if save_now:
            self._save()
        last, t_eval = self.step == tc.max_steps, time.perf_counter()
        if self.has_val and (last or (self.eval_every and self.step % self.eval_every == 0)):
            self._validate()
        if tc.sample_every and (self.step % tc.sample_every == 0 or last):
            self._sample_grid()
        timing["last"] += time.perf_counter() - t_eval  # throughput figures are the training steps'
        return loss

    def _save(self) -> str:
        self.saved_step = self.step
        return ckpt.save_checkpoint(self.job.checkpoint_dir, self.step, self.state, self.rank, self.world,
                                    self.tc.keep_checkpoints)

    def _stop_here(self, signal_name: str) -> None:
        """Every rank, at a step boundary, after a signal: checkpoint this step (unless it was
        just saved), mark the MLflow run KILLED, raise TrainingStopped."""
        if self.saved_step != self.step:
            # the non-finite check of read_metrics: a stopped run never saves a bad step either
            self.runner.read_metrics()
            self._save()
        if self.rank == 0:
            self.tracker.set_tags({"stopped_at_step": str(self.step), "stopped_by": signal_name})
            self.tracker.end("KILLED")
        raise TrainingStopped({"signal": signal_name, "step": self.step, "stage": self.cfg.stage,
                               "checkpoint": RunDir(self.job.checkpoint_dir).step(self.step),
                               "checkpoint_dir": self.job.checkpoint_dir, "run_id": self.tracker.run_id})

    def _log(self, step_metrics: dict[str, float], steps: int, dt: float, wait: float) -> None:
        images_per_s = steps * self.plan.global_batch / dt
        metrics = {**step_metrics, "lr": self.optimizer.param_groups[0]["lr"],
                   "ema_decay": self.ema.decay_at(self.step),  # per-step effective decay
                   "perf/images_per_s": images_per_s, "step_time_s": dt / steps, "data_wait_fraction": wait / dt,
                   **perf.utilisation(self.flops_per_image * images_per_s / self.world, self.peak_flops)}
        self.tracker.log_metrics(metrics, self.step)
        if self.rank == 0:
            mfu = f" MFU {100 * metrics['perf/mfu']:.1f}%" if "perf/mfu" in metrics else ""
            print(f"[train {self.cfg.stage}] step {self.step}/{self.tc.max_steps} loss {metrics['loss']:.4f} "
                  f"lr {metrics['lr']:.2e} {images_per_s:.1f} img/s{mfu} "
                  f"data wait {100 * metrics['data_wait_fraction']:.1f}%", flush=True)

    @torch.no_grad()
    def _sample_grid(self) -> None:
        """Sample the validation captions with the EMA weights on rank 0 and log the grid.
        Called on every rank: gathering FSDP-sharded EMA weights is a collective."""
        from imagen.cascade import StageOptions, run_stage, to_uint8
        from pipeline.grids import make_grid

        ema = ckpt.gather_to_rank0(self.ema.state_dict(), self.rank)
        if self.rank != 0:
            return
        from pipeline.data.batch import to_device

        b = self.val_batch
        on = to_device(b, self.device, channels_last=True)
        net = UNet(self.cfg.unet).to(self.device, memory_format=torch.channels_last).eval()
        net.load_state_dict({k: v.to(net.state_dict()[k].dtype) for k, v in ema.items()})
        # the cascade's own stage sampler: an SR stage's low-res input is noised at the level it
        # is told (sec. 2.5), exactly as at inference
        lowres = on["lowres"] if self.cfg.lowres_size else None
        x = run_stage(net, self.cfg, StageOptions(), on["text_embeds"], on["text_mask"], lowres,
                      torch.Generator(self.device).manual_seed(0))
        labels = [str(c) for c in (b.get("captions") or b["keys"])]  # each sample beside its caption
        self.tracker.log_image(make_grid(to_uint8(x), cols=1, row_labels=labels), key="samples", step=self.step)
        if self.step == self.tc.sample_every:
            captions = b.get("captions") or b["keys"]
            self.tracker.log_dict({"keys": b["keys"], "captions": captions}, "validation_prompts.json")

    def _finish(self, loss: float) -> dict[str, Any]:
        final = RunDir(self.job.checkpoint_dir).final
        checksum = weights_sha256(self.model)
        ema_checksum = tensors_sha256(self.ema.state_dict())  # this rank's own EMA
        if not all_equal(checksum, self.world):
            raise RuntimeError("ranks ended with different weights: the data-parallel run diverged")
        if self.rank == 0:
            ckpt.publish_final(final, ckpt.list_checkpoints(self.job.checkpoint_dir)[-1])
            self.tracker.log_metrics({"final_loss": loss}, self.step)
            self.tracker.set_tags({"checkpoint": storage.normalize(final)})
            self.tracker.end()
        tot = self.totals
        images = tot["steps"] * self.plan.global_batch
        return {"checkpoint": final, "step": self.step, "loss": loss, "val_loss": self.val_loss,
                "run_id": self.tracker.run_id, "tracking_uri": self.tracker.tracking_uri,
                "stage": self.cfg.stage, "root": self.layout.root, "data": storage.normalize(self.job.data),
                "embeddings": storage.normalize(self.job.embeddings), "weights_sha256": checksum, **self.data_counts,
                "ema_sha256": ema_checksum,
                "images_per_s": images / tot["seconds"] if tot["seconds"] else None,
                "data_wait_fraction": tot["wait"] / tot["seconds"] if tot["seconds"] else None}


def weights_sha256(model: torch.nn.Module) -> str:
    """Checksum of the full weights (gathers shards under FSDP: call on every rank)."""
    return tensors_sha256(model.state_dict())


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """Checksum of a state dict's names and bytes, in name order; the same for the tensors a
    ``*.safetensors`` file of it holds (gathers DTensor shards: call on every rank)."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        h.update(k.encode())
        # reshape(-1): a channels-last [O, I, 1, 1] weight counts as contiguous yet keeps a
        # last stride of I, which a byte view refuses
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
