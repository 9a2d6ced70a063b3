"""The embed step's options and their defaults (:class:`EmbedConfig`), kept apart from the step.

    from pipeline.data.embed_config import EmbedConfig
    EmbedConfig().max_length          # 128, StageConfig's max_text_len: never written again

``imagen-pipeline embed`` generates its flags from these fields (``pipeline.options``), the
planner reads its token limit here, and the DAGs' ``encoder`` Param its default (a unit test,
tests/unit/test_defaults.py, checks every DAG Param named after an option). This module imports nothing heavy, so the CLI's ``--help`` and the planner stay fast;
the step itself is :mod:`pipeline.data.embed`.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagen.config import StageConfig
from pipeline.options import option


@dataclass
class EmbedConfig:
    """Every embed option and its default: the single source of them (``imagen-pipeline embed``'s
    flags are generated from these fields)."""

    # the encoder and token limit the paper presets are built for (imagen.config.StageConfig)
    encoder: str = option(StageConfig.text_encoder, "T5 hub name or local directory (t5: prefix optional)")
    max_length: int = option(StageConfig.max_text_len, "max tokens per caption, </s> included (Imagen: 128)")
    batch_size: int = option(256, "most captions per forward pass")
    max_batch_tokens: int = option(16384, "most padded tokens (captions x longest) per forward pass; "
                                          "halves on out-of-memory")
    device: str | None = option(None, "cpu, cuda ... (default: GPU if any)")
    dtype: str | None = option(None, "float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    caption_cache: bool = option(True, "the caption cache (on by default): each distinct caption's embedding is "
                                       "kept in OUTPUT/caption-cache and reused across shards and reruns; "
                                       "--no-caption-cache turns it off (a shard's duplicates are still "
                                       "encoded once)")
