"""The filter step's settings and their defaults (:class:`FilterConfig`), kept apart from the step.

    from pipeline.data.filter_config import FilterConfig
    FilterConfig().val_fraction        # 0.05: the held-out validation split (pipeline.data.split)

``imagen-pipeline filter``'s flags are generated from these fields (:mod:`pipeline.options`)
and the DAGs' trigger form takes its ``val_fraction`` / ``val_max`` Params' defaults from them.
This module imports nothing heavy (the standard library, :mod:`pipeline.data.split` and
:mod:`pipeline.options`), so a DAG file can read the defaults at parse time; the filters
themselves are :mod:`pipeline.data.filter_registry` (which re-exports this class) and the step
:mod:`pipeline.data.filters`.
"""

from __future__ import annotations

import dataclasses

from pipeline.data.split import check_settings
from pipeline.options import comma_list, option


@dataclasses.dataclass
class FilterConfig:
    """Thresholds for every filter, dedup and scorer, and the validation split (the single
    source of their defaults). The fields declared with :func:`~pipeline.options.option`
    generate ``imagen-pipeline filter``'s flags; ``min_side`` is not one of them: the CLI's
    ``--min-side`` defaults to the smallest stage's side (``pipeline.data.filters.stage_config``),
    not to this field's default."""

    min_caption_chars: int = option(3, "reject captions shorter than this (default %(default)s)")
    max_caption_chars: int = option(512, "reject captions longer than this (default %(default)s)")
    languages: tuple[str, ...] = option(
        (), "comma-separated ISO 639-1 codes to keep, e.g. en,de (needs py3langid; skipped with a warning "
            "without it); default: no language filter", type=comma_list, metavar="CODES")
    min_language_confidence: float = option(
        0.5, "reject a caption only when another language is detected at least this surely (default %(default)s)")
    min_side: int = 64
    max_aspect: float = option(2.0, "reject images whose long side is more than this times the short one "
                                    "(default %(default)s)")
    max_pixels: int = option(64_000_000, "reject images with more pixels than this (default %(default)s)")
    blank_tolerance: int = option(2, "reject as blank an image whose every RGB channel varies by at most this "
                                     "(0..255; transparent pixels count as white); -1 keeps blank images "
                                     "(default %(default)s)")
    dedup: bool = option(True, "keep exact duplicates (default: drop them, by the sha256 of the stored image)")
    near_dedup: bool = option(True, "keep perceptual near duplicates (default: drop them, by pHash)")
    near_dup_distance: int = option(6, "max Hamming distance between the 64-bit pHashes of near duplicates "
                                       "(default %(default)s)")
    near_dup_color_tolerance: float = 32.0  # max |difference| of any 8x8 RGB thumbnail cell, 0..255
    scorers: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> {"weights": ..., "min"/"max": ...}
    # cascade stage -> min native side (pipeline.data.download.stage_policy): kept samples smaller than a
    # stage's side are counted as too_small_for_<stage> and left out of that stage alone
    stage_sides: dict[str, int] = dataclasses.field(default_factory=dict)
    # The held-out validation split (pipeline.data.split.assign): kept samples whose URL hashes below
    # val_fraction, at most val_max of them (the smallest hashes), go to val-NNNNNN.tar; 0: no split
    val_fraction: float = option(0.05, "hold out this fraction of the kept samples (by a hash of their URL) as "
                                       "the validation split, val-NNNNNN.tar; 0: none (default %(default)s)")
    val_max: int = option(10_000, "hold out at most this many samples (default %(default)s)")

    def __post_init__(self) -> None:
        check_settings(self.val_fraction, self.val_max)  # a bad split setting fails before any work
