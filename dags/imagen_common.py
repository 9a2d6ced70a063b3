"""Shared parts of the imagen DAGs: the Params behind the trigger forms, the retry policy, the
Assets that chain the per-phase DAGs, and the few lines of glue a task needs around one call
into ``pipeline/``. Not a DAG file (``.airflowignore`` lists it); the DAG files import it.

    from imagen_common import DEFAULT_ARGS, FILTERED, data_params, embed_batches

Only light imports at module level (Airflow's SDK, ``imagen.config``, ``pipeline.train.launch``):
every DAG file imports this at parse time.

Deployment knobs (environment of the dag-processor and workers): ``IMAGEN_DATA_ROOT`` (the
default data root), ``IMAGEN_RETRIES`` and ``IMAGEN_RETRY_DELAY_SECONDS`` (retry policy),
``IMAGEN_ALLOW_PRIVATE_NETWORKS=1`` / ``IMAGEN_ALLOW_HOSTS=HOST:PORT,...`` (what the fetch guard
lets through: deployment settings, never trigger-form Params; ``pipeline.data.fetch_guard``).
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetAlias, Param

from imagen.config import PRESETS, STAGES
from pipeline.train.launch import launcher_names, launcher_options_schema

DEFAULT_ROOT = os.environ.get("IMAGEN_DATA_ROOT", "/tmp/imagen-data")
GPU_POOL = "gpu"  # `make airflow` creates it; its slots = trainings that may run at once

DEFAULT_ARGS = {
    "retries": int(os.environ.get("IMAGEN_RETRIES", "2")),
    "retry_delay": timedelta(seconds=float(os.environ.get("IMAGEN_RETRY_DELAY_SECONDS", "30"))),
    "retry_exponential_backoff": 2.0,  # 30 s, 60 s, 120 s ...
    "max_retry_delay": timedelta(minutes=30),
}

# Logical names: the data root is a run setting, so the URI names the kind of data and each
# asset event's ``extra`` carries the actual location.
RAW = Asset(name="imagen_raw_shards", uri="imagen://raw-shards")
FILTERED = Asset(name="imagen_filtered_shards", uri="imagen://filtered-shards")
EMBEDDINGS = Asset(name="imagen_embeddings", uri="imagen://embeddings")
MODELS = {s: Asset(name=f"imagen_model_{s}", uri=f"imagen://models/{s}") for s in STAGES}
CASCADE = Asset(name="imagen_model_cascade", uri="imagen://models/cascade")
STAGE_MODEL = AssetAlias("imagen_stage_model")  # imagen_train_stage emits the model of its stage

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def root_param() -> Param:
    return Param(DEFAULT_ROOT, type="string", minLength=1, title="Data root",
                 description="Path or fsspec URI: raw/, filtered/, embeddings/, checkpoints/ go under it")


def cascade_params() -> dict[str, Param]:
    """Which stages, at which preset's sizes: the download size, the filter's size floor and
    each stage's data all follow from their specs (``imagen.config.StageSpec``)."""
    return {
        "stages": Param(list(STAGES), type="array", minItems=1, uniqueItems=True,
                        items={"type": "string", "enum": list(STAGES)},
                        description="Cascade stages to train (the others are skipped)"),
        "presets": Param({s: "tiny" for s in STAGES}, type="object", additionalProperties=False,
                         properties={s: {"type": "string", "enum": list(PRESETS)} for s in STAGES},
                         description=('Model preset per stage, e.g. {"base64": "base64", '
                                      '"sr256": "sr256", "sr1024": "sr1024"} on GPUs')),
    }


def data_params() -> dict[str, Param]:
    """The data phase: downloaded once at the largest stage's size, ratio kept, never upscaled."""
    return {
        "root": root_param(),
        "url_list": Param("", type="string", title="URL list",
                          description="Parquet/CSV/TSV/JSONL file with url and caption columns"),
        **cascade_params(),
        "filtered_shard_size": Param(1000, type="integer", minimum=1,
                                     description="Samples per filtered shard (the unit of embed work)"),
    }


def embed_params() -> dict[str, Param]:
    return {
        "root": root_param(),
        "encoder": Param("google/t5-v1_1-xxl", type="string", minLength=1,
                         description="T5 hub name or a local directory saved with save_pretrained"),
        "embed_shards_per_task": Param(16, type="integer", minimum=1,
                                       description="Shards per mapped embed task"),
    }


def train_params() -> dict[str, Param]:
    """Settings shared by every training task (imagen_full and imagen_train_stage)."""
    return {
        "root": root_param(),
        "max_steps": Param(60, type="integer", minimum=1, description="Training steps per stage"),
        "launcher": Param("local", enum=launcher_names(),
                          description="local: torchrun here; kubernetes: a Kubeflow TrainJob"),
        # Typed fields only; image and volume claim must be in the deployment's allowlists
        # (IMAGEN_K8S_IMAGES, IMAGEN_K8S_VOLUME_CLAIMS), checked again where the TrainJob is rendered.
        "launcher_options": Param({}, **launcher_options_schema(), description=(
            'kubernetes only, e.g. {"image": "REGISTRY/imagen-pipeline:TAG", "namespace": "ml", '
            '"volume_claim": "imagen-data", "mount_path": "/data"}; image and volume claim from the '
            "deployment's IMAGEN_K8S_IMAGES / IMAGEN_K8S_VOLUME_CLAIMS")),
        "gpus_per_node": Param(1, type="integer", minimum=1, maximum=64,
                               description="Training processes per node (one per GPU)"),
        "nodes": Param(1, type="integer", minimum=1, maximum=1024, description="Training nodes"),
        "run_tag": Param("", type="string", pattern=r"^[A-Za-z0-9_.-]*$", description=(
            "Change it to train again from scratch; the same settings and tag reuse a finished run")),
        "model_prefix": Param("imagen", type="string", pattern=_NAME,
                              description="Registered models are PREFIX-<stage> and PREFIX-cascade"),
        "attributes": Param(None, type=["null", "string"], description=(
            "attributes.json of the tiny dataset: enables the prompt-alignment evaluation")),
    }


