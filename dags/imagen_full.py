"""imagen_full: URL list -> registered text-to-image cascade, the whole pipeline in one DAG.

    airflow dags trigger imagen_full --conf '{"root": "/data/imagen", "url_list": "/data/urls.parquet"}'
    IMAGEN_ALLOW_PRIVATE_NETWORKS=1 airflow dags test imagen_full -c '{"root": "/tmp/run",
        "url_list": "/tmp/tiny/urls.parquet", "encoder": "/tmp/tiny/t5-tiny", "max_steps": 20}'

download -> filter_shards -> plan_embed -> embed (mapped over batches of shards) ->
train_base64 | train_sr256 | train_sr1024 (in parallel, `gpu` pool) -> evaluate ->
register_<stage> for each stage + register_cascade.

Tasks are thin: one call into ``pipeline/`` each, only paths and small summaries through XCom,
heavy imports inside the tasks. Every step is idempotent: a retry or a second run with the same
conf skips finished shards, reuses a finished training run (same settings -> same checkpoint
directory) and registers nothing new. The per-phase DAGs (imagen_data, imagen_embed,
imagen_train_stage) rerun one phase.
"""

from __future__ import annotations

import os

from airflow.sdk import dag, task
from imagen_common import (
    CASCADE,
    DEFAULT_ARGS,
    GPU_POOL,
    MODELS,
    STAGES,
    cascade_chain,
    embed_batches,
    evaluate_once,
    full_params,
    one_output,
    register_once,
)


@dag(dag_id="imagen_full", schedule=None, catchup=False, params=full_params(),
     default_args=DEFAULT_ARGS, tags=["imagen"], doc_md=__doc__, max_active_runs=1)
def imagen_full():
    @task
    def download(params=None) -> str:
        from pipeline.data.download import download as run_download

        if not params["url_list"]:
            raise ValueError("set the url_list param to a Parquet/CSV/TSV/JSONL file of url,caption rows")
        out = os.path.join(params["root"], "raw")
        # Private networks: the workers' IMAGEN_ALLOW_PRIVATE_NETWORKS / IMAGEN_ALLOW_HOSTS, not a Param.
        run_download(params["url_list"], out, stages=tuple(params["stages"]), presets=params["presets"])
        return out

    @task
    def filter_shards(raw: str, params=None) -> str:
        from pipeline.data.filters import filter_shards as run_filter
        from pipeline.data.filters import format_reject_table, stage_config

        out = os.path.join(params["root"], "filtered")
        print(format_reject_table(run_filter(raw, out, stage_config(params["presets"], params["stages"]),
                                               samples_per_shard=params["filtered_shard_size"])))
        return out

    @task
    def plan_embed(filtered: str, params=None) -> list[list[str]]:
        from airflow.configuration import conf

        return embed_batches(filtered, params["embed_shards_per_task"], conf.getint("core", "max_map_length"))

    @task(map_index_template="{{ shard_batch }}")
    def embed(filtered: str, shards: list[str], params=None) -> dict:
        from airflow.sdk import get_current_context

        from pipeline.data.embed import embed_shards

        get_current_context()["shard_batch"] = f"{shards[0]}..{shards[-1]}"  # the map label in the UI
        return embed_shards(filtered, os.path.join(params["root"], "embeddings"), params["encoder"],
                            shards=shards)

    @task(pool=GPU_POOL)
    def train(stage: str, filtered: str, embedded: list[dict], params=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.train.launch import run_stage

        if stage not in params["stages"]:
            raise AirflowSkipException(f"{stage} is not in the stages param {params['stages']}")
        return run_stage(root=params["root"], stage=stage, preset=params["presets"].get(stage, "tiny"),
                         data=filtered, embeddings=one_output(embedded), max_steps=params["max_steps"],
                         launcher=params["launcher"], launcher_options=params["launcher_options"],
                         nodes=params["nodes"], procs_per_node=params["gpus_per_node"],
                         run_tag=params["run_tag"])

    @task(trigger_rule="none_failed")
    def evaluate(trained: list[dict | None], params=None) -> dict:
        """Every trained stage, into its own training run: the base stage's samples and prompt
        alignment, each SR stage's PSNR/SSIM against bicubic upsampling of the same input."""
        from airflow.sdk.exceptions import AirflowSkipException

        if not params["attributes"]:
            raise AirflowSkipException("no attributes param: nothing to evaluate against")
        return {t["stage"]: evaluate_once(t, params["attributes"], params["encoder"]) for t in trained if t}

    @task(trigger_rule="none_failed")
    def register(stage: str, trained: dict | None, params=None, outlet_events=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        if not trained:
            raise AirflowSkipException(f"{stage} was not trained in this run")
        result = register_once([trained["checkpoint"]], f"{params['model_prefix']}-{stage}", trained["run_id"])
        outlet_events[MODELS[stage]].extra = {"uri": result["uri"], "version": result["version"]}
        return result

    @task(trigger_rule="none_failed", outlets=[CASCADE])
    def register_cascade(trained: list[dict | None], params=None, outlet_events=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        # A cascade is a base stage followed by SR stages, in order; skipped stages drop out.
        if not trained[0]:
            raise AirflowSkipException("the cascade needs the base64 stage")
        ckpts, left_out = cascade_chain([t["checkpoint"] for t in trained if t])
        result = register_once(ckpts, f"{params['model_prefix']}-cascade")
        outlet_events[CASCADE].extra = {"uri": result["uri"], "version": result["version"]}
        return {**result, "left_out": left_out}

    filtered = filter_shards(download())
    embedded = embed.partial(filtered=filtered).expand(shards=plan_embed(filtered))
    trained = [train.override(task_id=f"train_{s}")(s, filtered, embedded) for s in STAGES]
    evaluated = evaluate(trained)
    for stage, result in zip(STAGES, trained, strict=True):
        evaluated >> register.override(task_id=f"register_{stage}", outlets=[MODELS[stage]])(stage, result)
    evaluated >> register_cascade(trained)


imagen_full()
