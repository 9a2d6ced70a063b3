"""Tests for the filter step: each filter on crafted samples (pipeline.data.filter_registry) and
dataset-wide dedup (pipeline.data.dedup). filter_shards end to end over the downloaded tiny
dataset is tests/integration/test_filters.py."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipeline.data import filter_registry
from pipeline.data.dedup import NearDuplicateIndex, find_duplicates, image_signature
from pipeline.data.filters import (
    FILTERS,
    CaptionLengthFilter,
    DecodeFilter,
    FilterConfig,
    MaxAspectFilter,
    MaxPixelsFilter,
    MinSideFilter,
    Sample,
    apply_filters,
    build_filters,
)


def png(w: int = 64, h: int = 64, color=(200, 10, 10)) -> bytes:
    """A ``color`` picture with a white corner (not one flat colour: that is the blank filter's)."""
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), color)
    img.paste((255, 255, 255), (0, 0, min(w, 8), min(h, 8)))
    img.save(buf, "PNG")
    return buf.getvalue()


def sample(caption="a red circle on white", data=None, meta=None, key="000000001") -> Sample:
    return Sample(key=key, caption=caption, image_bytes=png() if data is None else data, ext="png",
                  meta=meta or {})


# --- each filter ---------------------------------------------------------------------------

@pytest.mark.parametrize("caption, reason", [
    ("", "caption_too_short"), ("   ", "caption_too_short"), ("ab", "caption_too_short"),
    ("abc", None), (" a red circle ", None), ("x" * 512, None), ("x" * 513, "caption_too_long"),
])
def test_caption_length(caption, reason):
    assert CaptionLengthFilter(3, 512).check(sample(caption)) == reason


@pytest.mark.parametrize("w, h, original, reason", [
    (64, 64, None, None), (63, 100, None, "image_too_small"), (100, 63, None, "image_too_small"),
    (64, 64, (40, 40), "image_too_small"),  # img2dataset upscaled a 40 px source: blurry
    (64, 64, (96, 96), None),
])
def test_min_side(w, h, original, reason):
    meta = {"original_width": original[0], "original_height": original[1]} if original else {}
    assert MinSideFilter(64).check(sample(data=png(w, h), meta=meta)) == reason


@pytest.mark.parametrize("w, h, original, reason", [
    (128, 64, None, None), (64, 128, None, None), (129, 64, None, "aspect_ratio_too_large"),
    (64, 64, (256, 64), "aspect_ratio_too_large"),  # center crop kept a quarter of the source
    (64, 64, (150, 100), None),
])
def test_max_aspect(w, h, original, reason):
    meta = {"original_width": original[0], "original_height": original[1]} if original else {}
    assert MaxAspectFilter(2.0).check(sample(data=png(w, h), meta=meta)) == reason


def test_max_pixels_reads_only_the_header():
    assert MaxPixelsFilter(64 * 64).check(sample(data=png(64, 64))) is None
    assert MaxPixelsFilter(64 * 64 - 1).check(sample(data=png(64, 64))) == "image_too_large"
    s = sample(data=png(64, 64))
    MaxPixelsFilter(10).check(s)
    assert "image" not in s.__dict__  # no full decode happened


