"""imagen_embed: filtered shards -> frozen T5 embeddings, mapped over batches of shards.
Phase 2 of imagen_full.

Runs when imagen_data updates ``imagen_filtered_shards`` (the event says where the shards
are), or by hand:

    airflow dags trigger imagen_embed --conf '{"root": "/data/imagen", "encoder": "google/t5-v1_1-xxl"}'

Emits ``imagen_embeddings`` (``extra``: root and the embeddings folder of the encoder), which
schedules imagen_train_stage. Shards whose embeddings are up to date are skipped.
"""

from __future__ import annotations

import os

from airflow.sdk import dag, task
from imagen_common import (
    DEFAULT_ARGS,
    EMBEDDINGS,
    FILTERED,
    embed_batches,
    embed_params,
    one_output,
    upstream,
)


def _where(params, events) -> tuple[str, str]:
    """(root, filtered folder): from the imagen_data event that triggered this run, else params."""
    event = upstream(events, FILTERED)
    root = event.get("root", params["root"])
    return root, event.get("path", os.path.join(root, "filtered"))


@dag(dag_id="imagen_embed", schedule=[FILTERED], catchup=False, params=embed_params(),
     default_args=DEFAULT_ARGS, tags=["imagen"], doc_md=__doc__)
def imagen_embed():
    @task
    def plan_embed(params=None, triggering_asset_events=None) -> list[list[str]]:
        from airflow.configuration import conf

        _, filtered = _where(params, triggering_asset_events)
        return embed_batches(filtered, params["embed_shards_per_task"], conf.getint("core", "max_map_length"))

    @task(map_index_template="{{ shard_batch }}")
    def embed(shards: list[str], params=None, triggering_asset_events=None) -> dict:
        from airflow.sdk import get_current_context

        from pipeline.data.embed import embed_shards

        get_current_context()["shard_batch"] = f"{shards[0]}..{shards[-1]}"  # the map label in the UI
        root, filtered = _where(params, triggering_asset_events)
        return embed_shards(filtered, os.path.join(root, "embeddings"), params["encoder"], shards=shards)

    @task(outlets=[EMBEDDINGS])
    def publish(embedded: list[dict], params=None, triggering_asset_events=None, outlet_events=None) -> str:
        root, filtered = _where(params, triggering_asset_events)
        out = one_output(embedded)
        outlet_events[EMBEDDINGS].extra = {"root": root, "filtered": filtered, "path": out}
        return out

    publish(embed.expand(shards=plan_embed()))


imagen_embed()
