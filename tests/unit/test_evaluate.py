"""imagen/cascade.py and pipeline/release/evaluate.py on untrained tiny stages (random weights: the
numbers checked are the ones that do not need a trained model: determinism, shapes, encoders
refused, references read). Logging into MLflow is tests/integration/test_evaluate.py."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from imagen.cascade import Cascade, StageOptions, to_uint8
from imagen.checkpoint import save_weights
from imagen.config import preset
from imagen.text import T5TextEncoder
from imagen.unet import UNet

SPECS = [("red", "circle"), ("red", "square"), ("blue", "circle"), ("blue", "square")]


def make_stage(root, stage, encoder_dir, encoder_id=None, seed=0) -> str:
    """A stage weights dir like training leaves in ROOT/checkpoints/<stage>/run1/final."""
    cfg = preset("tiny", stage)
    torch.manual_seed(seed)
    state = UNet(cfg.unet).state_dict()
    path = os.path.join(root, "checkpoints", stage, "run1", "final")
    save_weights(path, state, cfg, ema=state, metadata={
        "encoder_id": encoder_id or T5TextEncoder(encoder_dir).encoder_id,
        "encoder_name": encoder_dir, "step": 0})
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.dev.tinymodels import build_tiny_t5

    root = tmp_path_factory.mktemp("evalroot")
    enc = build_tiny_t5(str(root / "t5"))
    attrs = root / "attributes.json"
    attrs.write_text(json.dumps({"colors": {"red": [220, 30, 30], "blue": [40, 70, 220]},
                                 "shapes": ["circle", "square"]}))
    return {"root": str(root), "encoder": enc, "attributes": str(attrs),
            "base": make_stage(str(root), "base64", enc), "sr": make_stage(str(root), "sr256", enc, seed=1)}


def test_cascade_run_is_deterministic_and_keeps_every_stage(setup):
    cascade = Cascade.from_dirs([setup["base"], setup["sr"]], encoder=T5TextEncoder(setup["encoder"]))
    prompts = ["a red circle", "a blue square"]
    opts = [StageOptions(steps=2), StageOptions(steps=2)]
    out = cascade.run(prompts, seed=3, options=opts)
    assert out.images.shape == (2, 64, 64, 3) and out.images.dtype == np.uint8
    assert [tuple(x.shape) for x in out.stage_images] == [(2, 3, 32, 32), (2, 3, 64, 64)]
    assert len(out.seconds) == 2 and all(s > 0 for s in out.seconds)
    np.testing.assert_array_equal(cascade.generate(prompts, seed=3, options=opts), out.images)
    # the base stage draws its noise first from the seeded generator, so stopping after it
    # gives exactly the cascade's intermediate image
    base_only = cascade.generate(prompts, seed=3, options=opts, num_stages=1)
    np.testing.assert_array_equal(base_only, to_uint8(out.stage_images[0]))
    assert not np.array_equal(cascade.generate(prompts, seed=4, options=opts), out.images)
    with pytest.raises(ValueError, match="num_stages must be between 1 and 2"):
        cascade.run(prompts, num_stages=3)


def test_sr_first_cascade_upsamples_given_images(setup):
    cascade = Cascade.from_dirs([setup["sr"]], encoder=T5TextEncoder(setup["encoder"]))
    with pytest.raises(ValueError, match="needs low-res input"):
        cascade.generate(["a red circle"])
    low = torch.zeros(1, 3, 32, 32)
    assert cascade.generate(["a red circle"], options=[StageOptions(steps=1)], lowres=low).shape == (1, 64, 64, 3)


def test_other_encoder_is_refused(setup, tmp_path):
    from pipeline.dev.tinymodels import build_tiny_t5

    other = build_tiny_t5(str(tmp_path / "t5-other"), seed=1)
    with pytest.raises(ValueError, match="trained on text encoder t5@sha256:.*but the encoder given is t5-other@"):
        Cascade.from_dirs([setup["base"]], encoder=T5TextEncoder(other))
    sr_other = make_stage(str(tmp_path), "sr256", other)
    with pytest.raises(ValueError, match="stage sr256 was trained on text encoder t5-other@"):
        Cascade.from_dirs([setup["base"], sr_other])
    from pipeline.release.evaluate import evaluate

    with pytest.raises(ValueError, match="train every stage on the same encoder"):
        evaluate([setup["base"], sr_other], attributes=setup["attributes"])


def test_load_references_reads_images_and_captions(tmp_path):
    from pipeline.release.eval_data import load_references

    for i, color in enumerate(("red", "green", "blue")):
        Image.new("RGB", (40 + 8 * i, 40), color).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a {color} square\n")
    images, captions = load_references(str(tmp_path), limit=2)
    assert images.shape == (2, 40, 40, 3)
    assert captions == ["a red square", "a green square"]
    assert tuple(images[1, 20, 20]) == (0, 128, 0)  # PIL's "green"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_references(str(empty), limit=2)


def test_load_references_reads_webdataset_shards(tmp_path):
    import io

    import webdataset

    from pipeline.release.eval_data import load_references

    with webdataset.TarWriter(str(tmp_path / "000000.tar")) as sink:
        for i, color in enumerate(("red", "blue", "yellow")):
            buf = io.BytesIO()
            Image.new("RGB", (48, 64), color).save(buf, "PNG")
            sink.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": f"a {color} square"})
    images, captions = load_references(str(tmp_path), limit=2)
    assert images.shape == (2, 48, 48, 3)  # center-cropped squares
    assert captions == ["a red square", "a blue square"]
    assert tuple(images[0, 0, 0]) == (255, 0, 0) and tuple(images[1, 0, 0]) == (0, 0, 255)
