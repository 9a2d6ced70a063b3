"""imagen/sampling.py: thresholding, guidance, and an analytic-oracle test of both samplers."""

import pytest
import torch

from imagen.config import DiffusionConfig
from imagen.diffusion import GaussianDiffusion
from imagen.sampling import dynamic_threshold, guided_output, sample


def test_dynamic_threshold_clips_as_specified():
    x = torch.linspace(-3, 3, 1001).view(1, 1, 1, 1001)
    out = dynamic_threshold(x, 0.995)
    s = torch.quantile(x.abs().flatten(), 0.995).item()  # about 2.985
    assert out.abs().max().item() == pytest.approx(1.0)
    torch.testing.assert_close(out, x.clamp(-s, s) / s)
    inside = torch.tensor([[-0.5, 0.2, 0.9]]).view(1, 1, 1, 3)
    torch.testing.assert_close(dynamic_threshold(inside, 0.995), inside)  # s floors at 1
    torch.testing.assert_close(dynamic_threshold(x, None), x.clamp(-1, 1))


def test_guidance_weight_one_is_conditional_and_formula_holds():
    def model(x, t, text, mask, **_):
        return x + mask.float().sum(dim=1).view(-1, 1, 1, 1)  # cond: +3, uncond: +0

    x = torch.zeros(2, 1, 2, 2)
    text = torch.zeros(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    t = torch.full((2,), 0.5)
    torch.testing.assert_close(guided_output(model, x, t, text, mask, 1.0), model(x, t, text, mask))
    # uncond + w (cond - uncond) = 0 + 4 * 3
    torch.testing.assert_close(guided_output(model, x, t, text, mask, 4.0), torch.full_like(x, 12.0))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_oracle_denoiser_reproduces_gaussian_data(sampler, prediction):
    """Data x0 ~ N(mu, s^2) per pixel: E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sig^2) (x_t - a mu).
    Driven by that exact denoiser, both samplers must reproduce mu and s, with an error that
    shrinks as steps grow (ancestral sampling with E[x0|x_t] under-disperses by O(1/steps))."""
    mu, s = 0.3, 0.2
    d = GaussianDiffusion(DiffusionConfig(schedule="cosine", prediction=prediction))

    def oracle(x_t, t, text, mask, **_):
        a, sig = (v.view(-1, 1, 1, 1) for v in d.alpha_sigma(t))
        x0 = mu + a * s**2 / (a**2 * s**2 + sig**2) * (x_t - a * mu)
        eps = (x_t - a * x0) / sig
        return eps if prediction == "eps" else a * eps - sig * x0

    n = 4000

    def draw(steps):
        return sample(oracle, d, torch.zeros(n, 1, 4), torch.ones(n, 1, dtype=torch.bool), (n, 1, 2, 2),
                      steps=steps, sampler=sampler, threshold=None,
                      generator=torch.Generator().manual_seed(0))

    coarse, fine = draw(50), draw(500)
    assert fine.mean().item() == pytest.approx(mu, abs=0.01)
    assert fine.std().item() == pytest.approx(s, rel=0.03)
    assert abs(fine.std().item() - s) < abs(coarse.std().item() - s)


def test_sampler_is_reproducible_and_validates():
    d = GaussianDiffusion(DiffusionConfig())

    def model(x, t, text, mask, **_):
        return 0.1 * x

    args = (model, d, torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool), (2, 3, 4, 4))
    a = sample(*args, steps=5, generator=torch.Generator().manual_seed(3))
    b = sample(*args, steps=5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="sampler"):
        sample(*args, steps=5, sampler="euler")


@pytest.mark.parametrize("level", [0.0, 0.3])
def test_sr_stage_sees_its_lowres_noised_at_the_level_it_is_told(level):
    """Noise-conditioning augmentation at sampling (Imagen sec. 2.5): the U-Net gets the low-res
    image noised to ``level`` and that level as ``lowres_t`` (the trainer's grid uses this too)."""
    from imagen.cascade import StageOptions, run_stage
    from imagen.config import preset

    cfg = preset("tiny", "sr256")
    seen = []

    def model(x, t, text, mask, lowres, lowres_t):
        seen.append((lowres.clone(), lowres_t.clone()))
        return torch.zeros_like(x)

    clean = torch.rand(2, 3, 32, 32) * 2 - 1
    text, mask = torch.zeros(2, 3, 32), torch.ones(2, 3, dtype=torch.bool)
    out = run_stage(model, cfg, StageOptions(steps=2, lowres_aug=level), text, mask, clean,
                    torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 64, 64) and seen
    got, got_t = seen[0]
    assert torch.equal(got_t, torch.full((2,), level))
    d = GaussianDiffusion(cfg.diffusion)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    want = d.q_sample(clean, torch.full((2,), level), noise) if level else clean
    torch.testing.assert_close(got, want)
    assert all(torch.equal(a, got) for a, _ in seen)  # the same noised input at every step
