"""MLflow tracking helpers shared by train, evaluate, register, promote and sample.

The tracking store, one rule for every verb (``resolve_tracking_uri``)::

    uri = resolve_tracking_uri(explicit, root)   # --tracking-uri, else $MLFLOW_TRACKING_URI,
                                                 # else sqlite:///ROOT/mlflow.db of the run's root
    check_store(uri, "sample --model models:/x@champion")   # a verb that only reads: the store must exist

``root`` is the run's data root (``--root``; the ``metadata.root`` a checkpoint records; the
folder holding ``--data``); a remote root's SQLite file lives on this machine (pipeline/layout.py
``local_state``). With no explicit URI, no ``$MLFLOW_TRACKING_URI`` and no root there is no
default: the error says how to point at one (MLflow 3.7+ would otherwise open ``./mlflow.db``
in whatever directory the process runs in). Every verb prints the store it used
(``tracking_uri`` in its JSON line).

- ``RunLogger``: rank-0 logging that never kills training: a tracking server that is down
  gives one warning, and the metrics of that moment are skipped. A run made inside an Airflow
  task is tagged with its DAG, DAG run, task and try (``airflow_tags``, read from the
  ``AIRFLOW_CTX_*`` variables Airflow 3's task runner exports).
- ``log_to_run(client, run_id, ...)``: metrics, tags and artifacts added to a run that may have
  finished (evaluation into the training run) without reopening it: its status, start and end
  time stay as training left them.
- ``ensure_experiment``: the experiment, tagged to open in the MLflow UI's model-training view.
- ``code_version()`` (and ``pipeline.layout.manifest_sha256(filtered)``): the lineage that training records in
  every checkpoint and registration tags on every model version (which code, which data).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

log = logging.getLogger(__name__)


OFF = "off"  # --tracking-uri off: no tracking at all


TRACKING_ENV = "MLFLOW_TRACKING_URI"
STORE_FILE = "mlflow.db"  # the default SQLite store's file name, under the root's local state
# Airflow 3's task runner exports these to the task process (and its subprocesses):
# airflow/sdk/execution_time/context.py, AIRFLOW_VAR_NAME_FORMAT_MAPPING
AIRFLOW_CONTEXT = {"airflow.dag_id": "AIRFLOW_CTX_DAG_ID", "airflow.dag_run_id": "AIRFLOW_CTX_DAG_RUN_ID",
                   "airflow.task_id": "AIRFLOW_CTX_TASK_ID", "airflow.try_number": "AIRFLOW_CTX_TRY_NUMBER"}
# The MLflow 3 UI opens an experiment in its model-training view only with this tag (without
# it, it guesses the GenAI view)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# Params that name one fact twice: the config's text_encoder is the metadata's encoder_name
# (register refuses a checkpoint where they differ); the run keeps the second name only.
SAME_PARAM = {"text_encoder": "encoder_name"}


def resolve_tracking_uri(uri: str | None, root: str | None = None) -> str:
    """The tracking store: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///ROOT/mlflow.db``
    (``root``: a local folder, made here so SQLite can create the file). ValueError without any."""
    if uri:
        return uri
    if os.environ.get(TRACKING_ENV):
        return os.environ[TRACKING_ENV]
    if not root:
        raise ValueError(f"no MLflow tracking store: pass --tracking-uri URI, set {TRACKING_ENV}, or give the "
                         f"data root (--root ROOT: its {STORE_FILE}, where train and register log)")
    base = os.path.abspath(root)
    os.makedirs(base, exist_ok=True)
    return f"sqlite:///{os.path.join(base, STORE_FILE)}"


def sqlite_path(uri: str) -> str | None:
    """The file of a ``sqlite:///`` URI, None for any other store."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def check_store(uri: str, what: str) -> str:
    """``uri`` when it names a store that exists; a SQLite file that does not exist is an error
    (opening it would create an empty store) saying where it looked and how to point at one."""
    path = sqlite_path(uri)
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no MLflow store at {path} (looked there because of "
                                f"{_why(uri)}): pass --tracking-uri URI or --root ROOT of the store "
                                "the model was registered in, or set " + TRACKING_ENV)
    return uri


def _why(uri: str) -> str:
    return f"${TRACKING_ENV}" if os.environ.get(TRACKING_ENV) == uri else "--tracking-uri / --root"


def airflow_tags() -> dict[str, str]:
    """``airflow.dag_id``, ``airflow.dag_run_id``, ``airflow.task_id``, ``airflow.try_number`` of
    the Airflow task this process runs in (empty outside Airflow)."""
    return {tag: os.environ[env] for tag, env in AIRFLOW_CONTEXT.items() if os.environ.get(env)}


