"""imagen_full: URL list -> registered text-to-image cascade, the whole pipeline in one DAG.

    airflow dags trigger imagen_full --conf '{"root": "/data/imagen", "url_list": "/data/urls.parquet"}'
    IMAGEN_ALLOW_PRIVATE_NETWORKS=1 airflow dags test imagen_full -c '{"root": "/tmp/run",
        "url_list": "/tmp/tiny/urls.parquet", "encoder": "/tmp/tiny/t5-tiny", "max_steps": 20}'

download -> retry_failed -> filter_shards -> plan_embed -> embed (mapped over batches of shards) ->
train_base64 | train_sr256 | train_sr1024 (in parallel, `gpu` pool) -> evaluate ->
register_<stage> -> promote_<stage> for each stage, register_cascade -> promote_cascade
(after every promote_<stage>). retry_failed, filter_shards and embed emit the data Assets
(``imagen_raw_shards``, ``imagen_filtered_shards``, ``imagen_embeddings``; ``extra``: the run's
root and folder), register_* the model Assets: the Assets graph shows raw -> filtered ->
embeddings -> models. The per-phase DAGs those Assets schedule skip this DAG's events.

The trigger form submits with its defaults (only ``url_list`` must be set for the run to do
anything); conf keys that are no Param (``max_stepz``) fail the first task, naming the nearest
Param. Input errors (a missing URL list or encoder folder) fail their task at once, without
retries; other errors retry with backoff.

Promotion is a gate (``pipeline.release.promotion``): each new version is ``@challenger``;
``promote_<stage>`` scores it and the current ``@champion`` of that model on the held-out
validation split of the data it trained on, in that one task (``val/loss``, same samples,
timesteps and noise), and moves ``@champion`` only when it wins; a first version becomes
champion. ``promote_cascade`` promotes the cascade only if each of its stages is champion. The
decision and both figures go into the version's tags (``promotion.*``) and description. Params:
``promotion`` ("gate", or "never": every version stays challenger) and ``promote_on`` (another
metric, ``METRIC[:min|max]``, read from each version's run). A run made worse on purpose (a new
``run_tag`` with fewer ``max_steps``) registers a version that stays challenger.

Tasks are thin: one call into ``pipeline/`` each, only paths and small summaries through XCom,
heavy imports inside the tasks. Every step is idempotent: a retry or a second run with the same
conf skips finished shards, reuses a finished training run (same settings -> same checkpoint
directory), registers nothing new and leaves the aliases as they are. The per-phase DAGs
(imagen_data, imagen_embed, imagen_train_stage) rerun one phase.
"""

from __future__ import annotations

from airflow.sdk import dag
from imagen_common import (
    CASCADE,
    DEFAULT_ARGS,
    EMBEDDINGS,
    FILTERED,
    FULL_DAG,
    GPU_POOL,
    MODELS,
    RAW,
    STAGES,
    download_task,
    embed_task,
    filter_task,
    full_params,
    gate_stage,
    imagen_task,
    one_output,
    plan_embed_task,
    register_chain,
    register_stage,
    retry_task,
    run_layout,
    text_or_none,
    train_stage,
)


@dag(dag_id=FULL_DAG, schedule=None, catchup=False, params=full_params(),
     default_args=DEFAULT_ARGS, tags=["imagen"], doc_md=__doc__, max_active_runs=1)
