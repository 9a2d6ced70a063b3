"""Shared parts of the imagen DAGs: the Params behind the trigger forms, the retry policy, the
Assets that chain the per-phase DAGs, and the tasks more than one DAG runs (download, filter,
plan and embed; training's Params -> ``run_stage`` glue). Not a DAG file (``.airflowignore``
lists it); the DAG files import it.

    from imagen_common import DEFAULT_ARGS, FILTERED, data_params, download_task
    raw = download_task(outlet=RAW)()            # inside a @dag function: task "download"

The run's folders come from ``pipeline.layout.RunLayout(root)``, built inside each task from
the ``root`` Param (or the upstream Asset event's root); no folder name is joined here. Step
logic (evaluate once, register, the cascade chain, the promotion gate) lives in ``pipeline/release``.

Every task is declared with ``imagen_task`` (``@task`` over ``fail_fast``: an input error,
``ValueError`` or ``FileNotFoundError``, fails the task without retries; its docstring is the
task's docs in the UI) and checks the run's conf first (``check_conf``, the ``pre_execute`` of
``DEFAULT_ARGS``: a key that is no Param, such as ``max_stepz``, fails the run's first task,
naming the nearest Param; ``conf_schema(dag)`` is that conf's JSON schema, ``additionalProperties``
false). Params whose empty value means "none" (``optional_text``) are null by default and accept
null or "", so the trigger form submits with its defaults; read them with ``text_or_none``.

Each task that writes a folder of the root (download, filter, embed) holds the run lock on it
(``pipeline.lock``): a second run of that step on the same root fails at once, naming the holder.

Only light imports at module level (Airflow's SDK, ``imagen.config``, ``pipeline.train.launchers``,
``pipeline.data.embed_config``, ``pipeline.data.filter_config``): every DAG file imports this at parse time.

``launcher_options`` is one JSON object Param whose schema is every launcher's keys together
(a Param's schema cannot follow the ``launcher`` Param; see ``pipeline.train.launchers``); its
description lists each launcher's keys, and the train task checks the options against the
chosen launcher's own schema before anything starts (``pipeline.train.launch.run_stage``).

Deployment knobs (environment of the dag-processor and workers): ``IMAGEN_DATA_ROOT`` (the
default data root), ``IMAGEN_RETRIES`` and ``IMAGEN_RETRY_DELAY_SECONDS`` (retry policy),
``IMAGEN_ALLOW_PRIVATE_NETWORKS=1`` / ``IMAGEN_ALLOW_HOSTS=HOST:PORT,...`` (what the fetch guard
lets through: deployment settings, never trigger-form Params; ``pipeline.netguard``),
``IMAGEN_DOWNLOAD_DISTRIBUTOR`` (the ``distributor`` Param's default) and ``IMAGEN_SPARK_MASTER`` /
``IMAGEN_SPARK_MASTERS`` (the Spark clusters a download may run on; ``pipeline.data.spark``).
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, AssetAlias, Param, task

from imagen.config import PAPER_PRESETS, PRESETS, STAGES
from pipeline.data.embed_config import EmbedConfig
from pipeline.data.filter_config import FilterConfig
from pipeline.data.politeness import PolitenessConfig
from pipeline.train.launchers import launcher_names, launcher_options_schema, option_keys

DEFAULT_ROOT = os.environ.get("IMAGEN_DATA_ROOT", "/tmp/imagen-data")
GPU_POOL = "gpu"  # `make airflow` creates it; its slots = trainings that may run at once
FULL_DAG = "imagen_full"  # its Asset events say so: the per-phase DAGs leave its runs alone


# Airflow 3 validates each Param's value when a run is triggered but lets unknown conf keys through
# (`max_stepz` would train the preset's step count), and runs no DAG hook at trigger time: every task's
# `pre_execute` (DEFAULT_ARGS) checks the conf first, so the run's first task refuses it, not retried.
# Airflow serializes the hook's source into each task: keep it short.
def check_conf(context: Any) -> None:
    """The run's conf against its DAG's :func:`conf_schema`; see :func:`refuse_bad_conf`."""
    refuse_bad_conf(context["dag_run"].conf or {}, context["dag"].params)


DEFAULT_ARGS = {
    "retries": int(os.environ.get("IMAGEN_RETRIES", "2")),
    "retry_delay": timedelta(seconds=float(os.environ.get("IMAGEN_RETRY_DELAY_SECONDS", "30"))),
    "retry_exponential_backoff": 2.0,  # 30 s, 60 s, 120 s ...
    "max_retry_delay": timedelta(minutes=30),
    "pre_execute": check_conf,
}

# Logical names: the data root is a run setting, so the URI names the kind of data and each
# asset event's ``extra`` carries the actual location.
RAW = Asset(name="imagen_raw_shards", uri="imagen://raw-shards")
FILTERED = Asset(name="imagen_filtered_shards", uri="imagen://filtered-shards")
EMBEDDINGS = Asset(name="imagen_embeddings", uri="imagen://embeddings")
MODELS = {s: Asset(name=f"imagen_model_{s}", uri=f"imagen://models/{s}") for s in STAGES}
CASCADE = Asset(name="imagen_model_cascade", uri="imagen://models/cascade")
STAGE_MODEL = AssetAlias("imagen_stage_model")  # imagen_train_stage emits the model of its stage

# (?![\s\S]) is the end of the text in both Python (jsonschema's re.search) and the trigger form's
# JavaScript: a `$` there lets a trailing newline through (issue 24, item 8)
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(?![\s\S])"


def optional_text(title: str, description: str, **schema: Any) -> Param:
    """A text Param whose empty value means "none": null by default, null or "" accepted. Airflow
    3's trigger form counts a field whose type has no "null" as required and keeps Trigger disabled
    while it is empty (an emptied field sends null); read the value with :func:`text_or_none`."""
    return Param(None, type=["null", "string"], title=title, description=description, **schema)


def text_or_none(value: str | None) -> str | None:
    """An optional text Param's value: None for null, "" or blanks (the form, the CLI and REST send
    any of them for "none")."""
    return value if value and value.strip() else None


def root_param() -> Param:
    return Param(DEFAULT_ROOT, type="string", minLength=1, title="Data root",
                 description="Path or fsspec URI: raw/, filtered/, embeddings/, checkpoints/ go under it")


def cascade_params() -> dict[str, Param]:
    """Which stages, at which preset's sizes: the download size, the filter's size floor and
    each stage's data all follow from their specs (``imagen.config.StageSpec``)."""
    return {
        # `examples` makes Airflow 3's form render an array as a multi-select (its example DAG
        # example_params_ui_tutorial); `items.enum` is what validation enforces
        "stages": Param(list(STAGES), type="array", minItems=1, uniqueItems=True,
                        items={"type": "string", "enum": list(STAGES)}, examples=list(STAGES),
                        title="Stages", description="Cascade stages to train (the others are skipped)"),
        # The paper presets by default (imagen.config.resolve_presets: the one preset rule); the
        # smoke test, the demo and tests on the tiny data pass {"base64": "tiny", ...} explicitly.
        "presets": Param(dict(PAPER_PRESETS), type="object", additionalProperties=False,
                         properties={s: {"type": "string", "enum": list(PRESETS)} for s in STAGES},
                         title="Preset per stage",
                         description=('Model preset per stage: each stage\'s paper preset (base64, sr256, '
                                      'sr1024: 8-GPU sizes), or "tiny" for a CPU-sized model of the stage')),
    }


