"""The per-sample filters of the filter step: one tiny interface, a registry, one config.

A filter is anything with a ``name`` and ``check(sample) -> reason | None`` (None keeps the
sample), registered by name with a factory that builds it from :class:`FilterConfig` (the
single source of every threshold, defined in :mod:`pipeline.data.filter_config` and re-exported
here). Registration order is run order, cheapest first: caption
length, caption language, size and aspect from the image header, pixel count, full decode, blank
(one flat colour). Every reason a sample can get is in :data:`REASONS`, with its meaning.
Dataset-wide duplicate removal is not a per-sample filter: see :mod:`pipeline.data.dedup`.

Model-based scores (CLIP score, NSFW, watermark, ...) plug in through :data:`SCORERS`: a
scorer scores a batch of samples and runs only when its model weights are configured, e.g.
``FilterConfig(scorers={"image_classifier": {"weights": "/models/nsfw", "label": "nsfw", "max": 0.5}})``.

A filter that cannot run here (language filter without a detector installed, a scorer without
weights) is skipped with a warning and listed in the manifest's ``skipped_filters``.

    from pipeline.data.filter_registry import FilterConfig, build_filters, apply_filters
    filters, skipped = build_filters(FilterConfig(languages=("en",)))

Not a script; used by :mod:`pipeline.data.filters`.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from pipeline.data.filter_config import FilterConfig  # defined apart (no imports) for the DAG files
from pipeline.data.images import to_rgb

if TYPE_CHECKING:
    from pipeline.data.facts import ImageFacts

# Every reason the filter step gives a URL-list row (the reject table's "filter" rows, the
# ``reason`` column of ``_filter/NNNNN.parquet`` and ``_filter/plan.parquet``), with its meaning.
# The README's "Reject table" section lists them (tests/unit/test_filters.py holds the two equal).
# Scorers add NAME_score_too_low / NAME_score_too_high (ScoreGate); the download's reasons are
# :func:`pipeline.data.fetch_guard.normalize_error`'s.
REASONS = {
    "caption_too_short": "caption shorter than min_caption_chars, after stripping (a missing caption is empty)",
    "caption_too_long": "caption longer than max_caption_chars",
    "caption_language": "caption confidently in a language outside languages (only with languages set)",
    "image_too_small": "short side below min_side (the smallest stage's), stored or original",
    "aspect_ratio_too_large": "long side more than max_aspect times the short one",
    "image_too_large": "more pixels than max_pixels, read from the header before decoding",
    "missing_image": "the sample has no image member",
    "image_decode_error": "the image does not decode",
    "blank": "one flat colour: fully transparent (shown on white) or a single colour, every channel within "
             "blank_tolerance; kept out of dedup, where all blanks would be near duplicates of each other",
    "duplicate_image": "the same image bytes (sha256) as an earlier sample, which is kept",
    "near_duplicate_image": "pHash within near_dup_distance and thumbnail within near_dup_color_tolerance of an "
                            "earlier sample, which is kept (duplicate_of in plan.parquet names it)",
    "duplicate_key": "a second sample under a key already taken by an earlier raw shard",
    "unsafe_member_name": "the download recorded a key that is no plain file name",
    "unknown_member_extension": "the image is in the tar only under another spelling (KEY.PNG)",
}


class FilterUnavailable(Exception):
    """Raised by a filter factory that cannot run on this machine; the filter is skipped."""


@dataclasses.dataclass
class Sample:
    """One downloaded sample; the image is only decoded when a filter asks for it.

    ``facts``: what the download computed from the pixels it stored (:mod:`pipeline.data.facts`),
    set by the reader only for image bytes that hash to the fact's sha256 and whose header gives
    its size. With them the decode and blank filters and dedup need no decode (scorers still
    decode: ``image`` works either way)."""

    key: str
    caption: str
    image_bytes: bytes | None
    ext: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)
    facts: ImageFacts | None = None

    @cached_property
    def _header(self) -> Image.Image | str | None:
        # Image.open reads only the header: size without decoding pixels.
        if not self.image_bytes:
            return None
        try:
            return Image.open(io.BytesIO(self.image_bytes))
        except Image.DecompressionBombError:
            return "bomb"  # PIL refuses > 2x its own pixel limit before we can read the size
        except Exception:  # noqa: BLE001 - any unreadable header is the decode filter's job
            return None

    @property
    def is_bomb(self) -> bool:
        return self._header == "bomb"

    @property
    def width(self) -> int | None:
        return self._header.width if isinstance(self._header, Image.Image) else None

    @property
    def height(self) -> int | None:
        return self._header.height if isinstance(self._header, Image.Image) else None

    @property
    def original_size(self) -> tuple[int, int] | None:
        """Size of the image before img2dataset resized it, when the metadata records it."""
        w, h = self.meta.get("original_width"), self.meta.get("original_height")
        return (int(w), int(h)) if w and h else None

    @cached_property
    def image(self) -> Image.Image:
        """The fully decoded image as 8-bit RGB (:func:`pipeline.data.images.to_rgb`; raises on corrupt data)."""
        img = Image.open(io.BytesIO(self.image_bytes or b""))
        img.load()
        return to_rgb(img)

    def sizes(self) -> list[tuple[int, int]]:
        """Every known (width, height): stored, and original when recorded."""
        stored = [(self.width, self.height)] if self.width else []
        return stored + ([self.original_size] if self.original_size else [])


class Filter(Protocol):
    name: str

    def check(self, sample: Sample) -> str | None:
        """None keeps the sample; otherwise the reason it is rejected."""


FILTERS: dict[str, Callable[[FilterConfig], Filter | None]] = {}


def register(name: str):
    """Class decorator: add a filter to the registry; registration order is run order.

    The class needs ``from_config(config) -> filter | None`` (None: disabled by the config).
    """

    def wrap(cls):
        cls.name = name
        FILTERS[name] = cls.from_config
        return cls

    return wrap


@register("caption_length")
class CaptionLengthFilter:
    def __init__(self, min_chars: int, max_chars: int):
        self.min_chars, self.max_chars = min_chars, max_chars

    @classmethod
    def from_config(cls, config: FilterConfig) -> CaptionLengthFilter:
        return cls(config.min_caption_chars, config.max_caption_chars)

    def check(self, sample: Sample) -> str | None:
        n = len(sample.caption.strip())
        if n < self.min_chars:
            return "caption_too_short"
        return "caption_too_long" if n > self.max_chars else None


def language_detector() -> Callable[[str], tuple[str, float]] | None:
    """``text -> (ISO 639-1 code, probability)`` from py3langid when installed, else None."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        return None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True).classify


