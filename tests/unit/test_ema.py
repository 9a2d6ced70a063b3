"""imagen/ema.py: the EMA warm-up (ema-pytorch's power-law schedule) and update_every."""

import pytest
import torch
from torch import nn

from imagen.config import preset
from imagen.ema import EMA, EMAConfig


def test_decay_warms_up_as_a_power_law_and_is_capped():
    ema = EMA(nn.Linear(2, 2), EMAConfig(max_decay=0.9999, update_after_step=100, power=2 / 3))
    assert ema.decay_at(0) == ema.decay_at(101) == 0.0  # a copy until the warm-up ends
    assert ema.decay_at(102) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.decay_at(1101) == pytest.approx(1 - 1001 ** (-2 / 3))  # ~0.99 after 1k steps
    assert 0.989 < ema.decay_at(1101) < 0.991
    assert ema.decay_at(10**9) == 0.9999
    decays = [ema.decay_at(s) for s in range(102, 20000, 97)]
    assert decays == sorted(decays)


def test_the_shadow_holds_little_of_the_initial_weights():
    """A fixed 0.9999 from step 0 keeps 61% of the initial weights at 5k steps; the warm-up does not."""
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, EMAConfig(max_decay=0.9999))
    with torch.no_grad():
        model.weight.fill_(0.0)
        ema.shadow["weight"].fill_(1.0)  # stands for the random initial weights
        for step in range(1, 5001):
            ema.update(model, step)
    assert ema.shadow["weight"].item() < 0.05
    assert 0.9999**5000 > 0.6


def test_update_every_skips_steps_but_keeps_the_horizon():
    def run(every):
        model = nn.Linear(1, 1, bias=False)
        ema = EMA(model, EMAConfig(max_decay=0.99, update_after_step=0, update_every=every, power=1.0))
        with torch.no_grad():
            ema.shadow["weight"].fill_(1.0)
            model.weight.fill_(0.0)
            used = [ema.update(model, s) for s in range(1, 401)]
        return ema.shadow["weight"].item(), used

    every_step, _ = run(1)
    every_ten, used = run(10)
    assert sum(u is not None for u in used) == 40
    assert every_ten == pytest.approx(every_step, abs=0.02)


def test_the_stage_config_carries_the_schedule():
    cfg = preset("sr256")
    assert cfg.ema() == EMAConfig(max_decay=cfg.train.ema_decay, update_after_step=100, update_every=10)
    assert type(cfg).from_dict(cfg.to_dict()).ema() == cfg.ema()


def test_shadow_round_trips_and_copies_into_a_model():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, EMAConfig(max_decay=0.5, update_after_step=0, update_every=1, power=1.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model, 5)
    assert ema.shadow["1.num_batches_tracked"].item() == 7  # integer buffers are copied, not averaged
    other = EMA(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    other.load_state_dict(ema.state_dict())
    for k, v in ema.state_dict().items():
        assert torch.equal(other.shadow[k], v) and other.shadow[k] is not v
    target = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    other.copy_to(target)
    for k, v in target.state_dict().items():
        assert v.dtype == model.state_dict()[k].dtype
        torch.testing.assert_close(v.float(), ema.shadow[k])
    with pytest.raises(ValueError, match="EMA state does not match the model"):
        EMA(nn.Linear(2, 2)).load_state_dict(ema.state_dict())
