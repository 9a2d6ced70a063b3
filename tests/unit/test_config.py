"""imagen.config: the one stage spec (sizes, crop, minimum native side) and the chain rule."""

import pytest

from imagen.config import (
    PAPER_PRESETS,
    STAGES,
    StageSpec,
    check_chain,
    preset,
    resolve_presets,
    stage_preset,
    stage_specs,
)


def test_paper_stage_specs():
    """Imagen appendix F: 64 base; 64 -> 256 on whole 256 images; 256 -> 1024 on 256 px crops
    with 64 px inputs, sampled at 1024."""
    specs = stage_specs({})
    assert [(s.image_size, s.lowres_size, s.crop_size, s.lowres_crop_size, s.min_native_side)
            for s in specs.values()] == [(64, None, 64, None, 64), (256, 64, 256, 64, 256),
                                         (1024, 256, 256, 64, 1024)]
    assert [s.random_crop for s in specs.values()] == [False, True, True]
    check_chain(list(specs.values()))


def test_tiny_stage_specs_chain_like_the_paper():
    specs = stage_specs({s: "tiny" for s in STAGES})
    assert [(s.image_size, s.crop_size, s.lowres_crop_size) for s in specs.values()] == [
        (32, 32, None), (64, 64, 32), (128, 64, 32)]
    check_chain(list(specs.values()))
    assert list(stage_specs({s: "tiny" for s in STAGES}, ["sr1024", "base64"])) == ["base64", "sr1024"]


def test_chain_rule_says_what_to_fix():
    base, sr = preset("tiny", "base64").spec, preset("sr256").spec
    assert sr.chain_error(base) == ("stage sr256 expects 64px input but base64 makes 32px images: "
                                    "pick presets whose sizes chain")
    with pytest.raises(ValueError, match="expects 64px input"):
        check_chain([base, sr])
    assert sr.chain_error(preset("base64").spec) is None


def test_config_round_trips_its_crop_and_checks_it():
    cfg = preset("sr1024")
    assert type(cfg).from_dict(cfg.to_dict()).spec == cfg.spec == StageSpec("sr1024", 1024, 256, 256)
    with pytest.raises(ValueError, match="crop_size 48"):
        cfg.replace(crop_size=48)  # not a multiple of the U-Net's downsampling
    with pytest.raises(ValueError, match="crop_size 2048"):
        cfg.replace(crop_size=2048)
    with pytest.raises(ValueError, match="unknown stage"):
        stage_specs({}, ["sr512"])


def test_one_preset_rule_gives_the_paper_preset_by_default():
    assert resolve_presets() == resolve_presets({}) == resolve_presets(None) == PAPER_PRESETS
    assert resolve_presets("tiny") == dict.fromkeys(STAGES, "tiny")
    assert resolve_presets({"sr256": "tiny", "sr1024": None}, ["sr1024", "sr256"]) == {
        "sr256": "tiny", "sr1024": "sr1024"}  # cascade order; None or "" is the paper preset
    assert stage_preset({"base64": ""}, "base64") == "base64"
    assert stage_preset("tiny", "sr1024") == "tiny"
    with pytest.raises(ValueError, match="preset 'base64' is for stage 'base64', not 'sr256'"):
        resolve_presets({"sr256": "base64"})
    with pytest.raises(ValueError, match="preset 'huge' for base64"):
        stage_preset("huge", "base64")
    with pytest.raises(ValueError, match="unknown stage"):
        resolve_presets({"sr512": "tiny"})
