"""imagen_train_stage: train, evaluate and register one cascade stage. Phase 3 of imagen_full.

Runs when imagen_embed updates ``imagen_embeddings`` (training the default stage on the data
the event points at), or by hand for any stage:

    airflow dags trigger imagen_train_stage --conf '{"root": "/data/imagen", "stage": "sr256",
        "preset": "sr256", "launcher": "kubernetes", "nodes": 4, "gpus_per_node": 8,
        "launcher_options": {"image": "REGISTRY/imagen-pipeline:TAG", "volume_claim": "imagen-data"}}'

The same settings reuse a finished training run; ``run_tag`` trains again. Registers
``<model_prefix>-<stage>`` (a new version is ``@challenger``) and emits that stage's model Asset
(``imagen_model_<stage>``); ``promote`` then makes the version ``@champion`` only if it beats the
current champion on the validation split (``pipeline.release.promotion``; the ``promotion`` and
``promote_on`` Params, as in imagen_full).

    train -> evaluate -> register -> promote
"""

from __future__ import annotations

from airflow.sdk import dag, task
from imagen_common import (
    DEFAULT_ARGS,
    EMBEDDINGS,
    GPU_POOL,
    MODELS,
    STAGE_MODEL,
    gate_stage,
    register_stage,
    run_layout,
    stage_params,
    train_stage,
    upstream,
)


@dag(dag_id="imagen_train_stage", schedule=[EMBEDDINGS], catchup=False, params=stage_params(),
     default_args=DEFAULT_ARGS, tags=["imagen"], doc_md=__doc__)
def imagen_train_stage():
    @task(pool=GPU_POOL)
    def train(params=None, triggering_asset_events=None) -> dict:
        from pipeline.data.embed import resolve_embeddings_dir

        layout = run_layout(params, triggering_asset_events, EMBEDDINGS)
        # the embeddings folder is the event's (its encoder's), else the Param, else the only one
        embeddings = (upstream(triggering_asset_events, EMBEDDINGS).get("path") or params["embeddings"]
                      or resolve_embeddings_dir(layout.embeddings_root))
        return train_stage(params, layout, params["stage"], embeddings)

    @task
    def evaluate(trained: dict, params=None) -> dict:
        """The stage on its held-out validation split, into its training run (as in imagen_full)."""
        from pipeline.release.evaluate import evaluate_run

        return evaluate_run(trained, params["attributes"])

    @task(trigger_rule="none_failed", outlets=[STAGE_MODEL])
    def register(trained: dict, params=None, outlet_events=None) -> dict:
        result = register_stage(params, trained)
        outlet_events[STAGE_MODEL].add(MODELS[trained["stage"]],
                                       extra={"uri": result["uri"], "version": result["version"]})
        return result

    @task(trigger_rule="none_failed")
    def promote(trained: dict, registered: dict | None, params=None) -> dict:
        """The new version becomes @champion only if it beats the champion (both scored here)."""
        return gate_stage(params, trained, registered)

    trained = train()
    registered = register(trained)
    evaluate(trained) >> registered
    promote(trained, registered)


imagen_train_stage()