def run_params(params: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them: no None (an unset option is no param, not the string
    "None"), one name per fact (``SAME_PARAM``), each value cut to MLflow's 6000 characters."""
    out = {k: str(v)[:6000] for k, v in params.items() if v is not None}
    for dup, kept in SAME_PARAM.items():
        if dup in out and out.get(kept) == out[dup]:
            del out[dup]
    return out


def log_to_run(client, run_id: str, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
               artifacts: dict[str, str] | None = None, step: int = 0) -> None:
    """Add metrics, tags and artifacts (local path -> artifact folder) to run ``run_id`` through
    ``client`` without reopening it: a finished run keeps its status, start and end time."""
    import time as _time

    from mlflow.entities import Metric, RunTag

    now = int(_time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
    for path, folder in (artifacts or {}).items():
        client.log_artifact(run_id, path, artifact_path=folder)


def server_up(uri: str, timeout: float = 5.0) -> bool:
    """True when an MLflow server answers /health (the client itself would retry for minutes)."""
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def ensure_experiment(name: str, artifact_root: str | None = None) -> str:
    """Return the experiment id, creating it (with local artifacts under ``artifact_root``
    for a file/SQLite store) when missing; tagged to open in the UI's model-training view."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag, or by someone else
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    uri = mlflow.get_tracking_uri()
    if artifact_root and not uri.startswith(("http://", "https://")):
        location = "file://" + os.path.abspath(artifact_root)
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException as e:
        # made meanwhile by another process: imagen_full's stages start training at the same moment
        exp = mlflow.get_experiment_by_name(name) if e.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if exp is None:
            raise
        return exp.experiment_id


class RunLogger:
    """Wraps one MLflow run; every call is best-effort with a warning on failure."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None,
                 artifact_root: str | None = None, enabled: bool = True,
                 run_id: str | None = None, tags: dict[str, str] | None = None,
                 system_metrics: bool = True):
        self.enabled = enabled
        self.tracking_uri = tracking_uri  # the store, for the verb's JSON line
        self.run_id: str | None = None
        self._warned_at = float("-inf")
        if not enabled or tracking_uri == OFF:
            self.enabled = False
            return
        if tracking_uri.startswith(("http://", "https://")) and not server_up(tracking_uri):
            self._warn(f"MLflow server {tracking_uri} is not answering; training goes on without "
                       "tracking (checkpoints are unaffected)")
            self.enabled = False
            return
        try:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            exp_id = ensure_experiment(experiment, artifact_root)
            run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                                   run_name=run_name, tags={**airflow_tags(), **(tags or {})},
                                   log_system_metrics=system_metrics)
            self.run_id = run.info.run_id
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._warn(f"MLflow at {tracking_uri} unavailable ({e}); training goes on without it")
            self.enabled = False

    def _warn(self, msg: str) -> None:
        if time.monotonic() - self._warned_at > 60:
            log.warning(msg)
            self._warned_at = time.monotonic()

    def _call(self, fn_name: str, *args: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        try:
            import mlflow

            getattr(mlflow, fn_name)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self._warn(f"MLflow {fn_name} failed ({e}); skipped")

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", run_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        # asynchronous: a slow or flaky server never stalls a training step
        self._call("log_metrics", metrics, step=step, synchronous=False)

    def log_dict(self, d: dict[str, Any], name: str) -> None:
        self._call("log_dict", d, name)

    def log_image(self, image: Any, key: str, step: int) -> None:
        self._call("log_image", image, key=key, step=step)

    def log_dataset(self, uri: str, name: str, digest: str, context: str = "training") -> None:
        """Record ``uri`` (the filtered shards) as this run's dataset input: the runs table's
        Datasets column shows ``name`` and ``digest`` (the manifest's sha256), so runs trained on
        the same data line up. Metadata only; nothing is uploaded."""
        if not self.enabled:
            return
        try:
            import mlflow
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            with warnings.catch_warnings():
                # MLflow 3.17 registers LocalArtifactDatasetSource twice, so every local path is
                # "interpreted in multiple ways: LocalArtifactDatasetSource, LocalArtifactDatasetSource"
                # (a UserWarning on stderr, an ERROR line in a task log, on every train)
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in "
                                        "multiple ways", category=UserWarning)
                source = resolve_dataset_source(uri)
            dataset = MetaDataset(source, name=name, digest=digest[:16])
            mlflow.log_input(dataset, context=context)
        except Exception as e:  # noqa: BLE001
            self._warn(f"MLflow log_input failed ({e}); skipped")

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", tags)

    def end(self, status: str = "FINISHED") -> None:
        self._call("end_run", status=status)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"unet": {"channels": 32}} -> {"unet.channels": 32}, for log_params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def code_version() -> str:
    """This checkout's git commit (``-dirty`` appended when tracked files are modified), else,
    outside a checkout, the installed package's version (``imagen-pipeline==X``)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"imagen-pipeline=={version('imagen-pipeline')}"
        except PackageNotFoundError:
            return "unknown"