@register("caption_language")
class CaptionLanguageFilter:
    """Rejects captions confidently in a language outside ``languages``; optional (needs py3langid).

    Short captions ("blue square on black") get low, unreliable probabilities: only a detection
    at ``min_language_confidence`` or above rejects, an unsure one keeps the sample.
    """

    def __init__(self, languages: tuple[str, ...], min_confidence: float, detect: Callable[[str], tuple[str, float]]):
        self.languages, self.min_confidence, self.detect = frozenset(languages), min_confidence, detect

    @classmethod
    def from_config(cls, config: FilterConfig) -> CaptionLanguageFilter | None:
        if not config.languages:
            return None
        detect = language_detector()
        if detect is None:
            raise FilterUnavailable("no language detector installed (pip install py3langid); "
                                    f"captions were not checked for languages {list(config.languages)}")
        return cls(tuple(config.languages), config.min_language_confidence, detect)

    def check(self, sample: Sample) -> str | None:
        language, probability = self.detect(sample.caption.strip())
        if language in self.languages or probability < self.min_confidence:
            return None
        return "caption_language"


@register("min_side")
class MinSideFilter:
    """Rejects small images, also small sources that img2dataset upscaled (they are blurry)."""

    def __init__(self, min_side: int):
        self.min_side = min_side

    @classmethod
    def from_config(cls, config: FilterConfig) -> MinSideFilter:
        return cls(config.min_side)

    def check(self, sample: Sample) -> str | None:
        small = any(min(w, h) < self.min_side for w, h in sample.sizes())
        return "image_too_small" if small else None


@register("max_aspect")
class MaxAspectFilter:
    """Rejects elongated images: a center crop of a 4:1 source drops most of what the caption says."""

    def __init__(self, max_aspect: float):
        self.max_aspect = max_aspect

    @classmethod
    def from_config(cls, config: FilterConfig) -> MaxAspectFilter:
        return cls(config.max_aspect)

    def check(self, sample: Sample) -> str | None:
        bad = any(max(w, h) > self.max_aspect * min(w, h) for w, h in sample.sizes())
        return "aspect_ratio_too_large" if bad else None


