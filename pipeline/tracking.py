"""MLflow tracking helpers shared by train, evaluate and register.

- ``resolve_tracking_uri(uri, root)``: an explicit URI, else ``$MLFLOW_TRACKING_URI``, else a
  SQLite store under the data root (MLflow 3.7+ would otherwise create ``./mlflow.db`` in
  whatever directory the process happens to run in).
- ``RunLogger``: rank-0 logging that never kills training: a tracking server that is down
  gives one warning, and the metrics of that moment are skipped.
- ``code_version()`` (and ``pipeline.layout.manifest_sha256(filtered)``): the lineage that training records in
  every checkpoint and registration tags on every model version (which code, which data).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)


OFF = "off"  # --tracking-uri off: no tracking at all


def resolve_tracking_uri(uri: str | None, root: str | None = None) -> str:
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = os.path.abspath(root or ".")
    os.makedirs(base, exist_ok=True)
    return f"sqlite:///{os.path.join(base, 'mlflow.db')}"


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
    for a file/SQLite store) when missing."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    uri = mlflow.get_tracking_uri()
    if artifact_root and not uri.startswith(("http://", "https://")):
        location = "file://" + os.path.abspath(artifact_root)
    return mlflow.create_experiment(name, artifact_location=location)


class RunLogger:
    """Wraps one MLflow run; every call is best-effort with a warning on failure."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None,
                 artifact_root: str | None = None, enabled: bool = True,
                 run_id: str | None = None, tags: dict[str, str] | None = None,
                 system_metrics: bool = True):
        self.enabled = enabled
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
                                   run_name=run_name, tags=tags, log_system_metrics=system_metrics)
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
        self._call("log_params", {k: str(v)[:6000] for k, v in params.items()})

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

            dataset = MetaDataset(resolve_dataset_source(uri), name=name, digest=digest[:16])
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