def data_params() -> dict[str, Param]:
    """The data phase: downloaded once at the largest stage's size, ratio kept, never upscaled."""
    return {
        "root": root_param(),
        "url_list": optional_text("URL list", "Parquet/CSV/TSV/JSONL file with url and caption columns "
                                  "(required to download; a run without one fails at once, saying so)"),
        **cascade_params(),
        "filtered_shard_size": Param(1000, type="integer", minimum=1, title="Samples per filtered shard",
                                     description="Samples per filtered shard (the unit of embed work)"),
        "val_fraction": Param(FilterConfig.val_fraction, type="number", minimum=0, exclusiveMaximum=1,
                              title="Validation fraction", description=(
                                  "Kept samples held out for validation (val-NNNNNN.tar), chosen once by a hash "
                                  "of their URL: stable across reruns and longer URL lists; 0: no validation split")),
        "val_max": Param(FilterConfig.val_max, type="integer", minimum=0, title="Validation cap",
                         description="At most this many validation samples (the smallest URL hashes)"),
        "distributor": Param(os.environ.get("IMAGEN_DOWNLOAD_DISTRIBUTOR", "multiprocessing"),
                             enum=["multiprocessing", "pyspark"], title="Download distributor", description=(
                                 "multiprocessing: img2dataset on the worker; pyspark: on Spark, one task per shard")),
        "spark_master": optional_text("Spark master", (
            "pyspark only. Empty: the deployment's IMAGEN_SPARK_MASTER (else local[1]); local[N], "
            "local-cluster[W,C,MB], or a cluster listed in IMAGEN_SPARK_MASTERS (infra/README.md)")),
        **politeness_params(),
    }


