"""imagen_data: URL list -> raw shards (img2dataset) -> filtered shards. Phase 1 of imagen_full.

    airflow dags trigger imagen_data --conf '{"root": "/data/imagen", "url_list": "/data/urls.parquet"}'

Emits the ``imagen_raw_shards`` and ``imagen_filtered_shards`` Assets (their ``extra`` holds
the root and the folder), which schedule imagen_embed. Rerunning it with the same conf
skips every finished shard.
"""

from __future__ import annotations

import os

from airflow.sdk import dag, task
from imagen_common import DEFAULT_ARGS, FILTERED, RAW, data_params


@dag(dag_id="imagen_data", schedule=None, catchup=False, params=data_params(),
     default_args=DEFAULT_ARGS, tags=["imagen"], doc_md=__doc__)
def imagen_data():
    @task(outlets=[RAW])
    def download(params=None, outlet_events=None) -> str:
        from pipeline.data.download import download as run_download

        if not params["url_list"]:
            raise ValueError("set the url_list param to a Parquet/CSV/TSV/JSONL file of url,caption rows")
        out = os.path.join(params["root"], "raw")
        # Private networks: the workers' IMAGEN_ALLOW_PRIVATE_NETWORKS / IMAGEN_ALLOW_HOSTS, not a Param.
        run_download(params["url_list"], out, stages=tuple(params["stages"]), presets=params["presets"])
        outlet_events[RAW].extra = {"root": params["root"], "path": out}
        return out

    @task(outlets=[FILTERED])
    def filter_shards(raw: str, params=None, outlet_events=None) -> str:
        from pipeline.data.filters import filter_shards as run_filter
        from pipeline.data.filters import format_reject_table, stage_config

        out = os.path.join(params["root"], "filtered")
        print(format_reject_table(run_filter(raw, out, stage_config(params["presets"], params["stages"]),
                                               samples_per_shard=params["filtered_shard_size"])))
        outlet_events[FILTERED].extra = {"root": params["root"], "path": out}
        return out

    filter_shards(download())


imagen_data()
