"""pipeline/release/metrics.py: the alignment checker on images rendered by the tiny dataset's own
drawing code, PSNR/SSIM, FID over a TorchScript extractor and the CLIP score, each against
an independent computation."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.dev.tinydata import BACKGROUNDS, COLORS, SHAPES, draw_shape
from pipeline.release import metrics


def rendered(color, shape, background, size, rng):
    """One image as the dataset makes it: 96 px source with its box sizes, resized to ``size``."""
    side = rng.randint(96 * 2 // 5, 96 * 3 // 4)
    x0, y0 = rng.randint(0, 96 - side - 1), rng.randint(0, 96 - side - 1)
    img = draw_shape((96, 96), color, shape, background, (x0, y0, x0 + side, y0 + side))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("size", [32, 64])
def test_checker_reads_every_colour_shape_and_background(size):
    rng = random.Random(size)
    combos = [(c, s, b) for c in COLORS for s in SHAPES for b in BACKGROUNDS]
    for c, s, b in combos:
        for _ in range(3):  # three random boxes each: 216 images, edge-touching boxes included
            img = rendered(c, s, b, size, rng)
            assert metrics.dominant_color(img, COLORS) == c, (c, s, b)
            assert metrics.classify_shape(img) == s, (c, s, b)


def test_alignment_counts_colour_and_shape_separately():
    rng = random.Random(0)
    truth = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    images = np.stack([rendered(c, s, "white", 32, rng) for c, s in truth])
    prompted = [("red", "circle"), ("blue", "circle"), ("pink", "triangle"), ("cyan", "square")]
    # colour right: red, blue; shape right: circle, triangle; both: only the first
    assert metrics.alignment(images, prompted, COLORS) == {"color": 0.5, "shape": 0.5, "both": 0.25}
    assert metrics.alignment(images, truth, COLORS) == {"color": 1.0, "shape": 1.0, "both": 1.0}


def test_paired_gain_is_an_exact_one_sided_mcnemar_test():
    a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 0], bool)
    b = np.array([0, 0, 0, 0, 0, 1, 1, 0, 1, 0], bool)
    r = metrics.paired_gain(a, b)
    # discordant pairs: A right alone 5 times, B right alone once; P(X >= 5 | n=6, 1/2) = 7/64
    assert (r["wins"], r["losses"]) == (5, 1)
    assert r["gain"] == pytest.approx(0.4)
    assert r["p_value"] == pytest.approx(7 / 64)
    assert metrics.paired_gain(b, a)["p_value"] == pytest.approx(63 / 64)  # one-sided: B is not better
    assert metrics.paired_gain(a, a)["p_value"] == 1.0  # no discordant pair: no evidence
    with pytest.raises(ValueError, match="equal"):
        metrics.paired_gain(a, b[:5])


def test_blank_or_speckled_image_has_no_colour_or_shape():
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert metrics.dominant_color(blank, COLORS) is None
    assert metrics.classify_shape(blank) is None
    blank[5, 5] = (220, 30, 30)  # one pixel is under MIN_FOREGROUND (1 %) of 1024
    assert metrics.dominant_color(blank, COLORS) is None


def test_render_references_match_their_specs():
    specs = [(c, s) for c in ("red", "purple") for s in SHAPES]
    refs = metrics.render_references(specs, 48, seed=3)
    assert refs.shape == (6, 48, 48, 3) and refs.dtype == np.uint8
    assert metrics.alignment(refs, specs, COLORS)["both"] == 1.0
    np.testing.assert_array_equal(refs, metrics.render_references(specs, 48, seed=3))


def test_psnr_ssim_against_closed_form():
    rng = np.random.default_rng(0)
    target = rng.integers(20, 230, (3, 32, 32, 3)).astype(np.uint8)
    shifted = target + 10  # every pixel off by 10 levels: MSE = (10/255)^2
    m = metrics.psnr_ssim(shifted, target)
    assert m["psnr"] == pytest.approx(20 * np.log10(255 / 10), abs=1e-3)
    assert m["ssim"] < 1.0
    same = metrics.psnr_ssim(target, target)
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        metrics.psnr_ssim(target[:, :16], target)


class _MeanColour(torch.nn.Module):
    """Features = per-channel means and stds; logits (the default output) are something else."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        feats = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        return feats if return_features else feats.sum(dim=1, keepdim=True)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_with_torchscript_extractor_matches_frechet_distance(tmp_path):
    path = str(tmp_path / "features.pt")
    torch.jit.script(_MeanColour()).save(path)
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (12, 16, 16, 3)).astype(np.uint8)
    fake = np.clip(real.astype(int) // 2 + rng.integers(0, 60, real.shape), 0, 255).astype(np.uint8)
    size = 16  # no resize, so the features can be recomputed here exactly
    got = metrics.fid(real, fake, path, size=size)

    def feats(x):
        t = torch.from_numpy(x).permute(0, 3, 1, 2).double()
        return torch.cat([t.mean(dim=(2, 3)), t.std(dim=(2, 3))], dim=1).numpy()

    assert got == pytest.approx(_frechet(feats(real), feats(fake)), rel=1e-3)
    assert got > 100  # halving the brightness moves the means by ~60 levels
    assert metrics.fid(real, real, path, size=size) == pytest.approx(0.0, abs=1e-2)


def test_fid_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        metrics.fid(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8), str(tmp_path / "x"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        metrics.TorchScriptFeatures(str(bad))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP with a byte-level tokenizer, saved like a hub checkpoint (no download)."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out = tmp_path_factory.mktemp("clip")
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    cfg = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(out)
    return str(out)


def test_clip_score_is_scaled_clipped_cosine(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    prompts = ["a red circle", "a blue square on black", "green"]
    got = metrics.clip_score(images, prompts, tiny_clip)
    # independently, one pair at a time through the get_*_features API
    model, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    scores = []
    with torch.no_grad():
        for img, text in zip(images, prompts, strict=True):
            i = model.get_image_features(**proc(images=[img], return_tensors="pt")).pooler_output
            t = model.get_text_features(**proc(text=[text], return_tensors="pt")).pooler_output
            scores.append(max(100 * torch.nn.functional.cosine_similarity(i, t).item(), 0.0))
    assert got == pytest.approx(float(np.mean(scores)), abs=1e-3)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        metrics.clip_score(images, prompts, tiny_clip + "-missing")
