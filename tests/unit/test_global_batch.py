"""The global batch is the contract (pipeline/train/job.py ``batch_plan``, pipeline/train/step.py):
how a preset's batch is cut over processes and micro-batches, and that the cut does not change
what is learned. The tiny base stage trained on the same global batches, with each sample's noise,
level and text dropout drawn from that sample's own seed, ends with the same weights whether one
process takes 16 at once or 4 four times (here), or two processes take 4 twice each (gloo, in
tests/integration/test_global_batch.py, which runs this file's ``main`` under torchrun).

Per-sample draws stand in for the trainer's per-rank generator only here: with a generator per
rank, which sample meets which noise depends on the world size by design, so nothing but the
arithmetic of accumulation and averaging could be compared.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from imagen.config import preset
from pipeline.train.job import BatchPlan, batch_plan
from pipeline.train.step import StepOptions, TrainStep
from pipeline.train.trainer import lr_at

GLOBAL, STEPS = 16, 3


# --- the plan ----------------------------------------------------------------------------------

def test_paper_preset_on_eight_gpus_keeps_the_global_batch():
    cfg = preset("base64")
    plan = batch_plan(cfg.train.global_batch, cfg.train.micro_batch, 8)
    assert plan == BatchPlan(2048, 64, 4, 8) and plan.micro_batch * plan.grad_accum * plan.world_size == 2048


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8, 16, 64, 512, 2048])
def test_a_default_micro_batch_shrinks_to_a_divisor(world):
    if 2048 % world:
        with pytest.raises(ValueError, match=f"does not split over {world} processes: pass --global-batch"):
            batch_plan(2048, 64, world)
        return
    plan = batch_plan(2048, 64, world)
    assert plan.micro_batch <= 64 and plan.micro_batch * plan.grad_accum * world == 2048


def test_impossible_combinations_say_what_to_pass():
    with pytest.raises(ValueError, match="--micro-batch 48 does not divide the 256 images each of 8 processes "
                                         "take.? of --global-batch 2048: pass --micro-batch 32 or 64"):
        batch_plan(2048, 48, 8, micro_explicit=True)
    with pytest.raises(ValueError, match="--global-batch 4096 does not split over 3 processes: pass "
                                         "--global-batch 4095 or 4098"):
        batch_plan(4096, 64, 3)
    with pytest.raises(ValueError, match="the micro-batch must be at least 1, got 0"):
        batch_plan(16, 0, 1)
    assert batch_plan(6, 4, 1) == BatchPlan(6, 3, 2, 1)  # a preset default shrinks to a divisor
    assert batch_plan(8, 64, 2) == BatchPlan(8, 4, 1, 2)  # and never exceeds the share


# --- the same learning, however the batch is cut ---------------------------------------------

def config():
    cfg = preset("tiny")
    cfg.train.global_batch, cfg.train.lr, cfg.train.warmup_steps = GLOBAL, 1e-3, 1
    cfg.train.ema_update_after_step, cfg.train.ema_update_every = 1, 1
    return cfg


def sample(i: int, cfg) -> dict:
    """Sample ``i`` of the stream as the loader's collate makes it (uint8 pixels, fp16 padded text)."""
    rng = np.random.default_rng(i)
    side, width, dim = cfg.image_size, cfg.max_text_len, cfg.unet.text_embed_dim
    n = 1 + i % 7
    return {"image": rng.integers(0, 256, (3, side, side), np.uint8),
            "text": rng.standard_normal((width, dim)).astype(np.float16) * (np.arange(width) < n)[:, None],
            "mask": np.arange(width) < n, "key": f"{i:06d}"}


def batches_of(step: int, rank: int, plan: BatchPlan, cfg):
    """Rank ``rank``'s micro-batches of global batch ``step``: its contiguous share, in order."""
    first = step * plan.global_batch + rank * plan.per_process
    for m in range(plan.grad_accum):
        items = [sample(first + m * plan.micro_batch + j, cfg) for j in range(plan.micro_batch)]
        yield {"image": torch.from_numpy(np.stack([s["image"] for s in items])),
               "text_embeds": torch.from_numpy(np.stack([s["text"] for s in items])),
               "text_mask": torch.from_numpy(np.stack([s["mask"] for s in items])),
               "keys": [s["key"] for s in items]}


class PerSampleDraws(TrainStep):
    """Each sample's noise, level and dropout from a seed of (step, sample), whoever trains it."""

    def run(self, batches, step, lr):
        self._step = step
        return super().run(batches, step, lr)

    def micro_loss(self, batch):
        self._keys = batch["keys"]
        return super().micro_loss(batch)

    def draws(self, n, image_shape, lowres_shape):
        rows = []
        for key in self._keys:
            g = torch.Generator().manual_seed(1000 * self._step + int(key))
            rows.append({"keep_text": torch.rand(1, generator=g) >= self.cfg.diffusion.cond_drop_prob,
                         "t": self.diffusion.sample_t(1, g),
                         "noise": torch.randn((1, *image_shape[1:]), generator=g)})
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def train(micro: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    cfg = config()
    plan = batch_plan(GLOBAL, micro, world, micro_explicit=True)
    step = PerSampleDraws(cfg, StepOptions(), plan, rank, world, torch.device("cpu"))
    for s in range(STEPS):
        step.run(batches_of(s, rank, plan, cfg), s, lr_at(s, cfg.train.lr, 1, STEPS))
    step.read_metrics()
    weights = {f"model.{k}": v.detach().clone() for k, v in step.model.state_dict().items()}
    return {**weights, **{f"ema.{k}": v.clone() for k, v in step.ema.state_dict().items()}}


def assert_same_weights(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    changed = max((a[k] - train_init()[k]).abs().max().item() for k in a if k.startswith("model."))
    assert changed > 1e-3  # the runs did learn something: equal weights are not untrained ones
    assert worst < 1e-5, worst  # fp32 summation order only
    return worst


_INIT: dict = {}


def train_init() -> dict:
    if not _INIT:
        torch.manual_seed(config().train.seed)
        from imagen.unet import UNet

        _INIT.update({f"model.{k}": v for k, v in UNet(config().unet).state_dict().items()})
    return _INIT


def test_micro_batches_accumulate_to_the_global_batch():
    whole, accumulated = train(micro=16), train(micro=4)
    worst = assert_same_weights(whole, accumulated)
    print(f"micro-batch 16 vs 4 x 4: largest weight difference {worst:.2e}")


def main() -> None:
    """One rank of the two-process run (torchrun): world 2, micro-batch 4, accumulation 2."""
    from safetensors.torch import save_file

    from pipeline.train.parallel import init_distributed, shutdown

    rank, world, _ = init_distributed("cpu")
    try:
        weights = train(micro=4, rank=rank, world=world)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, sys.argv[1])  # channels-last convs
    finally:
        shutdown()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
