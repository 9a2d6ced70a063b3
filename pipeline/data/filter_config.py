"""The filter step's settings and their defaults (:class:`FilterConfig`), kept apart from the step.

    from pipeline.data.filter_config import FilterConfig
    FilterConfig().val_fraction        # 0.05: the held-out validation split (pipeline.data.split)

``imagen-pipeline filter`` takes its flags' defaults from these fields and the DAGs' trigger
form its ``val_fraction`` / ``val_max`` Params. This module imports nothing heavy (the standard
library and :mod:`pipeline.data.split`), so a DAG file can read the defaults at parse time; the filters themselves are :mod:`pipeline.data.filter_registry`
(which re-exports this class) and the step :mod:`pipeline.data.filters`.
"""

from __future__ import annotations

import dataclasses

from pipeline.data.split import check_settings


@dataclasses.dataclass
class FilterConfig:
    """Thresholds for every filter, dedup and scorer, and the validation split (the single
    source of their defaults)."""

    min_caption_chars: int = 3
    max_caption_chars: int = 512
    languages: tuple[str, ...] = ()  # ISO 639-1 codes to keep, e.g. ("en",); empty: no language filter
    min_language_confidence: float = 0.5  # reject only captions this surely in another language
    min_side: int = 64
    max_aspect: float = 2.0
    max_pixels: int = 64_000_000
    dedup: bool = True  # exact duplicates (sha256 of the stored image) across the dataset
    near_dedup: bool = True  # perceptual-hash near duplicates across the dataset
    near_dup_distance: int = 6  # max Hamming distance between 64-bit pHashes
    near_dup_color_tolerance: float = 32.0  # max |difference| of any 8x8 RGB thumbnail cell, 0..255
    scorers: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> {"weights": ..., "min"/"max": ...}
    # cascade stage -> min native side (pipeline.data.download.stage_policy): kept samples smaller than a
    # stage's side are counted as too_small_for_<stage> and left out of that stage alone
    stage_sides: dict[str, int] = dataclasses.field(default_factory=dict)
    # The held-out validation split (pipeline.data.split.assign): kept samples whose URL hashes below
    # val_fraction, at most val_max of them (the smallest hashes), go to val-NNNNNN.tar; 0: no split
    val_fraction: float = 0.05
    val_max: int = 10_000

    def __post_init__(self) -> None:
        check_settings(self.val_fraction, self.val_max)  # a bad split setting fails before any work