@register("max_pixels")
class MaxPixelsFilter:
    """Rejects huge stored images from their header, before a decode could exhaust memory."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels

    @classmethod
    def from_config(cls, config: FilterConfig) -> MaxPixelsFilter:
        return cls(config.max_pixels)

    def check(self, sample: Sample) -> str | None:
        if sample.is_bomb:
            return "image_too_large"
        if sample.width is None:
            return None
        return "image_too_large" if sample.width * sample.height > self.max_pixels else None


@register("decode")
class DecodeFilter:
    @classmethod
    def from_config(cls, config: FilterConfig) -> DecodeFilter:
        return cls()

    def check(self, sample: Sample) -> str | None:
        if not sample.image_bytes:
            return "missing_image"
        if sample.facts is not None:
            return None  # these very bytes were encoded from decoded pixels: PNG gives them back
        try:
            sample.image  # noqa: B018 - decoding is the check
        except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
            return "image_decode_error"
        return None


@register("blank")
class BlankFilter:
    """Rejects images of one flat colour. A fully transparent PNG decodes, on white, to a white
    square; such images and single-colour fills carry nothing the caption describes, and the
    pHash of every flat image is the same, so dedup would group them all as near duplicates of
    the first one. Runs after decode: :func:`~pipeline.data.images.to_rgb` has composited alpha."""

    def __init__(self, tolerance: int):
        self.tolerance = tolerance

    @classmethod
    def from_config(cls, config: FilterConfig) -> BlankFilter | None:
        return None if config.blank_tolerance < 0 else cls(config.blank_tolerance)

    def varies(self, image: Image.Image) -> bool:
        """Whether some channel spans more than the tolerance (per channel (min, max) in C)."""
        return self.spans(image.getextrema())

    def spans(self, extrema) -> bool:
        return any(hi - lo > self.tolerance for lo, hi in extrema)

    def check(self, sample: Sample) -> str | None:
        if sample.facts is not None:  # the extremes of the RGB pixels, from the download
            return None if self.spans(sample.facts.extrema) else "blank"
        # A 32 x 32 nearest-neighbour sample of the pixels first (~0.03 ms against ~0.7 ms for a
        # full pass over a 1024 x 768 image, 10% of its decode): pixels that vary there vary in
        # the image, so only the rare image flat at those points gets the full pass. Exact.
        image = sample.image
        if self.varies(image.resize((32, 32), Image.Resampling.NEAREST)):
            return None
        return None if self.varies(image) else "blank"


def build_filters(config: FilterConfig | None = None) -> tuple[list[Filter], dict[str, str]]:
    """Every registered filter for ``config`` in run order, and ``{name: why}`` for those skipped."""
    config = config or FilterConfig()
    filters, skipped = [], {}
    for name, make in FILTERS.items():
        try:
            f = make(config)
        except FilterUnavailable as err:
            warnings.warn(f"filter {name!r} skipped: {err}", stacklevel=2)
            skipped[name] = str(err)
            continue
        if f is not None:
            filters.append(f)
    return filters, skipped


def apply_filters(filters: list[Filter], sample: Sample) -> str | None:
    """The first reject reason, or None when every filter keeps the sample."""
    for f in filters:
        reason = f.check(sample)
        if reason is not None:
            return reason
    return None


# --- model-based scores -------------------------------------------------------------------


class Scorer(Protocol):
    name: str

    def score(self, samples: list[Sample]) -> list[float]:
        """One score per sample, same order; samples are decoded (``sample.image`` works)."""


SCORERS: dict[str, Callable[[dict], Scorer]] = {}


def register_scorer(name: str):
    """Decorator for a factory ``options -> Scorer``; ``options["weights"]`` is always set."""

    def wrap(factory):
        SCORERS[name] = factory
        return factory

    return wrap


@dataclasses.dataclass
class ScoreGate:
    """A scorer with its thresholds: rejects ``NAME_score_too_low`` / ``NAME_score_too_high``."""

    name: str
    scorer: Scorer
    min: float | None = None
    max: float | None = None

    def reason(self, value: float) -> str | None:
        if self.min is not None and value < self.min:
            return f"{self.name}_score_too_low"
        if self.max is not None and value > self.max:
            return f"{self.name}_score_too_high"
        return None


def build_scorers(config: FilterConfig) -> tuple[list[ScoreGate], dict[str, str]]:
    """Load the configured scorers that have weights; ``{name: why}`` for those skipped."""
    gates, skipped = [], {}
    for name, options in sorted(config.scorers.items()):
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r} in FilterConfig.scorers; registered: {sorted(SCORERS)}")
        if not options.get("weights"):
            msg = f"no model weights given (set scorers[{name!r}]['weights'] to a local model directory)"
            warnings.warn(f"scorer {name!r} skipped: {msg}", stacklevel=2)
            skipped[f"score:{name}"] = msg
            continue
        gates.append(ScoreGate(name, SCORERS[name](dict(options)), options.get("min"), options.get("max")))
    return gates, skipped


@register_scorer("image_classifier")
class ImageClassifierScorer:
    """Probability of one label from a local transformers image classifier (NSFW, watermark, ...).

    Options: ``weights`` (a directory saved with ``save_pretrained``: model + image processor),
    ``label`` (the label whose probability is the score), ``batch_size`` (default 64).
    Torch and transformers are imported here, only when such a scorer is configured.
    """

    name = "image_classifier"

    def __init__(self, options: dict[str, Any]):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.torch = torch
        self.processor = AutoImageProcessor.from_pretrained(options["weights"])
        self.model = AutoModelForImageClassification.from_pretrained(options["weights"]).eval()
        labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        label = str(options.get("label", "")).lower()
        if label not in labels:
            raise ValueError(f"scorer image_classifier: label {options.get('label')!r} is not one of the "
                             f"model's labels {sorted(labels)}; set scorers['image_classifier']['label']")
        self.index, self.batch_size = labels[label], int(options.get("batch_size", 64))

    def score(self, samples: list[Sample]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(samples), self.batch_size):
            images = [s.image for s in samples[i:i + self.batch_size]]  # already 8-bit RGB
            with self.torch.inference_mode():
                logits = self.model(**self.processor(images=images, return_tensors="pt")).logits
            out += logits.float().softmax(-1)[:, self.index].tolist()
        return out
