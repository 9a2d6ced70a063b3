"""imagen_data: URL list -> raw shards (img2dataset) -> filtered shards. Phase 1 of imagen_full.

download -> retry_failed (the transient failures fetched again, ``retry_attempts`` times) -> filter_shards.

    airflow dags trigger imagen_data --conf '{"root": "/data/imagen", "url_list": "/data/urls.parquet"}'

Emits the ``imagen_raw_shards`` and ``imagen_filtered_shards`` Assets (their ``extra`` holds
the root and the folder), which schedule imagen_embed. Rerunning it with the same conf
skips every finished shard.
"""

from __future__ import annotations

from airflow.sdk import dag
from imagen_common import (
    DEFAULT_ARGS,
    FILTERED,
    RAW,
    data_params,
    download_task,
    filter_task,
    retry_task,
)


@dag(dag_id="imagen_data", schedule=None, catchup=False, params=data_params(),
     default_args=DEFAULT_ARGS, tags=["imagen"], doc_md=__doc__)
def imagen_data():
    filter_task(outlet=FILTERED)(retry_task(outlet=RAW)(download_task()()))


imagen_data()
