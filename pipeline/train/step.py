"""One optimizer step of a cascade stage, on the training device, never waiting on the host.

    step = TrainStep(cfg, StepOptions(parallel="ddp", precision="auto"), plan, rank, world, device)
    wait = step.run(batches, step_index)   # grad_accum micro-batches, one optimizer step
    step.read_metrics()                    # the only host sync: {"loss", "grad_norm"} at logging steps

The trainer (trainer.py) and ``plan --calibrate`` (pipeline/calibrate.py) both time this
class, so the planner's figures are those of the real step.

Per micro-batch (Imagen sec. 2): noise level t ~ U(0, 1); text dropped for ``cond_drop_prob``
of the samples (classifier-free guidance, sec. 2.2); for SR stages the low-res input is noised
at a random augmentation level that is also a model input (noise-conditioning augmentation,
sec. 2.5). Every draw comes from ``generator``, this rank's generator on the training device
(no CPU draw copied over from pageable memory), saved with each checkpoint so that resume is
exact on CPU and on CUDA alike.

Nothing here reads a value back to the host (STYLE #14): the loss, the gradient norm and a
"non-finite seen" flag stay on the device until :meth:`TrainStep.read_metrics`, which the
trainer calls at logging steps and before every checkpoint. A non-finite loss or gradient
therefore stops training there with ``FloatingPointError``, before any checkpoint holds the
bad weights: the last checkpoint written is good, and ``--resume latest`` restarts from it.
Images arrive as uint8 and text as fp16 (pipeline/data/batch.py ``to_device``), padded to the
preset's ``max_text_len``: shapes are static, so ``--compile`` compiles one graph.

Efficiency at scale: fused AdamW on CUDA; FSDP2 gathers bf16 parameters and reduces in fp32
(parallel.py); gradients are synchronised only on the last micro-batch of a step (DDP
``no_sync``, FSDP ``set_requires_gradient_sync``); the EMA updates with foreach ops.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from imagen.config import StageConfig
from imagen.diffusion import GaussianDiffusion
from imagen.ema import EMA
from imagen.unet import UNet
from pipeline.train.job import BatchPlan
from pipeline.train.parallel import channels_last, parallelize


@dataclass(frozen=True)
class StepOptions:
    """How the step runs (the TrainJob's say, not the preset's)."""

    parallel: str = "ddp"  # "ddp" or "fsdp"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; "fp32"; "bf16"
    optimizer: str = "adamw"  # or "adafactor"
    compile: bool = False
    gradient_checkpointing: bool = False


def uses_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def build_optimizer(name: str, params, lr: float, weight_decay: float, device: torch.device):
    """AdamW, fused (one kernel per step, its step counters on the device, so it never reads
    one back as the unfused AdamW does every step), or Adafactor (Imagen trains its base model
    with it)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cuda", "cpu"))
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw or adafactor")


