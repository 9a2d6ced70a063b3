"""imagen/sampling.py: thresholding, guidance, the text encoded once per call, and run_stage's
precision (fp32 / bf16 autocast, TF32 restored). The samplers themselves, with the analytic
Gaussian oracle, are in test_samplers.py."""

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


def _tiny_unet(stage="base64"):
    from imagen.config import preset
    from imagen.unet import UNet

    cfg = preset("tiny", stage)
    torch.manual_seed(0)
    model = UNet(cfg.unet).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # zero-initialised output layers: perturb them
    text = torch.randn(2, cfg.max_text_len, cfg.unet.text_embed_dim, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, cfg.max_text_len, dtype=torch.bool)
    mask[0, :5], mask[1, :12] = True, True
    return model, cfg, text, mask


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_text_is_projected_once_per_sampling_call(guidance_scale):
    """The U-Net's text-only work (norm, pooling, every cross-attention k/v projection) runs
    once for the whole call, on the guided [cond; uncond] batch, not once per step; the
    samples are those of the per-step path (the same model as a plain callable)."""
    model, cfg, text, mask = _tiny_unet()
    d = GaussianDiffusion(cfg.diffusion)
    kv = model.mid.attn.cross_attn.kv
    calls = []
    hook = kv.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))

    def draw(net):
        return sample(net, d, text, mask, (2, 3, 32, 32), steps=6, guidance_scale=guidance_scale,
                      generator=torch.Generator().manual_seed(0))

    fast = draw(model)
    batch = 2 if guidance_scale == 1.0 else 4  # guided: cond and uncond halves in one batch
    assert calls == [batch]
    calls.clear()
    per_step = draw(lambda *a, **kw: model(*a, **kw))  # no encode_text: the text every step
    hook.remove()
    assert calls == [batch] * 6
    torch.testing.assert_close(fast, per_step, atol=1e-5, rtol=0)
    assert fast.std() > 0.1  # a real image, not a constant


def _run_with_precision(precision, stage="base64"):
    from imagen.cascade import StageOptions, run_stage

    model, cfg, text, mask = _tiny_unet(stage)
    dtypes = []
    hook = model.out[-1].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    lowres = torch.rand(2, 3, 32, 32) * 2 - 1 if cfg.lowres_size else None
    out = run_stage(model, cfg, StageOptions(steps=4, precision=precision), text, mask, lowres,
                    torch.Generator().manual_seed(0))
    hook.remove()
    return out, set(dtypes)


@pytest.mark.parametrize("stage", ["base64", "sr256"])
def test_precision_auto_on_cpu_is_fp32_and_bf16_stays_close(stage):
    fp32, fp32_dtypes = _run_with_precision("fp32", stage)
    auto, auto_dtypes = _run_with_precision("auto", stage)
    bf16, bf16_dtypes = _run_with_precision("bf16", stage)
    assert fp32_dtypes == auto_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert torch.equal(auto, fp32)  # auto on CPU: no autocast at all
    assert bf16.dtype == torch.float32  # the sampler's own math stays fp32
    err = (bf16 - fp32).abs().mean()
    assert 0 < err < 0.02, err  # bf16 keeps ~3 significant digits; images span [-1, 1]


def test_unknown_precision_and_tf32_setting_restored():
    from imagen.cascade import autocast_dtype, tf32_allowed

    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        _run_with_precision("fp16")
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("auto", torch.device("cpu")) is None
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    with tf32_allowed(True):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with pytest.raises(RuntimeError), tf32_allowed(True):
        raise RuntimeError("a failing stage")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