def politeness_params() -> dict[str, Param]:
    """Per-host politeness of the download (pipeline.data.politeness): per machine; on Spark per
    executor machine, so a cluster of M machines sends a host up to M times these."""
    p = PolitenessConfig()
    return {
        "per_host_connections": Param(p.connections, type="integer", minimum=0, title="Connections per host",
                                      description="Requests in flight to one host, per machine; 0: no cap"),
        "per_host_rate": Param(p.rate, type="number", minimum=0, title="Requests/s per host",
                               description="Request rate to one host, per machine; 0: no cap"),
        "per_host_burst": Param(p.burst, type="integer", minimum=1, title="Burst per host",
                                description="Requests a rested host gets at once"),
        "robots_txt": Param(p.robots_txt, type="boolean", title="Obey robots.txt", description=(
            "Ask each host's robots.txt (for img2dataset's user-agent token) and fetch nothing it disallows; "
            "turn off only for hosts you own or have leave to crawl")),
    }


def download_politeness(params: dict[str, Any]) -> dict[str, Any]:
    """The download's politeness options from the Params (a run of an older form: the defaults)."""
    p = PolitenessConfig()
    return {"per_host_connections": params.get("per_host_connections", p.connections),
            "per_host_rate": params.get("per_host_rate", p.rate),
            "per_host_burst": params.get("per_host_burst", p.burst),
            "robots_txt": params.get("robots_txt", p.robots_txt)}


def download_engine(params: dict[str, Any]) -> dict[str, Any]:
    """The download's distributor options from the Params (``pipeline.data.spark.master_for_run``)."""
    distributor = params.get("distributor") or "multiprocessing"
    if distributor != "pyspark":
        return {"distributor": distributor}
    from pipeline.data.spark import master_for_run

    return {"distributor": distributor, "spark_master": master_for_run(text_or_none(params.get("spark_master")))}


def embed_params() -> dict[str, Param]:
    return {
        "root": root_param(),
        "encoder": Param(EmbedConfig().encoder, type="string", minLength=1, title="Text encoder",
                         description="T5 hub name or a local directory saved with save_pretrained"),
        "embed_shards_per_task": Param(16, type="integer", minimum=1, title="Shards per embed task",
                                       description="Shards per mapped embed task"),
    }


def launcher_options_param() -> Param:
    """The ``launcher_options`` Param: typed fields only, the keys of every launcher (the
    task refuses those of another launcher than the chosen one). The kubernetes image and
    volume claim must be in the deployment's allowlists (IMAGEN_K8S_IMAGES,
    IMAGEN_K8S_VOLUME_CLAIMS), checked again where the TrainJob is rendered."""
    keys = "; ".join(f"{name}: {', '.join(option_keys(name)) or 'none'}" for name in launcher_names())
    return Param({}, **launcher_options_schema(), title="Launcher options", description=(
        f"Options of the chosen launcher ({keys}), e.g. for kubernetes "
        '{"image": "REGISTRY/imagen-pipeline:TAG", "namespace": "ml", "volume_claim": "imagen-data", '
        '"mount_path": "/data"}; image and volume claim from the deployment\'s IMAGEN_K8S_IMAGES / '
        "IMAGEN_K8S_VOLUME_CLAIMS"))


