"""imagen/diffusion.py: schedule golden values, q_sample statistics, target conversions."""

import math

import pytest
import torch

from imagen.config import DiffusionConfig
from imagen.diffusion import GaussianDiffusion, cosine_logsnr, linear_logsnr


def test_cosine_logsnr_golden_values():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    got = cosine_logsnr(t)
    # -2 log tan(pi t / 2), clipped to [-20, 20] at the ends
    assert got[0].item() == pytest.approx(20.0, abs=1e-6)
    assert got[-1].item() == pytest.approx(-20.0, abs=1e-6)
    assert got[2].item() == pytest.approx(0.0, abs=1e-3)
    assert got[1].item() == pytest.approx(-2 * math.log(math.tan(math.pi / 8)), abs=1e-3)  # 1.7627
    assert got[3].item() == pytest.approx(-2 * math.log(math.tan(3 * math.pi / 8)), abs=1e-3)


def test_linear_logsnr_golden_values():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    got = linear_logsnr(t).tolist()
    assert got[0] == pytest.approx(-math.log(math.expm1(1e-4)), rel=1e-9)  # 9.2103
    assert got[1] == pytest.approx(-math.log(math.expm1(2.5001)), rel=1e-9)  # -2.4142
    assert got[2] == pytest.approx(-math.log(math.expm1(10.0001)), rel=1e-9)  # -10.0001


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_monotone_and_variance_preserving(schedule):
    d = GaussianDiffusion(DiffusionConfig(schedule=schedule))
    t = torch.linspace(0, 1, 101)
    lam = d.logsnr(t)
    assert (lam[1:] < lam[:-1]).all()
    a, s = d.alpha_sigma(t)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))


def test_q_sample_statistics():
    d = GaussianDiffusion(DiffusionConfig(schedule="cosine"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 0.3)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    a, s = d.alpha_sigma(t[:1])
    assert xt.mean().item() == pytest.approx(0.7 * a.item(), abs=0.01)
    assert xt.std().item() == pytest.approx(s.item(), rel=0.02)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_x0_eps_v_round_trip(prediction):
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.rand(8, generator=g).clamp(0.05, 0.95)
    xt = d.q_sample(x0, t, eps)
    target = d.target(x0, eps, t)
    torch.testing.assert_close(d.predict_x0(xt, t, target), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.predict_eps(xt, t, target), eps, atol=1e-4, rtol=1e-4)


def test_min_snr_weighting():
    t = torch.tensor([0.05, 0.5, 0.95])
    x0 = torch.zeros(3, 1, 2, 2)
    noise = torch.ones(3, 1, 2, 2)
    for pred in ("eps", "v"):
        plain = GaussianDiffusion(DiffusionConfig(prediction=pred, min_snr_gamma=None))
        weighted = GaussianDiffusion(DiffusionConfig(prediction=pred, min_snr_gamma=5.0))
        out = torch.zeros_like(x0)
        snr = plain.logsnr(t).exp()
        expected = torch.minimum(snr, torch.tensor(5.0)) / (snr if pred == "eps" else snr + 1)
        torch.testing.assert_close(weighted.loss(out, x0, noise, t) / plain.loss(out, x0, noise, t), expected)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion(DiffusionConfig(schedule="quadratic"))
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(DiffusionConfig(prediction="x0"))
