"""imagen_embed: filtered shards -> frozen T5 embeddings, mapped over batches of shards.
Phase 2 of imagen_full.

Runs when imagen_data updates ``imagen_filtered_shards`` (the event says where the shards
are), or by hand:

    airflow dags trigger imagen_embed --conf '{"root": "/data/imagen", "encoder": "google/t5-v1_1-xxl"}'

Emits ``imagen_embeddings`` (``extra``: root and the embeddings folder of the encoder), which
schedules imagen_train_stage. Shards whose embeddings are up to date are skipped.
"""

from __future__ import annotations

from airflow.sdk import dag
from imagen_common import (
    DEFAULT_ARGS,
    EMBEDDINGS,
    FILTERED,
    embed_params,
    embed_task,
    imagen_task,
    one_output,
    plan_embed_task,
    run_layout,
)


@dag(dag_id="imagen_embed", schedule=[FILTERED], catchup=False, params=embed_params(),
     default_args=DEFAULT_ARGS, tags=["imagen"], doc_md=__doc__)
def imagen_embed():
    @imagen_task(outlets=[EMBEDDINGS])
    def publish(embedded: list[dict], params=None, triggering_asset_events=None, outlet_events=None) -> str:
        """Emits imagen_embeddings once every batch is embedded (extra: root and the encoder's
        embeddings folder), which schedules imagen_train_stage."""
        layout = run_layout(params, triggering_asset_events)
        out = one_output(embedded)
        outlet_events[EMBEDDINGS].extra = {"root": layout.root, "path": out}
        return out

    publish(embed_task().expand(shards=plan_embed_task()()))


imagen_embed()