def train_params() -> dict[str, Param]:
    """Settings shared by every training task (imagen_full and imagen_train_stage)."""
    return {
        "root": root_param(),
        "max_steps": Param(None, type=["null", "integer"], minimum=1, title="Max steps", description=(
            "Training steps per stage; empty: each stage's preset's (the paper presets': 2.5M base, "
            "1.5M SR; the tiny preset's: 200)")),
        "launcher": Param("local", enum=launcher_names(), title="Launcher",
                          description="local: torchrun here; kubernetes: a Kubeflow TrainJob"),
        "launcher_options": launcher_options_param(),
        "gpus_per_node": Param(1, type="integer", minimum=1, maximum=64, title="GPUs per node",
                               description="Training processes per node (one per GPU)"),
        "nodes": Param(1, type="integer", minimum=1, maximum=1024, title="Nodes", description=(
            "Training nodes (torchrun --nnodes); local launcher: that many torchrun agents on this machine")),
        "run_tag": optional_text("Run tag", (
            "Empty: the same settings reuse a finished run; set a new tag to train again from scratch"),
            pattern=r"^[A-Za-z0-9_.-]*(?![\s\S])"),
        "model_prefix": Param("imagen", type="string", pattern=_NAME, title="Model name prefix",
                              description="Registered models are PREFIX-<stage> and PREFIX-cascade"),
        "weights_dtype": Param("fp32", enum=["fp32", "bf16"], title="Registered weights", description=(
            "bf16 halves what each registered version stores and uploads (a 2B base: 4 GB instead of 8); "
            "loading upcasts to fp32")),
        # pipeline.release.promotion: a new version is @challenger; the gate makes it @champion
        "promotion": Param("gate", enum=["gate", "never"], title="Promotion", description=(
            "gate: a new version becomes @champion only if it beats the current champion on the "
            "validation split (a first version does); never: every new version stays @challenger")),
        "promote_on": Param("val/loss", type="string", pattern=r"^[A-Za-z0-9_./-]+(:(min|max))?(?![\s\S])",
                            title="Promotion metric", description=(
                                "The gate's metric, METRIC[:min|max]: val/loss (both versions scored in the "
                                "promote task, lower wins) or one logged on each version's run, e.g. "
                                "eval/clip_score:max")),
        "attributes": optional_text("Attributes file", (
            "attributes.json of the tiny dataset: enables the prompt-alignment evaluation")),
    }


def full_params() -> dict[str, Param]:
    """The imagen_full trigger form: every phase's settings, stages and a preset per stage."""
    return {**data_params(), **embed_params(), **train_params()}


def stage_params() -> dict[str, Param]:
    """The imagen_train_stage trigger form."""
    return {
        **train_params(),
        "stage": Param("base64", enum=list(STAGES), title="Stage", description="Cascade stage to train"),
        "preset": Param(None, type=["null", "string"], enum=[None, *PRESETS], title="Preset", description=(
            "Model preset; empty: the stage's paper preset (imagen.config.resolve_presets); tiny: CPU-sized")),
        "embeddings": optional_text("Embeddings folder", (
            "Embeddings directory of one encoder (default: the only one under ROOT/embeddings)")),
    }


def _param_objects(params: Any) -> dict[str, Any]:
    """{name: Param} of a DAG, its ParamsDict or a dict of Params."""
    params = getattr(params, "params", params)
    return {k: params.get_param(k) if hasattr(params, "get_param") else params[k] for k in params}


def conf_schema(params: Any) -> dict[str, Any]:
    """The JSON schema of a run's conf for a DAG (or its Params): each Param's schema under its
    name, with its title and description, and no other key (``additionalProperties: false``)."""
    properties = {}
    for name, param in _param_objects(params).items():
        schema = dict(getattr(param, "schema", None) or {})
        if getattr(param, "description", None):
            schema.setdefault("description", param.description)
        properties[name] = schema
    return {"type": "object", "properties": properties, "additionalProperties": False}


