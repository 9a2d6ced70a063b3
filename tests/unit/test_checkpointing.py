"""pipeline/train/checkpointing.py in one process: a step directory saves and restores model, EMA,
optimizer and every RNG exactly, is written atomically, old ones are pruned to ``keep``, and a
checkpoint of another stage or encoder is refused."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from imagen.config import preset
from imagen.ema import EMA
from imagen.unet import UNet
from pipeline.train import checkpointing as ckpt


def make_state(seed: int = 0, stage: str = "base64", metadata: dict | None = None) -> ckpt.TrainState:
    torch.manual_seed(seed)
    cfg = preset("tiny", stage)
    model = UNet(cfg.unet)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return ckpt.TrainState(model, EMA(model, cfg.ema()), optimizer, torch.Generator().manual_seed(seed), cfg,
                           dict(metadata or {"encoder_id": "enc-a"}))


def one_step(state: ckpt.TrainState, step: int) -> None:
    """A real optimizer step, so the optimizer has moments to save."""
    for p in state.model.parameters():
        p.grad = torch.randn(p.shape, generator=state.generator) * 1e-2
    state.optimizer.step()
    state.ema.update(state.model, step)


def draws(generator: torch.Generator) -> tuple:
    """The next value of every RNG a training step uses."""
    return (torch.rand(3).tolist(), torch.rand(3, generator=generator).tolist(),
            np.random.rand(3).tolist(), [random.random() for _ in range(3)])


def test_save_then_load_restores_weights_optimizer_ema_and_every_rng(tmp_path):
    state = make_state(seed=0)
    one_step(state, 1)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    path = ckpt.save_checkpoint(str(tmp_path), 1, state, rank=0, world=1, keep=3)
    assert os.path.basename(path) == "step-00000001"
    assert sorted(os.listdir(path)) == ["config.json", "ema.safetensors", "model.safetensors", "optimizer.pt",
                                        "rng-0.pt"]
    expected = draws(state.generator)  # what the run would have drawn next

    fresh = make_state(seed=1)  # other weights, other RNG states
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    meta = ckpt.load_checkpoint(path, fresh, rank=0, world=1, device=torch.device("cpu"))
    assert meta["step"] == 1 and meta["world_size"] == 1 and meta["encoder_id"] == "enc-a"
    assert draws(fresh.generator) == expected
    for (k, a), b in zip(state.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    for k, v in state.ema.state_dict().items():
        torch.testing.assert_close(fresh.ema.state_dict()[k], v, rtol=0, atol=0, msg=k)
    saved, loaded = state.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i, s in saved["state"].items():
        torch.testing.assert_close(loaded["state"][i]["exp_avg"], s["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(loaded["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=0, atol=0)


def test_another_world_size_keeps_the_rngs_it_has(tmp_path):
    state = make_state()
    path = ckpt.save_checkpoint(str(tmp_path), 1, state, rank=0, world=1, keep=1)
    fresh = make_state(seed=3)
    before = fresh.generator.get_state()
    ckpt.load_checkpoint(path, fresh, rank=0, world=2, device=torch.device("cpu"))  # saved by 1 rank
    assert torch.equal(fresh.generator.get_state(), before)  # no other rank's stream is borrowed


def test_keep_prunes_to_the_newest_and_latest_finds_it(tmp_path):
    state = make_state()
    (tmp_path / "step-00000005.tmp").mkdir()  # a save killed half-way, at a later step
    for step in range(1, 5):
        ckpt.save_checkpoint(str(tmp_path), step, state, rank=0, world=1, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step-00000003", "step-00000004", "step-00000005.tmp"]
    assert ckpt.list_checkpoints(str(tmp_path)) == [str(tmp_path / "step-00000003"),
                                                    str(tmp_path / "step-00000004")]
    assert ckpt.find_resume(str(tmp_path), "latest") == str(tmp_path / "step-00000004")  # never a .tmp
    assert ckpt.find_resume(str(tmp_path), None) is None
    assert ckpt.find_resume(str(tmp_path / "nothing-yet"), "latest") is None
    assert ckpt.find_resume(str(tmp_path), str(tmp_path / "step-00000003")) == str(tmp_path / "step-00000003")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        ckpt.find_resume(str(tmp_path), str(tmp_path / "step-00000005.tmp"))


def test_a_stale_tmp_of_the_same_step_is_replaced(tmp_path):
    stale = tmp_path / "step-00000001.tmp"
    stale.mkdir()
    (stale / "junk").write_text("half a save")
    ckpt.save_checkpoint(str(tmp_path), 1, make_state(), rank=0, world=1, keep=1)
    assert sorted(os.listdir(tmp_path)) == ["step-00000001"]
    assert "junk" not in os.listdir(tmp_path / "step-00000001")


def test_checkpoints_of_another_stage_or_encoder_are_refused(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), 1, make_state(), rank=0, world=1, keep=1)
    with pytest.raises(ValueError, match="is for stage 'base64', not 'sr256'"):
        ckpt.load_checkpoint(path, make_state(stage="sr256"), 0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="encoder enc-a, these are from enc-b"):
        ckpt.load_checkpoint(path, make_state(metadata={"encoder_id": "enc-b"}), 0, 1, torch.device("cpu"))


def test_publish_final_copies_the_weights_only(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path / "run"), 2, make_state(), rank=0, world=1, keep=1)
    final = str(tmp_path / "run" / "final")
    os.makedirs(final)
    (tmp_path / "run" / "final" / "old.safetensors").write_text("from an earlier run")
    ckpt.publish_final(final, path)
    assert sorted(os.listdir(final)) == ["config.json", "ema.safetensors", "model.safetensors"]
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == \
        (tmp_path / "run" / "step-00000002" / "model.safetensors").read_bytes()


def test_unreadable_weights_name_the_file(tmp_path):
    path = ckpt.save_checkpoint(str(tmp_path), 1, make_state(), rank=0, world=1, keep=1)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        ckpt.load_checkpoint(path, make_state(), 0, 1, torch.device("cpu"))


def test_a_checkpoint_of_other_data_is_refused_unless_allowed(tmp_path):
    """Exact resume means the same samples: another manifest hash is an error naming both."""
    trained = {"encoder_id": "enc-a", "manifest_sha256": "a" * 64}
    path = ckpt.save_checkpoint(str(tmp_path), 1, make_state(metadata=trained), rank=0, world=1, keep=1)
    refiltered = make_state(seed=1, metadata={"encoder_id": "enc-a", "manifest_sha256": "b" * 64})
    with pytest.raises(ValueError, match=f"manifest had sha256 {'a' * 64}, but .* now has sha256 {'b' * 64}"
                                         ".*--allow-data-change"):
        ckpt.load_checkpoint(path, refiltered, 0, 1, torch.device("cpu"))
    meta = ckpt.load_checkpoint(path, refiltered, 0, 1, torch.device("cpu"), allow_data_change=True)
    assert meta["step"] == 1 and meta["manifest_sha256"] == "a" * 64
    same = make_state(seed=2, metadata=trained)
    assert ckpt.load_checkpoint(path, same, 0, 1, torch.device("cpu"))["step"] == 1
