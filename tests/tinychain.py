"""How the shared fixtures (tests/conftest.py) make the tiny data chain, for tests that redo a step.

    from tests.tinychain import RAW_DOWNLOAD_KWARGS, TINY_PRESETS
"""

from __future__ import annotations

import dataclasses
from http.server import ThreadingHTTPServer

from pipeline.dev.tinydata import OWN_SERVER_POLITENESS

TINY_N = 120  # good images; the dataset adds 11 rows that fail or get filtered
TINY_ROWS_PER_SHARD = 50  # several shards, so multi-shard code paths run
# How raw_shards calls download(); tests that re-run the download reuse it.
TINY_PRESETS = {"base64": "tiny", "sr256": "tiny", "sr1024": "tiny"}  # as imagen_full's defaults
RAW_DOWNLOAD_KWARGS = {
    "presets": TINY_PRESETS,  # originals at the 128 px stage's size, ratio kept, never upscaled
    "allow_private_networks": True,
    "number_sample_per_shard": TINY_ROWS_PER_SHARD,
    "save_additional_columns": ["color", "shape", "background", "kind", "source_width", "source_height"],
    **OWN_SERVER_POLITENESS,
}


@dataclasses.dataclass
class TinyDataset:
    root: str  # served folder: images/, urls.parquet, attributes.json
    urls: str  # the URL list (Parquet: url, caption, color, shape, background, kind)
    server: ThreadingHTTPServer  # server.request_log lists the requests it answered
    port: int
    info: dict  # what make_tiny_dataset returned (n_good, n_broken, kinds, ...)