def test_decode():
    good = png()
    assert DecodeFilter().check(sample(data=good)) is None
    assert DecodeFilter().check(sample(data=good[: len(good) // 2])) == "image_decode_error"
    assert DecodeFilter().check(sample(data=b"<html>not an image</html>")) == "image_decode_error"
    assert DecodeFilter().check(Sample(key="k", caption="a b c", image_bytes=None)) == "missing_image"


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def real_picture() -> bytes:
    """A red disc on a white page: the kind of image the data is for."""
    from PIL import ImageDraw

    img = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).ellipse((20, 20, 76, 76), fill=(200, 20, 20))
    return encoded(img)


@pytest.mark.parametrize("data, reason", [
    (encoded(Image.new("RGBA", (96, 96), (0, 0, 0, 0))), "blank"),  # fully transparent: white on a page
    (encoded(Image.new("RGBA", (96, 96), (255, 0, 0, 0))), "blank"),  # transparent red pixels: still white
    (encoded(Image.new("RGB", (96, 96), "white")), "blank"),
    (encoded(Image.new("RGB", (96, 96), "black")), "blank"),
    (encoded(Image.new("L", (96, 96), 128)), "blank"),
    (encoded(Image.new("RGB", (96, 96), (30, 90, 200)), "JPEG"), "blank"),  # flat, through a lossy codec
    (real_picture(), None),
    (encoded(Image.new("RGBA", (96, 96), (0, 0, 255, 255))), "blank"),  # opaque flat blue
])
def test_blank_images_are_rejected(data, reason):
    assert filter_registry.BlankFilter(2).check(sample(data=data)) == reason


def test_one_dot_is_not_blank_and_tolerance_minus_one_keeps_blanks():
    img = Image.new("RGB", (96, 96), "white")
    img.putpixel((50, 50), (0, 0, 0))
    assert filter_registry.BlankFilter(2).check(sample(data=encoded(img))) is None
    big = Image.new("RGB", (1000, 1000), "white")
    big.putpixel((0, 0), (0, 0, 0))  # a dot the 32 x 32 pre-check misses: the full pass finds it
    assert not filter_registry.BlankFilter(2).varies(big.resize((32, 32), Image.Resampling.NEAREST))
    assert filter_registry.BlankFilter(2).check(sample(data=encoded(big))) is None
    ramp = Image.linear_gradient("L").resize((96, 96))  # 0..255: far from flat
    assert filter_registry.BlankFilter(2).check(sample(data=encoded(ramp))) is None
    assert "blank" not in [f.name for f in build_filters(FilterConfig(blank_tolerance=-1))[0]]
    flat = sample(data=encoded(Image.new("RGB", (96, 96), "white")))
    assert apply_filters(build_filters(FilterConfig(blank_tolerance=-1))[0], flat) is None
    assert apply_filters(build_filters()[0], flat) == "blank"


def test_every_reason_is_documented_in_the_readme():
    """The README's "Reject table" section lists exactly the reasons filter_registry.REASONS owns."""
    import os
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")) as f:
        readme = f.read()
    section = readme.split("## Reject table", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_0-9]+)` \|", section, re.M))
    assert listed == set(filter_registry.REASONS), listed ^ set(filter_registry.REASONS)


def test_size_filters_leave_undecodable_bytes_to_decode():
    garbage = sample(data=b"<html>not an image</html>")
    assert [f.check(garbage) for f in (MinSideFilter(64), MaxAspectFilter(2), MaxPixelsFilter(10))] == [None] * 3


def test_pil_decompression_bomb_is_too_large_not_a_decode_error():
    from tests.ingest_server import decompression_bomb

    assert MaxPixelsFilter(64_000_000).check(sample(data=decompression_bomb())) == "image_too_large"


def test_registry_order_and_config():
    assert list(FILTERS) == ["caption_length", "caption_language", "min_side", "max_aspect", "max_pixels", "decode",
                             "blank"]
    names = [f.name for f in build_filters()[0]]
    assert names == [n for n in FILTERS if n != "caption_language"]  # no languages configured: off
    # Cheap checks first: an empty caption is reported before the (costly) decode failure.
    filters = build_filters()[0]
    assert apply_filters(filters, sample("", data=b"garbage")) == "caption_too_short"
    assert apply_filters(filters, sample(data=b"garbage")) == "image_decode_error"
    assert apply_filters(build_filters(FilterConfig(min_side=128))[0], sample()) == "image_too_small"


def test_language_filter_with_a_detector():
    pytest.importorskip("py3langid")
    filters, skipped = build_filters(FilterConfig(languages=("en",)))
    assert skipped == {} and "caption_language" in [f.name for f in filters]
    assert apply_filters(filters, sample("a red circle on a white background")) is None
    assert apply_filters(filters, sample("ein roter Kreis auf einem weißen Hintergrund")) == "caption_language"
    assert apply_filters(filters, sample("un cercle rouge sur un fond blanc")) == "caption_language"
    # Too short to tell (the detector is unsure): kept rather than dropped on a guess.
    assert apply_filters(filters, sample("blue square on black")) is None
    strict = build_filters(FilterConfig(languages=("en",), min_language_confidence=0.1))[0]
    assert apply_filters(strict, sample("blue square on black")) == "caption_language"


def test_language_filter_without_a_detector_is_skipped_with_a_warning(monkeypatch):
    monkeypatch.setattr(filter_registry, "language_detector", lambda: None)
    with pytest.warns(UserWarning, match="py3langid"):
        filters, skipped = build_filters(FilterConfig(languages=("en",)))
    assert "caption_language" not in [f.name for f in filters]
    assert "no language detector installed" in skipped["caption_language"]


def test_scorer_without_weights_is_skipped_and_unknown_is_an_error():
    with pytest.warns(UserWarning, match="no model weights"):
        gates, skipped = filter_registry.build_scorers(FilterConfig(scorers={"image_classifier": {"max": 0.5}}))
    assert gates == [] and "score:image_classifier" in skipped
    with pytest.raises(ValueError, match="unknown scorer 'clip'.*image_classifier"):
        filter_registry.build_scorers(FilterConfig(scorers={"clip": {"weights": "/x"}}))


def _signature(img: Image.Image, fmt: str = "PNG", **kw) -> tuple[bytes, int, bytes]:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    data = buf.getvalue()
    return image_signature(data, Image.open(io.BytesIO(data)))


def _scene(color=(220, 40, 40), shift=0, size=64) -> Image.Image:
    from PIL import ImageDraw

    img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    s = size / 64
    ImageDraw.Draw(img).ellipse(((10 + shift) * s, 12 * s, (40 + shift) * s, 44 * s), fill=color)
    return img


def test_find_duplicates_exact_near_and_recoloured():
    original = _signature(_scene())
    samples = [
        ("a", *original),
        ("b", *original),  # same bytes
        ("c", *_signature(_scene(), "JPEG", quality=60)),  # re-encoded
        ("d", *_signature(_scene(size=96).resize((64, 64)))),  # rescaled
        ("e", *_signature(_scene(color=(40, 70, 220)))),  # same layout, another colour: a different image
        ("f", *_signature(_scene(shift=20))),  # moved: a different image
    ]
    assert (samples[4][2] ^ original[1]).bit_count() <= 6  # pHash alone would call the blue one a duplicate
    found = list(find_duplicates(samples))
    assert found == [("b", "duplicate_image", "a"), ("c", "near_duplicate_image", "a"),
                     ("d", "near_duplicate_image", "a")]
    assert [k for k, *_ in find_duplicates(samples, near=False)] == ["b"]
    assert [(k, r) for k, r, _ in find_duplicates(samples, exact=False)] == \
        [("b", "near_duplicate_image"), ("c", "near_duplicate_image"), ("d", "near_duplicate_image")]


def test_near_duplicate_index_finds_every_hash_within_the_distance():
    import random

    rng = random.Random(0)
    thumb = bytes(192)
    for distance in (0, 4, 6, 9):
        index = NearDuplicateIndex(distance, color_tolerance=0)
        base = rng.getrandbits(64)
        index.add("base", base, thumb)
        for flips in range(0, 12):
            probe = base
            for bit in rng.sample(range(64), flips):
                probe ^= 1 << bit
            assert (index.find(probe, thumb) == "base") == (flips <= distance), (distance, flips)
    with pytest.raises(ValueError, match="near_dup_distance"):
        NearDuplicateIndex(40, 1.0)


# --- filter_shards over the downloaded tiny dataset ---------------------------------------


