"""imagen_full: URL list -> registered text-to-image model, the whole pipeline in one DAG.

    airflow dags trigger imagen_full --conf '{"root": "/data/imagen", "url_list": "/data/urls.parquet"}'
    airflow dags test imagen_full -c '{"root": "/tmp/run", "url_list": "/tmp/tiny/urls.parquet",
                                        "encoder": "/tmp/tiny/t5-tiny", "allow_private_networks": true}'

Tasks are thin: each makes one call into ``pipeline/`` and passes paths (URIs) and small
summaries through XCom. Heavy imports happen inside the tasks, so parsing stays fast.
Training runs as a subprocess (``python -m pipeline.train`` or torchrun), like on a cluster.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Param, dag, task

DEFAULT_ROOT = os.environ.get("IMAGEN_DATA_ROOT", "/tmp/imagen-data")

PARAMS = {
    "root": Param(DEFAULT_ROOT, type="string", minLength=1,
                  description="Data root URI: raw/, filtered/, embeddings/, checkpoints/ go under it"),
    "url_list": Param("", type="string", description="Parquet/CSV/TSV/JSONL with url and caption columns"),
    "encoder": Param("google/t5-v1_1-xxl", type="string", description="T5 hub name or local directory"),
    "stage": Param("base64", enum=["base64", "sr256", "sr1024"], description="Cascade stage to train"),
    "preset": Param("tiny", enum=["tiny", "base64", "sr256", "sr1024"], description="Model preset"),
    "max_steps": Param(60, type="integer", minimum=1, description="Training steps"),
    "nproc_per_node": Param(1, type="integer", minimum=1, description="Training processes (GPUs)"),
    "image_size": Param(64, type="integer", minimum=8, description="Download resize (base stage: 64)"),
    "allow_private_networks": Param(False, type="boolean",
                                    description="Let the downloader fetch private/loopback addresses"),
    "model_name": Param("imagen-base64", type="string", description="Registered model name"),
}

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True}


@dag(dag_id="imagen_full", schedule=None, catchup=False, params=PARAMS, default_args=DEFAULT_ARGS,
     tags=["imagen"], doc_md=__doc__)
def imagen_full():
    @task
    def download(params=None) -> str:
        from pipeline.download import download as run_download

        if not params["url_list"]:
            raise ValueError("set the url_list param to a Parquet/CSV/TSV/JSONL file of url,caption rows")
        out = os.path.join(params["root"], "raw")
        run_download(params["url_list"], out, image_size=params["image_size"],
                     allow_private_networks=params["allow_private_networks"])
        return out

    @task
    def filter_shards(raw: str, params=None) -> str:
        from pipeline.filters import filter_shards as run_filter
        from pipeline.filters import format_reject_table

        out = os.path.join(params["root"], "filtered")
        print(format_reject_table(run_filter(raw, out)))
        return out

    @task
    def embed(filtered: str, params=None) -> str:
        from pipeline.embed import embed_shards

        return embed_shards(filtered, os.path.join(params["root"], "embeddings"), params["encoder"])["output"]

    @task
    def train(filtered: str, embeddings: str, params=None, run_id=None) -> dict:
        from pipeline.launch import train_subprocess

        ckpt = os.path.join(params["root"], "checkpoints", params["stage"], run_id.replace(":", "_"))
        args = ["--stage", params["stage"], "--preset", params["preset"], "--data", filtered,
                "--embeddings", embeddings, "--max-steps", str(params["max_steps"]),
                "--checkpoint-dir", ckpt, "--resume", "latest"]
        return train_subprocess(args, params["nproc_per_node"])

    @task
    def register(trained: dict, params=None) -> dict:
        from pipeline.registry import register as run_register

        return run_register([trained["checkpoint"]], params["model_name"], run_id=trained["run_id"])

    filtered = filter_shards(download())
    register(train(filtered, embed(filtered)))


imagen_full()
