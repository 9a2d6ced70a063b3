"""pipeline/train/validation.py: the validation loss is a function of the weights and the
samples alone (not of batching, ranks or order), reads the device once, and scores what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagen.config import tiny
from imagen.unet import UNet
from pipeline.data.batch import collate
from pipeline.train.validation import (
    VAL_TIMESTEPS,
    eval_net,
    fixed_noise,
    metric_name,
    timestep_grid,
    validation_loss,
)

CPU = torch.device("cpu")


def samples(stage: str, n: int = 7, seed: int = 0) -> list[dict]:
    cfg = tiny(stage)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = {"key": f"{i:09d}", "image": rng.integers(0, 256, (cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
             "text_embeds": rng.standard_normal((1 + i % 4, cfg.unet.text_embed_dim)).astype(np.float16)}
        if cfg.lowres_size:
            s["lowres"] = rng.integers(0, 256, (cfg.lowres_size, cfg.lowres_size, 3), dtype=np.uint8)
        out.append(s)
    return out


def batches(items: list[dict], size: int) -> list[dict]:
    return [collate(items[i:i + size], pad_text_to=8) for i in range(0, len(items), size)]


def model(stage: str, seed: int = 0) -> UNet:
    """A tiny U-Net with every weight perturbed (its output layer starts at zero: any seed
    would predict the same zeros)."""
    torch.manual_seed(seed)
    net = UNet(tiny(stage).unet).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_grid_is_the_centres_of_equal_bins():
    grid = timestep_grid()
    assert len(grid) == VAL_TIMESTEPS == 8
    assert grid[0] == pytest.approx(1 / 16) and grid[-1] == pytest.approx(15 / 16)
    assert np.allclose(np.diff(grid), 1 / 8)


def test_fixed_noise_depends_on_the_key_and_stream_only():
    a = fixed_noise(["k1", "k2"], (2, 3, 4, 4), "t0", CPU)
    b = fixed_noise(["k2"], (1, 3, 4, 4), "t0", CPU)
    assert torch.equal(a[1], b[0])  # the same key gets the same noise in any batch
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(fixed_noise(["k1"], (1, 3, 4, 4), "t1", CPU)[0], a[0])


@pytest.mark.parametrize("stage", ["base64", "sr256"])
def test_same_figure_for_any_batching_and_any_split_across_ranks(stage):
    cfg, net, items = tiny(stage), model(stage), samples(stage, n=5)
    whole = validation_loss(net, cfg, batches(items, 5), CPU)
    assert whole["val/samples"] == 5
    assert set(whole) == {"val/loss", "val/samples", *(metric_name(t) for t in timestep_grid())}
    assert whole["val/loss"] == pytest.approx(np.mean([whole[metric_name(t)] for t in timestep_grid()]))
    for size in (2,):
        again = validation_loss(net, cfg, batches(items, size), CPU)
        for k, v in whole.items():
            assert again[k] == pytest.approx(v, rel=1e-5), (size, k)
    # what two ranks would each sum (make_validation_loader deals sample i to rank i % world),
    # combined as the all-reduce combines them: sums, then one division
    parts = [validation_loss(net, cfg, batches(items[r::2], 2), CPU) for r in range(2)]
    combined = sum(p["val/loss"] * p["val/samples"] for p in parts) / 5
    assert combined == pytest.approx(whole["val/loss"], rel=1e-5)


def test_it_measures_the_weights():
    """Different weights give a different figure; an empty split gives none."""
    cfg, items = tiny("base64"), samples("base64")
    a = validation_loss(model("base64", 0), cfg, batches(items, 4), CPU)["val/loss"]
    b = validation_loss(model("base64", 1), cfg, batches(items, 4), CPU)["val/loss"]
    assert a != b and np.isfinite(a) and a > 0
    assert validation_loss(model("base64"), cfg, [], CPU) == {}


def test_the_noise_level_terms_are_what_the_training_loss_gives_there():
    """Each level's term is the diffusion loss at that t with that noise: checked by hand."""
    from imagen.diffusion import GaussianDiffusion
    from pipeline.data.batch import to_device

    cfg, net, items = tiny("base64"), model("base64"), samples("base64", n=3)
    got = validation_loss(net, cfg, batches(items, 3), CPU)
    b = to_device(batches(items, 3)[0], CPU)
    diffusion, t = GaussianDiffusion(cfg.diffusion), timestep_grid()[2]
    noise = fixed_noise(b["keys"], tuple(b["image"].shape), "t2", CPU)
    tt = torch.full((3,), t)
    with torch.no_grad():
        out = net(diffusion.q_sample(b["image"], tt, noise), tt, b["text_embeds"], b["text_mask"])
    assert got[metric_name(t)] == pytest.approx(diffusion.loss(out, b["image"], noise, tt).mean().item(), rel=1e-5)


def test_one_host_read(monkeypatch):
    """The loop keeps its sums on the device: one ``tolist`` at the end (STYLE #14)."""
    cfg, net, ready = tiny("sr256"), model("sr256"), batches(samples("sr256"), 3)
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    validation_loss(net, cfg, ready, CPU)
    assert reads == ["tolist"]


def test_eval_net_holds_the_given_weights_without_touching_them():
    cfg, net = tiny("base64"), model("base64", 3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    copy = eval_net(cfg, state, CPU)
    assert not copy.training
    for k, v in copy.state_dict().items():
        assert torch.equal(v, state[k]) and v.data_ptr() != state[k].data_ptr()
    items = batches(samples("base64", n=2), 2)
    assert validation_loss(copy, cfg, items, CPU) == validation_loss(net, cfg, items, CPU)