def full_params() -> dict[str, Param]:
    """The imagen_full trigger form: every phase's settings, stages and a preset per stage."""
    return {**data_params(), **embed_params(), **train_params()}


def stage_params() -> dict[str, Param]:
    """The imagen_train_stage trigger form."""
    return {
        **train_params(),
        "stage": Param("base64", enum=list(STAGES), description="Cascade stage to train"),
        "preset": Param("tiny", enum=list(PRESETS), description="Model preset"),
        "embeddings": Param(None, type=["null", "string"], description=(
            "Embeddings directory of one encoder (default: the only one under ROOT/embeddings)")),
    }


def upstream(events: Any, asset: Asset) -> dict[str, Any]:
    """``extra`` of the newest event of ``asset`` that triggered this run ({} for a manual run)."""
    found = list((events or {}).get(asset) or [])
    return dict(found[-1].extra or {}) if found else {}


def embed_batches(filtered: str, per_task: int, max_tasks: int) -> list[list[str]]:
    """Shard names in batches of at least ``per_task``, never more than ``max_tasks`` batches
    (Airflow's ``[core] max_map_length``)."""
    from pipeline import storage

    names = [storage.basename(u) for u in storage.list_shards(filtered, r"\d+\.tar")]
    if not names:
        raise ValueError(f"no filtered shards in {filtered}: run the filter step first")
    per_task = max(per_task, -(-len(names) // max_tasks))
    return [names[i:i + per_task] for i in range(0, len(names), per_task)]


def one_output(embedded: list[dict[str, Any]]) -> str:
    """The embeddings directory every mapped embed task wrote into."""
    # Index by length: iterating Airflow's lazy XCom sequence probes one past the end,
    # which logs a scary "XCom not found" error.
    outputs = {embedded[i]["output"] for i in range(len(embedded)) if embedded[i]}
    if len(outputs) != 1:
        raise ValueError(f"embed tasks wrote to {sorted(outputs)}; expected one directory")
    return outputs.pop()


def cascade_chain(checkpoints: list[str]) -> tuple[list[str], dict[str, str]]:
    """The base checkpoint followed by each SR checkpoint whose input size is the previous
    stage's output size; the others are left out with the reason (their own per-stage models
    are registered anyway), so mismatched presets cannot produce an unloadable cascade."""
    from imagen.checkpoint import load_config

    kept, left_out, prev = [checkpoints[0]], {}, load_config(checkpoints[0])[0].spec
    for ckpt in checkpoints[1:]:
        spec = load_config(ckpt)[0].spec
        error = spec.chain_error(prev)
        if error is None:
            kept.append(ckpt)
            prev = spec
        else:
            left_out[spec.stage] = error
    for stage, why in left_out.items():
        print(f"[register] WARNING: {stage} left out of the cascade: {why}", flush=True)
    return kept, left_out


def evaluate_once(trained: dict[str, Any], attributes: str, encoder: str | None = None) -> dict[str, Any]:
    """Evaluate a stage once per finished training run (``eval.json`` beside its checkpoints)."""
    from pipeline.release.evaluate import evaluate

    marker = os.path.join(os.path.dirname(trained["checkpoint"]), "eval.json")
    if os.path.exists(marker):
        with open(marker) as f:
            return {**json.load(f), "reused": True}
    result = evaluate(trained["checkpoint"], attributes=attributes, encoder=encoder,
                      run_id=_known_run(trained.get("run_id"), trained["checkpoint"]))
    with open(marker + ".tmp", "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    os.replace(marker + ".tmp", marker)
    return {**result, "reused": False}


def register_once(checkpoints: list[str], name: str, run_id: str | None = None) -> dict[str, Any]:
    """``pipeline.release.registry.register``, which gives back the version already made from these
    checkpoints (a rerun with the same conf registers nothing new), logging into the training
    run when this tracking store has it."""
    from pipeline.release.registry import register

    return register(checkpoints, name, run_id=_known_run(run_id, checkpoints[0]))


def _use_tracking_of(checkpoint: str) -> None:
    import mlflow

    from pipeline.tracking import resolve_tracking_uri, root_of

    mlflow.set_tracking_uri(resolve_tracking_uri(None, root_of(checkpoint)))


def _known_run(run_id: str | None, checkpoint: str) -> str | None:
    """``run_id`` if the current tracking store has it (a reused checkpoint may have been
    trained against another store), else None: log into a new run instead of failing."""
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    _use_tracking_of(checkpoint)
    try:
        mlflow.MlflowClient().get_run(run_id)
        return run_id
    except MlflowException:
        return None
