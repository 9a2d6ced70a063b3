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

from airflow.sdk import dag, task
from imagen_common import (
    CASCADE,
    DEFAULT_ARGS,
    GPU_POOL,
    MODELS,
    STAGES,
    download_task,
    embed_task,
    filter_task,
    full_params,
    one_output,
    plan_embed_task,
    train_stage,
)


@dag(dag_id="imagen_full", schedule=None, catchup=False, params=full_params(),
     default_args=DEFAULT_ARGS, tags=["imagen"], doc_md=__doc__, max_active_runs=1)
def imagen_full():
    @task(pool=GPU_POOL)
    def train(stage: str, filtered: str, embedded: list[dict], params=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        if stage not in params["stages"]:
            raise AirflowSkipException(f"{stage} is not in the stages param {params['stages']}")
        return train_stage(params, params["root"], stage, params["presets"].get(stage, "tiny"), filtered,
                           one_output(embedded))

    @task(trigger_rule="none_failed")
    def evaluate(trained: list[dict | None], params=None) -> dict:
        """Every trained stage, into its own training run: the base stage's samples and prompt
        alignment, each SR stage's PSNR/SSIM against bicubic upsampling of the same input."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.release.evaluate import evaluate_run

        if not params["attributes"]:
            raise AirflowSkipException("no attributes param: nothing to evaluate against")
        return {t["stage"]: evaluate_run(t, params["attributes"], params["encoder"]) for t in trained if t}

    @task(trigger_rule="none_failed")
    def register(stage: str, trained: dict | None, params=None, outlet_events=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.release.registry import register_trained

        if not trained:
            raise AirflowSkipException(f"{stage} was not trained in this run")
        result = register_trained(trained, params["model_prefix"])
        outlet_events[MODELS[stage]].extra = {"uri": result["uri"], "version": result["version"]}
        return result

    @task(trigger_rule="none_failed", outlets=[CASCADE])
    def register_cascade(trained: list[dict | None], params=None, outlet_events=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.release.registry import register_cascade as register_chain

        # A cascade is a base stage followed by SR stages, in order; skipped stages drop out.
        if not trained[0]:
            raise AirflowSkipException("the cascade needs the base64 stage")
        result = register_chain([t["checkpoint"] for t in trained if t], f"{params['model_prefix']}-cascade")
        outlet_events[CASCADE].extra = {"uri": result["uri"], "version": result["version"]}
        return result

    filtered = filter_task()(download_task()())
    embedded = embed_task().partial(filtered=filtered).expand(shards=plan_embed_task()(filtered))
    trained = [train.override(task_id=f"train_{s}")(s, filtered, embedded) for s in STAGES]
    evaluated = evaluate(trained)
    for stage, result in zip(STAGES, trained, strict=True):
        evaluated >> register.override(task_id=f"register_{stage}", outlets=[MODELS[stage]])(stage, result)
    evaluated >> register_cascade(trained)


imagen_full()
