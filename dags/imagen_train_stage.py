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

from airflow.sdk import dag
from imagen_common import (
    DEFAULT_ARGS,
    EMBEDDINGS,
    GPU_POOL,
    MODELS,
    STAGE_MODEL,
    gate_stage,
    imagen_task,
    register_stage,
    run_layout,
    skip_full_run_events,
    stage_params,
    text_or_none,
    train_stage,
    upstream,
)


@dag(dag_id="imagen_train_stage", schedule=[EMBEDDINGS], catchup=False, params=stage_params(),
     default_args=DEFAULT_ARGS, tags=["imagen"], doc_md=__doc__)
def imagen_train_stage():
    @imagen_task(pool=GPU_POOL)
    def train(params=None, triggering_asset_events=None) -> dict:
        """Trains the `stage` (at `preset`) on the data the imagen_embeddings event points at, or
        the `root` Param's, in the `gpu` pool; a finished run with the same settings is reused.
        Skipped when imagen_full's event triggered the run (imagen_full trains it itself)."""
        from pipeline.data.embed import resolve_embeddings_dir

        skip_full_run_events(triggering_asset_events, EMBEDDINGS)
        layout = run_layout(params, triggering_asset_events, EMBEDDINGS)
        # the embeddings folder is the event's (its encoder's), else the Param, else the only one
        embeddings = (upstream(triggering_asset_events, EMBEDDINGS).get("path")
                      or text_or_none(params["embeddings"]) or resolve_embeddings_dir(layout.embeddings_root))
        return train_stage(params, layout, params["stage"], embeddings)

    @imagen_task()
    def evaluate(trained: dict, params=None) -> dict:
        """The stage on its held-out validation split, into its training run (as in imagen_full)."""
        from pipeline.release.evaluate import evaluate_run

        return evaluate_run(trained, text_or_none(params["attributes"]))

    @imagen_task(trigger_rule="none_failed", outlets=[STAGE_MODEL])
    def register(trained: dict | None, params=None, outlet_events=None) -> dict:
        """Registers the stage's final checkpoint as a new version of MODEL_PREFIX-<stage>
        (@challenger), or finds the one already registered; emits imagen_model_<stage>."""
        from airflow.sdk.exceptions import AirflowSkipException

        if not trained:
            raise AirflowSkipException("nothing was trained in this run")
        result = register_stage(params, trained)
        outlet_events[STAGE_MODEL].add(MODELS[trained["stage"]],
                                       extra={"uri": result["uri"], "version": result["version"]})
        return result

    @imagen_task(trigger_rule="none_failed")
    def promote(trained: dict | None, registered: dict | None, params=None) -> dict:
        """The new version becomes @champion only if it beats the champion (both scored here)."""
        return gate_stage(params, trained, registered)

    trained = train()
    registered = register(trained)
    evaluate(trained) >> registered
    promote(trained, registered)


imagen_train_stage()
