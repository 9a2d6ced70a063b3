"""pipeline/release/sweep.py and imagen/checkpoint.py's sampling.json: an SR stage's guidance
weight and noise-augmentation level chosen on held-out images, stored with the stage, applied on
every load (issue 26, item 1)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from imagen.checkpoint import SAMPLING_NAME, load_config, load_model, save_sampling, save_weights
from imagen.config import preset
from imagen.unet import UNet
from pipeline.release import sweep


def test_paper_sr_presets_sample_guided_on_a_noised_input_and_train_over_the_whole_range():
    for stage in ("sr256", "sr1024"):
        d = preset(stage).diffusion
        assert (d.guidance_scale, d.lowres_aug_sample, d.lowres_aug_max) == (4.0, 0.25, 1.0)


def test_the_grid_stays_in_the_trained_range_and_holds_the_anchor():
    tiny = preset("tiny", "sr256")  # trained on levels up to 0.1
    assert sweep.grid(tiny) == [(a, w) for a in (0.0, 0.05, 0.1) for w in (1.0, 2.0, 4.0)]
    paper = sweep.grid(preset("sr256"))
    assert (0.25, 4.0) in paper and len(paper) == 12  # 4 levels x 3 weights, the anchor among them
    odd = preset("tiny", "sr256")
    odd.diffusion.guidance_scale, odd.diffusion.lowres_aug_sample = 3.0, 0.07
    assert (0.07, 3.0) in sweep.grid(odd) and len(sweep.grid(odd)) == 16
    assert sweep.metric_name(0.05, 2.0) == "psnr_aug0.05_w2.0"


def tiny_sr():
    torch.manual_seed(0)
    cfg = preset("tiny", "sr256")
    return UNet(cfg.unet).eval(), cfg


def test_sweep_samples_every_pair_from_the_same_noise_and_keeps_the_best(monkeypatch):
    model, cfg = tiny_sr()
    b, text = 3, torch.randn(3, 4, cfg.unet.text_embed_dim)
    mask = torch.ones(3, 4, dtype=torch.bool)
    low = torch.rand(b, 3, 32, 32) * 2 - 1
    target = np.random.default_rng(0).integers(0, 256, (b, 64, 64, 3), dtype=np.uint8)
    calls = []
    import imagen.cascade as cascade

    real = cascade.run_stage

    def spy(model, cfg, opt, text, mask, lowres, gen, progress=None):
        calls.append((opt.lowres_aug, opt.guidance_scale, gen.initial_seed()))
        return real(model, cfg, opt, text, mask, lowres, gen, progress)

    monkeypatch.setattr(cascade, "run_stage", spy)
    found = sweep.sweep_sr(model, cfg, low, target, text, mask, seed=7, steps=2)
    assert [(a, w) for a, w, _ in calls] == sweep.grid(cfg)
    assert {s for *_, s in calls} == {7}  # every pair starts from the same noise
    best = max(found.table, key=lambda r: (r["psnr"], r["ssim"]))
    assert found.values == {"guidance_scale": best["guidance_scale"], "lowres_aug_sample": best["lowres_aug"]}
    # the images kept are the chosen pair's: sampled again here, they are the same
    gen = torch.Generator().manual_seed(7)
    again = cascade.to_uint8(real(model, cfg, cascade.StageOptions(steps=2, guidance_scale=best["guidance_scale"],
                                                                   lowres_aug=best["lowres_aug"]),
                                  text, mask, low, gen))
    np.testing.assert_array_equal(found.images, again)
    assert found.record("validation", b, 7)["table"] == found.table


def test_a_tie_goes_to_the_anchor_then_to_the_lower_weight(monkeypatch):
    model, cfg = tiny_sr()
    cfg.diffusion.guidance_scale = 2.0
    monkeypatch.setattr("pipeline.release.metrics.psnr_ssim", lambda images, target: {"psnr": 20.0, "ssim": 0.5})
    args = (model, cfg, torch.zeros(1, 3, 32, 32), np.zeros((1, 64, 64, 3), np.uint8),
            torch.zeros(1, 2, cfg.unet.text_embed_dim), torch.ones(1, 2, dtype=torch.bool))
    assert sweep.sweep_sr(*args, steps=1).values == {"guidance_scale": 2.0, "lowres_aug_sample": 0.0}
    cfg.diffusion.lowres_aug_sample = 0.3  # an anchor off the grid is swept too, and wins the tie
    assert sweep.sweep_sr(*args, steps=1).values == {"guidance_scale": 2.0, "lowres_aug_sample": 0.3}


def test_sampling_json_overrides_the_configs_sampling_defaults_on_load(tmp_path):
    model, cfg = tiny_sr()
    d = str(tmp_path / "final")
    save_weights(d, model.state_dict(), cfg, metadata={"encoder_id": "x"})
    before = Path(d, "config.json").read_text()
    save_sampling(d, {"guidance_scale": 2.0, "lowres_aug_sample": 0.05}, {"metric": "psnr", "table": [{"a": 1}]})
    assert Path(d, "config.json").read_text() == before  # training's config.json as written
    loaded, meta = load_config(d)
    assert (loaded.diffusion.guidance_scale, loaded.diffusion.lowres_aug_sample) == (2.0, 0.05)
    assert loaded.diffusion.lowres_aug_max == cfg.diffusion.lowres_aug_max  # what it learned: unchanged
    assert meta["encoder_id"] == "x" and meta["sampling"]["metric"] == "psnr"
    assert meta["sampling"]["guidance_scale"] == 2.0
    assert load_model(d)[1].diffusion.guidance_scale == 2.0  # the cascade's way in
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


@pytest.mark.parametrize("doc,error", [
    ("{not json", "is not readable JSON"),
    ('{"diffusion": {"lowres_aug_max": 0.9}}', "may only set sampler, sample_steps, guidance_scale"),
    ('{"diffusion": [1]}', 'must be an object with a "diffusion" object'),
    ('{"diffusion": {"guidance_scale": "high"}}', "guidance_scale"),
    ('{"diffusion": {"guidance_scale": NaN}}', "finite"),
])
def test_a_bad_sampling_json_is_one_error_naming_the_file(tmp_path, doc, error):
    model, cfg = tiny_sr()
    d = str(tmp_path / "final")
    save_weights(d, model.state_dict(), cfg)
    with open(os.path.join(d, SAMPLING_NAME), "w") as f:
        f.write(doc)
    with pytest.raises(ValueError, match=error):
        load_config(d)


def test_save_sampling_refuses_what_the_stage_learned(tmp_path):
    with pytest.raises(ValueError, match="not lowres_aug_max"):
        save_sampling(str(tmp_path), {"lowres_aug_max": 0.5})
    assert not os.listdir(tmp_path)


def test_resume_checks_ignore_a_chosen_sampling(tmp_path):
    from pipeline.train.checkpointing import check_compatible

    model, cfg = tiny_sr()
    d = str(tmp_path / "final")
    save_weights(d, model.state_dict(), cfg)
    save_sampling(d, {"guidance_scale": 2.0})
    check_compatible(d, cfg, {})  # sampling chosen since training: still the same model
    learned = preset("tiny", "sr256")
    learned.diffusion.lowres_aug_max = 0.5
    with pytest.raises(ValueError, match="another model config"):
        check_compatible(d, learned, {})
    json.loads(Path(d, SAMPLING_NAME).read_text())  # whole JSON on disk
