"""imagen/unet.py + config + checkpoint: shapes, conditioning, sizes, save/load without pickle."""

import json

import pytest
import torch

from imagen.checkpoint import load_model, save_weights
from imagen.config import StageConfig, UNetConfig, preset
from imagen.unet import UNet


def _inputs(cfg, b=2, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if cfg.lowres_size:
        kw = {"lowres": torch.randn(b, 3, cfg.lowres_size, cfg.lowres_size, generator=g),
              "lowres_t": torch.full((b,), 0.2)}
    return (torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g), torch.rand(b, generator=g),
            torch.randn(b, tokens, cfg.unet.text_embed_dim, generator=g),
            torch.ones(b, tokens, dtype=torch.bool)), kw


def _randomize(model):
    # zero-initialised output layers make a fresh U-Net ignore its inputs; perturb them
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("stage", ["base64", "sr256", "sr1024"])
def test_tiny_presets_output_shape(stage):
    cfg = preset("tiny", stage)
    args, kw = _inputs(cfg)
    out = UNet(cfg.unet)(*args, **kw)
    assert out.shape == (2, 3, cfg.image_size, cfg.image_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,paper_params", [("base64", 2e9), ("sr256", 600e6), ("sr1024", 400e6)])
def test_presets_match_paper_sizes_on_meta_device(name, paper_params):
    cfg = preset(name)
    with torch.device("meta"):
        model = UNet(cfg.unet)
        args, kw = _inputs(cfg, b=1)
        out = model(*(a.to("meta") for a in args), **{k: v.to("meta") for k, v in kw.items()})
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - paper_params) / paper_params < 0.15, n  # Imagen appendix F: 2B / 600M / 400M
    assert out.shape == (1, 3, cfg.image_size, cfg.image_size)


def test_text_and_aug_level_change_the_output():
    cfg = preset("tiny", "sr256")
    model = _randomize(UNet(cfg.unet))
    (x, t, text, mask), kw = _inputs(cfg)
    base = model(x, t, text, mask, **kw)
    other_aug = model(x, t, text, mask, lowres=kw["lowres"], lowres_t=torch.full((2,), 0.8))
    assert (base - other_aug).abs().max() > 1e-4  # SR stage uses the augmentation level
    dropped = model(x, t, text, torch.zeros_like(mask), **kw)
    assert (base - dropped).abs().max() > 1e-4  # an all-False mask is the unconditional branch
    assert torch.isfinite(dropped).all()


def test_padding_tokens_are_ignored():
    cfg = preset("tiny")
    model = _randomize(UNet(cfg.unet))
    (x, t, text, mask), _ = _inputs(cfg)
    mask[:, 3:] = False
    a = model(x, t, text, mask)
    text2 = text.clone()
    text2[:, 3:] = 100.0  # garbage in padded positions must not matter
    torch.testing.assert_close(a, model(x, t, text2, mask), atol=1e-5, rtol=1e-5)


def test_sr_stage_requires_lowres():
    cfg = preset("tiny", "sr256")
    (x, t, text, mask), _ = _inputs(cfg)
    with pytest.raises(ValueError, match="lowres"):
        UNet(cfg.unet)(x, t, text, mask)


def test_config_round_trip_and_validation(tmp_path):
    cfg = preset("tiny", "sr1024")
    again = StageConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="num_res_blocks"):
        UNetConfig(channel_mults=(1, 2), num_res_blocks=(1,), self_attn_levels=(0, 0), cross_attn_levels=(0, 0))
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="stage"):
        preset("sr256", "base64")


def test_checkpoint_round_trip_uses_ema_and_no_pickle(tmp_path):
    cfg = preset("tiny")
    model = _randomize(UNet(cfg.unet))
    ema = {k: v + 1.0 if v.dtype.is_floating_point else v for k, v in model.state_dict().items()}
    save_weights(str(tmp_path), model.state_dict(), cfg, ema=ema, metadata={"encoder_id": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors"]
    loaded, cfg2, meta = load_model(str(tmp_path))
    assert cfg2 == cfg and meta == {"encoder_id": "x"}
    key = next(k for k, v in ema.items() if v.dtype.is_floating_point)
    torch.testing.assert_close(loaded.state_dict()[key], ema[key])
    raw, _, _ = load_model(str(tmp_path), use_ema=False)
    torch.testing.assert_close(raw.state_dict()[key], model.state_dict()[key])
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path / "nope"))


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = preset("tiny")
    model = _randomize(UNet(cfg.unet)).train()
    args, _ = _inputs(cfg)

    def grads(ckpt):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        assert all(level.checkpointing == ckpt for level in [*model.down, model.mid, *model.up])
        model(*args).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(plain[n], checkpointed[n], atol=1e-5, rtol=1e-4)


def test_channels_last_and_bf16_autocast_match_fp32():
    cfg = preset("tiny")
    model = _randomize(UNet(cfg.unet))
    (x, t, text, mask), _ = _inputs(cfg)
    ref = model(x, t, text, mask)
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last),
                                                     t, text, mask)
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, text, mask)
    assert low.dtype == torch.bfloat16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_preset_stages_chain_into_one_cascade(name):
    cfgs = [preset("tiny", s) if name == "tiny" else preset(s) for s in ("base64", "sr256", "sr1024")]
    assert cfgs[0].lowres_size is None
    for prev, cur in zip(cfgs[:-1], cfgs[1:], strict=True):
        assert cur.lowres_size == prev.image_size, (prev.stage, cur.stage)
    assert [c.image_size for c in cfgs] == ([32, 64, 128] if name == "tiny" else [64, 256, 1024])