def imagen_full():
    @imagen_task(pool=GPU_POOL)
    def train(stage: str, embedded: list[dict], params=None) -> dict:
        """Trains this cascade stage (torchrun here, or a Kubeflow TrainJob: `launcher`) on the run's
        filtered shards and embeddings, in the `gpu` pool, so the stages train side by side; a
        finished run with the same settings is reused (`run_tag` trains again). Skipped when the
        stage is not in `stages`."""
        from airflow.sdk.exceptions import AirflowSkipException

        if stage not in params["stages"]:
            raise AirflowSkipException(f"{stage} is not in the stages param {params['stages']}")
        return train_stage(params, run_layout(params), stage, one_output(embedded))

    @imagen_task(trigger_rule="none_failed")
    def evaluate(trained: list[dict | None], params=None) -> dict:
        """Every trained stage on its held-out validation split, side by side, each into its own
        training run: the base stage's samples of the prompt set and of validation captions, each
        SR stage's PSNR/SSIM against the real images next to bicubic's, with the guidance weight and
        augmentation level it then chooses for the stage (a small sweep, stored in the checkpoint's
        sampling.json, so the models registered next sample with them); prompt alignment with the
        ``attributes`` Param (tiny data); FID and CLIP score with the deployment's
        ``IMAGEN_FID_WEIGHTS`` / ``IMAGEN_CLIP_MODEL`` (else skipped, saying why)."""
        from pipeline.release.evaluate import evaluate_runs

        return evaluate_runs(list(trained), text_or_none(params["attributes"]), params["encoder"])

    @imagen_task(trigger_rule="none_failed")
    def register(stage: str, trained: dict | None, params=None, outlet_events=None) -> dict:
        """Registers the stage's final checkpoint as a new version of MODEL_PREFIX-<stage>
        (@challenger), or finds the version already registered for it; emits imagen_model_<stage>."""
        from airflow.sdk.exceptions import AirflowSkipException

        if not trained:
            raise AirflowSkipException(f"{stage} was not trained in this run")
        result = register_stage(params, trained)
        outlet_events[MODELS[stage]].extra = {"uri": result["uri"], "version": result["version"]}
        return result

    @imagen_task(trigger_rule="none_failed", outlets=[CASCADE])
    def register_cascade(trained: list[dict | None], params=None, outlet_events=None) -> dict:
        """Registers the stages trained in this run, in cascade order, as one MODEL_PREFIX-cascade
        version (base64 first; skipped stages drop out); emits imagen_model_cascade."""
        from airflow.sdk.exceptions import AirflowSkipException

        # A cascade is a base stage followed by SR stages, in order; skipped stages drop out.
        if not trained[0]:
            raise AirflowSkipException("the cascade needs the base64 stage")
        result = register_chain(params, trained)
        outlet_events[CASCADE].extra = {"uri": result["uri"], "version": result["version"]}
        return result

    @imagen_task(trigger_rule="none_failed")
    def promote(trained: dict | None, registered: dict | None, params=None) -> dict:
        """The new stage version becomes @champion only if it beats the champion (both scored here)."""
        return gate_stage(params, trained, registered)

    @imagen_task(trigger_rule="none_failed")
    def promote_cascade(cascade: dict | None, decisions: list[dict | None], params=None) -> dict:
        """The cascade version becomes @champion only if each of its stages is champion now."""
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline.release.promotion import gate_cascade

        if not cascade or params["promotion"] == "never":
            raise AirflowSkipException("no cascade registered, or promotion is 'never': it stays @challenger")
        return gate_cascade(cascade["name"], cascade["version"], decisions, root=params["root"])

    # The data Assets too, so the Assets graph shows raw -> filtered -> embeddings -> models; the
    # per-phase DAGs they schedule skip events of this DAG (imagen_common.skip_full_run_events).
    filtered = filter_task(outlet=FILTERED)(retry_task(outlet=RAW)(download_task()()))
    embedded = embed_task(outlet=EMBEDDINGS).expand(shards=plan_embed_task()(filtered))
    trained = [train.override(task_id=f"train_{s}")(s, embedded) for s in STAGES]
    evaluated = evaluate(trained)
    decisions = []
    for stage, result in zip(STAGES, trained, strict=True):
        registered = register.override(task_id=f"register_{stage}", outlets=[MODELS[stage]])(stage, result)
        evaluated >> registered
        decisions.append(promote.override(task_id=f"promote_{stage}")(result, registered))
    cascade = register_cascade(trained)
    evaluated >> cascade
    promote_cascade(cascade, decisions)


imagen_full()
