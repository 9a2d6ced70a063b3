"""Shared pytest fixtures: the tiny dataset, served on loopback, downloaded and filtered once.

Only the integration and e2e tiers use them (they run img2dataset and MLflow servers); the unit
tier (tests/unit) writes the small shards it needs itself.

The chain mirrors the pipeline (tinydata -> img2dataset download -> filter) and takes about
15 s per session, most of it img2dataset's start-up. Regenerate the same data by hand with
``python -m pipeline.dev.tinydata make DIR --n 120``.

    tiny_dataset      TinyDataset(root, urls, server, port, info): the generated dataset,
                      a running loopback HTTP server for it, and its URL list
    raw_shards        str: folder of img2dataset output (3 shards of up to 50 rows)
    filtered_shards   str: folder of filtered shards (000000.tar.. 000002.tar, 120 samples)
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on a 2-core machine: one compute thread each, in
    # this process and every subprocess it starts (torch reads OMP_NUM_THREADS when it loads),
    # rather than four threads fighting over two cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.tinychain import (
    RAW_DOWNLOAD_KWARGS,
    TINY_N,
    TINY_PRESETS,
    TINY_ROWS_PER_SHARD,
    TinyDataset,
)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    from pipeline.dev.tinydata import make_tiny_dataset, serve

    root = tmp_path_factory.mktemp("tiny")
    # Bind first on a free port (parallel sessions on one machine must not collide),
    # then bake that port into the URLs.
    server = serve(str(root), 0)
    port = server.server_address[1]
    info = make_tiny_dataset(str(root), n=TINY_N, seed=0, port=port)
    yield TinyDataset(root=str(root), urls=info["urls"], server=server, port=port, info=info)
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def raw_shards(tiny_dataset, tmp_path_factory) -> str:
    from pipeline.data.download import download

    output = str(tmp_path_factory.mktemp("raw"))
    download(tiny_dataset.urls, output, **RAW_DOWNLOAD_KWARGS)
    return output


@pytest.fixture(scope="session")
def filtered_shards(raw_shards, tmp_path_factory) -> str:
    from pipeline.data.filters import filter_shards, stage_config

    output = str(tmp_path_factory.mktemp("filtered"))
    filter_shards(raw_shards, output, stage_config(TINY_PRESETS), samples_per_shard=TINY_ROWS_PER_SHARD)
    return output


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend), started once per session."""
    from pipeline.dev.services import mlflow_server

    with mlflow_server(str(tmp_path_factory.mktemp("mlflow"))) as uri:
        yield uri


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> str:
    """A tiny random T5 encoder + tokenizer saved with save_pretrained (no hub access)."""
    from pipeline.dev.tinymodels import build_tiny_t5

    return build_tiny_t5(str(tmp_path_factory.mktemp("t5-tiny")))


@pytest.fixture(scope="session")
def tiny_embeddings(filtered_shards, tiny_encoder_dir, tmp_path_factory) -> str:
    """Embeddings of the filtered tiny shards: the directory of one encoder's Parquet files."""
    from pipeline.data.embed import embed_shards

    return embed_shards(filtered_shards, str(tmp_path_factory.mktemp("embeddings")), tiny_encoder_dir)["output"]