def conf_problems(conf: Mapping[str, Any], params: Any) -> list[str]:
    """What is wrong with ``conf`` for a DAG's Params (:func:`conf_schema`): each unknown key with
    the nearest valid one, then each value its Param's schema refuses. Empty: the conf is good."""
    import jsonschema

    schema = conf_schema(params)
    known = sorted(schema["properties"])
    problems = []
    for key in sorted(set(conf) - set(known)):
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(known)}"
        problems.append(f"unknown conf key {key!r}: {hint}")
    checked = {"type": "object", "properties": schema["properties"]}  # unknown keys said above
    for error in jsonschema.Draft202012Validator(checked).iter_errors(dict(conf)):
        where = ".".join(str(p) for p in error.absolute_path) or "conf"
        problems.append(f"{where}: {error.message}")
    return problems


def refuse_bad_conf(conf: Mapping[str, Any], params: Any) -> None:
    """``AirflowFailException`` (no retry) naming each of :func:`conf_problems`, if any."""
    problems = conf_problems(conf, params)
    if problems:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("this run's conf is refused (not retried): " + "; ".join(problems)
                                   + ". Trigger again with the conf fixed")


def fail_fast(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A task body whose input errors fail the task at once: ``ValueError`` and
    ``FileNotFoundError`` are what our own input checks raise (a missing URL list or encoder
    folder, a bad Param, a shard that fails its checks): a retry would meet them again after the
    backoff, so they become ``AirflowFailException`` (no retry). Other errors (a lost worker, a
    lock held, a server down) keep the retry policy."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from pipeline import logs

        logs.quiet_progress_bars()  # Hugging Face's bars on stderr are ERROR lines in a task log
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"{e} ({type(e).__name__}: an input error, not retried; fix it "
                                       "and trigger again)") from e

    run.fails_fast = True  # tests/unit/test_dags.py checks every task body has it
    return run