class TrainStep:
    """Model, wrapping, optimizer, EMA and generator of one rank, and its optimizer step."""

    def __init__(self, cfg: StageConfig, opts: StepOptions, plan: BatchPlan, rank: int, world: int,
                 device: torch.device):
        self.cfg, self.opts, self.plan, self.rank, self.world, self.device = cfg, opts, plan, rank, world, device
        tc = cfg.train
        self.bf16 = uses_bf16(opts.precision, device)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        model = UNet(cfg.unet).to(device)
        model.gradient_checkpointing = opts.gradient_checkpointing
        self.channels_last = channels_last(opts.parallel, world)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.wrapped = parallelize(model, opts.parallel, world, bf16=self.bf16)
        self.ddp = self.wrapped if hasattr(self.wrapped, "no_sync") else None
        if opts.compile:
            # after DDP/FSDP wrapping, as PyTorch recommends; weights and checkpoints stay those of
            # ``model`` (no _orig_mod prefix). Static shapes (text padded to max_text_len): one graph.
            self.wrapped = torch.compile(self.wrapped, dynamic=False)
        self.ema = EMA(model, cfg.ema())  # after sharding: each rank keeps the EMA of its shards
        self.optimizer = build_optimizer(opts.optimizer, model.parameters(), tc.lr, tc.weight_decay, device)
        self.generator = torch.Generator(device=device).manual_seed(tc.seed * 1000 + rank)
        self.diffusion = GaussianDiffusion(cfg.diffusion)
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.steps_unread: list[int] = []

    # --------------------------------------------------------------------------------------

    def draws(self, n: int, image_shape: torch.Size, lowres_shape: torch.Size | None) -> dict[str, torch.Tensor]:
        """This micro-batch's random draws, on the device from this rank's generator."""
        gen, dev, d = self.generator, self.device, self.cfg.diffusion
        out = {"keep_text": torch.rand(n, generator=gen, device=dev) >= d.cond_drop_prob,  # CFG, sec. 2.2
               "t": self.diffusion.sample_t(n, gen, device=dev),
               "noise": torch.randn(image_shape, generator=gen, device=dev)}
        if lowres_shape is not None:  # noise-conditioning augmentation, sec. 2.5
            out["aug_t"] = torch.rand(n, generator=gen, device=dev) * d.lowres_aug_max
            out["aug_noise"] = torch.randn(lowres_shape, generator=gen, device=dev)
        return out

    def micro_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean diffusion loss of one micro-batch (a device scalar)."""
        from pipeline.data.batch import to_device

        b = to_device(batch, self.device, channels_last=self.channels_last)
        x0 = b["image"]
        lowres = b.get("lowres") if self.cfg.lowres_size else None
        r = self.draws(x0.shape[0], x0.shape, None if lowres is None else lowres.shape)
        mask = b["text_mask"] & r["keep_text"][:, None]
        extra = {}
        if lowres is not None:
            extra = {"lowres": self.diffusion.q_sample(lowres, r["aug_t"], r["aug_noise"]), "lowres_t": r["aug_t"]}
        x_t = self.diffusion.q_sample(x0, r["t"], r["noise"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.wrapped(x_t, r["t"], b["text_embeds"], mask, **extra)
        return self.diffusion.loss(out.float(), x0, r["noise"], r["t"]).mean()

    def _grad_sync(self, sync: bool):
        """No gradient reduction on accumulation micro-steps: only the last one of a step."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if self.ddp is not None and not sync:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def run(self, batches: Iterator[dict[str, Any]], step: int, lr: float) -> float:
        """Optimizer step number ``step`` (0-based) over ``grad_accum`` micro-batches at
        learning rate ``lr``; returns the seconds spent waiting for data."""
        accum, wait = self.plan.grad_accum, 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            with self._grad_sync(micro == accum - 1):
                loss = self.micro_loss(batch) / accum
                loss.backward()
            total += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor; an all-reduce, not a host read
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.ema.update(self.model, step + 1)
        self.loss, self.grad_norm = total, grad_norm
        self.nonfinite |= ~(torch.isfinite(total) & torch.isfinite(grad_norm))
        self.steps_unread.append(step + 1)
        return wait

    def read_metrics(self) -> dict[str, float]:
        """Loss (mean over ranks) and gradient norm of the last step, read to the host: one
        sync, and a collective on every rank. Raises ``FloatingPointError`` when any step since
        the last read had a non-finite loss or gradient, on every rank at once."""
        vals = torch.stack([self.loss.float(), self.grad_norm.float(), self.nonfinite.float()])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(vals)  # summed over ranks: loss, norm (equal on all) and non-finite count
        loss, grad_norm, bad = vals.tolist()
        steps, self.steps_unread = self.steps_unread, []
        if bad:
            span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
            raise FloatingPointError(
                f"the loss or gradient became non-finite in {span} (last loss {loss / self.world}); no "
                "checkpoint was written after it. Lower --lr or check the data, then --resume latest")
        return {"loss": loss / self.world, "grad_norm": grad_norm / self.world}  # the same norm on every rank