def imagen_task(**kwargs: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@task(**kwargs)`` over :func:`fail_fast`: how every imagen DAG declares a task. The
    docstring is the task's docs in the UI (Airflow's ``doc_md``; a mapped task is given it here,
    as Airflow does that for unmapped tasks only)."""

    def decorate(fn: Callable[..., Any]) -> Any:
        return task(**{"doc_md": fn.__doc__, **kwargs})(fail_fast(fn))

    return decorate


def upstream(events: Any, asset: Asset) -> dict[str, Any]:
    """``extra`` of the newest event of ``asset`` that triggered this run ({} for a manual run)."""
    found = list((events or {}).get(asset) or [])
    return dict(found[-1].extra or {}) if found else {}


def embed_batches(filtered: str, per_task: int, max_tasks: int) -> list[list[str]]:
    """Shard names (training and validation) in batches of at least ``per_task``, never more than
    ``max_tasks`` batches (Airflow's ``[core] max_map_length``)."""
    from pipeline import storage
    from pipeline.data.split import shard_pattern

    names = [storage.basename(u) for u in storage.list_shards(filtered, shard_pattern(None))]
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


def run_layout(params: dict[str, Any], events: Any = None, asset: Asset = FILTERED) -> Any:
    """The run's :class:`~pipeline.layout.RunLayout`: the root of the ``asset`` event that
    triggered this run (imagen_embed, imagen_train_stage), else the ``root`` Param. Every folder
    of the run comes from it: the root is the one thing that travels (Param, Asset ``extra``);
    task outputs (XCom) are summaries for the UI and order the tasks, never a location."""
    from pipeline.layout import RunLayout

    return RunLayout(upstream(events, asset).get("root", params["root"]))


def task_holder(step: str, shared: bool = False) -> Any:
    """The run lock's holder (``pipeline.lock``) for the running task: a retry of the task replaces
    its own earlier try's lease; ``shared``: the mapped tasks of one DAG run hold it together."""
    from airflow.sdk import get_current_context

    from pipeline.lock import Holder

    ti = get_current_context()["ti"]
    run, index = f"{ti.dag_id}/{ti.run_id}", getattr(ti, "map_index", -1)
    task = f"Airflow task {run}/{ti.task_id}" + (f"[{index}]" if index is not None and index >= 0 else "")
    return Holder(step, group=run if shared else None, part=str(index) if shared else None, task=task)


def download_task(outlet: Asset | None = None):
    """Task ``download``: the URL list -> ``layout.raw`` (img2dataset behind the fetch guard);
    with ``outlet``, its event's ``extra`` says where."""

    @imagen_task(task_id="download", outlets=[outlet] if outlet else [])
    def download(params=None, outlet_events=None) -> str:
        """Downloads the URL list (`url_list`) into ROOT/raw with img2dataset, at the largest chosen
        stage's size, behind the fetch guard; finished shards are skipped on a rerun. Emits
        `imagen_raw_shards` (extra: root, path)."""
        from pipeline.data.download import download as run_download
        from pipeline.layout import RunLayout
        from pipeline.lock import hold

        url_list = text_or_none(params["url_list"])
        if not url_list:
            raise ValueError("the url_list param is empty: set it to a Parquet/CSV/TSV/JSONL file of url,caption "
                             "rows (trigger form field 'URL list')")
        layout = RunLayout(params["root"])
        # Private networks: the workers' IMAGEN_ALLOW_PRIVATE_NETWORKS / IMAGEN_ALLOW_HOSTS, not a Param.
        with hold(layout.raw, task_holder("download")):  # another run writing raw/ fails this task at once
            run_download(url_list, layout.raw, stages=tuple(params["stages"]),
                         presets=params["presets"], **download_engine(params), **download_politeness(params))
        if outlet:
            outlet_events[outlet].extra = {"root": layout.root, "path": layout.raw}
        return layout.raw

    return download


def filter_task(outlet: Asset | None = None):
    """Task ``filter_shards``: raw shards -> ``layout.filtered`` + the reject table in the log."""

    @imagen_task(task_id="filter_shards", outlets=[outlet] if outlet else [])
    def filter_shards(raw: str, params=None, outlet_events=None) -> str:  # raw: download's output (ordering)
        """Filters ROOT/raw into ROOT/filtered (size, caption, blank and near-duplicate checks, a
        held-out validation split) and prints the reject table; emits `imagen_filtered_shards`."""
        from pipeline.data.filters import filter_shards as run_filter
        from pipeline.data.filters import format_reject_table, stage_config
        from pipeline.layout import RunLayout
        from pipeline.lock import hold

        layout = RunLayout(params["root"])
        with hold(layout.filtered, task_holder("filter")):
            config = stage_config(params["presets"], params["stages"], val_fraction=params["val_fraction"],
                                  val_max=params["val_max"])
            manifest = run_filter(layout.raw, layout.filtered, config, samples_per_shard=params["filtered_shard_size"])
        print(format_reject_table(manifest))
        if outlet:
            outlet_events[outlet].extra = {"root": layout.root, "path": layout.filtered}
        return layout.filtered

    return filter_shards


def from_full_run(events: Any, asset: Asset) -> bool:
    """Whether the newest ``asset`` event that triggered this run came from imagen_full, which
    embeds and trains that data in its own run: the per-phase DAG then has nothing to do."""
    found = list((events or {}).get(asset) or [])
    return bool(found) and getattr(found[-1], "source_dag_id", None) == FULL_DAG


def skip_full_run_events(events: Any, asset: Asset) -> None:
    """Skip this run (and so its downstream tasks) when imagen_full's event triggered it."""
    if from_full_run(events, asset):
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException(f"triggered by {FULL_DAG}'s {asset.name} event: that run goes on with "
                                   "this data itself, nothing to do here")


def plan_embed_task():
    """Task ``plan_embed``: the filtered shards in batches, one per mapped embed task."""

    @imagen_task(task_id="plan_embed")
    def plan_embed(filtered: str | None = None, params=None, triggering_asset_events=None) -> list[list[str]]:
        """Lists ROOT/filtered and cuts the shards into batches, one mapped embed task each
        (`embed_shards_per_task`, at most Airflow's max_map_length batches)."""
        from airflow.configuration import conf

        skip_full_run_events(triggering_asset_events, FILTERED)
        layout = run_layout(params, triggering_asset_events)  # filtered (imagen_full): ordering only
        return embed_batches(layout.filtered, params["embed_shards_per_task"], conf.getint("core", "max_map_length"))

    return plan_embed


def embed_task(outlet: Asset | None = None):
    """Task ``embed`` (mapped over shard batches): captions -> ``layout.embeddings_root``/<encoder>;
    with ``outlet``, each batch's event says where (root, path) and which shards."""

    @imagen_task(task_id="embed", map_index_template="{{ shard_batch }}", outlets=[outlet] if outlet else [])
    def embed(shards: list[str], params=None, triggering_asset_events=None, outlet_events=None) -> dict:
        """Embeds one batch of filtered shards' captions with the frozen T5 encoder (`encoder`)
        into ROOT/embeddings/<encoder>, one Parquet per shard; shards already embedded are skipped."""
        from airflow.sdk import get_current_context

        from pipeline.data.embed import embed_shards
        from pipeline.lock import hold

        label = get_current_context()["shard_batch"] = f"{shards[0]}..{shards[-1]}"  # the map label in the UI
        layout = run_layout(params, triggering_asset_events)
        with hold(layout.embeddings_root, task_holder("embed", shared=True)):  # shared by this run's batches
            result = embed_shards(layout.filtered, layout.embeddings_root, params["encoder"], shards=shards)
        if outlet:
            outlet_events[outlet].extra = {"root": layout.root, "path": result["output"], "shards": label}
        return result

    return embed


def train_stage(params: dict[str, Any], layout: Any, stage: str, embeddings: str) -> dict[str, Any]:
    """``pipeline.train.launch.run_stage`` of ``stage`` of the run ``layout`` (its filtered
    shards, the embeddings folder given) with the training Params (``train_params``), at the
    preset the Params give it (``imagen.config.stage_preset``: the paper's unless named); it
    checks ``launcher_options`` against the chosen launcher's schema."""
    from imagen.config import stage_preset
    from pipeline.train.launch import run_stage

    # imagen_full names a preset per stage ("presets"), imagen_train_stage one for its stage ("preset")
    preset = stage_preset(params["presets"] if "presets" in params else params["preset"], stage)
    return run_stage(layout=layout, stage=stage, preset=preset, embeddings=embeddings,
                     max_steps=params["max_steps"], launcher=params["launcher"],
                     launcher_options=params["launcher_options"], nodes=params["nodes"],
                     procs_per_node=params["gpus_per_node"],
                     run_tag=text_or_none(params["run_tag"]) or "")  # "": run_stage's no-tag value


def gate_stage(params: dict[str, Any], trained: dict[str, Any] | None, registered: dict[str, Any] | None
               ) -> dict[str, Any]:
    """``pipeline.release.promotion.gate_trained`` with the promotion Params: the stage version
    ``register_trained`` returned becomes @champion only if it beats the champion on the
    validation split of the data it trained on. Skipped when nothing was registered or the
    ``promotion`` Param is "never"."""
    from airflow.sdk.exceptions import AirflowSkipException

    if not trained or not registered:
        raise AirflowSkipException("no stage version was registered in this run: nothing to promote")
    if params["promotion"] == "never":
        raise AirflowSkipException(f"promotion is 'never': {registered['name']} v{registered['version']} "
                                   "stays @challenger")
    from pipeline.release.promotion import gate_trained

    return gate_trained(trained, registered, params["promote_on"])


def register_stage(params: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
    """``pipeline.release.registry.register_trained`` with the registry Params."""
    from pipeline.release.registry import register_trained

    return register_trained(trained, params["model_prefix"], weights_dtype=params["weights_dtype"])


def register_chain(params: dict[str, Any], trained: list[dict[str, Any] | None]) -> dict[str, Any]:
    """``pipeline.release.registry.register_cascade`` of the stages trained in this run, in cascade
    order (skipped stages drop out), as ``<model_prefix>-cascade``."""
    from pipeline.release.registry import register_cascade

    return register_cascade([t["checkpoint"] for t in trained if t], f"{params['model_prefix']}-cascade",
                            weights_dtype=params["weights_dtype"])
