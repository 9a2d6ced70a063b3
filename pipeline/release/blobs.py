"""Content-addressed files of registered models: each distinct file stored once per tracking store.

    store = BlobStore.open(client, artifact_root)         # the store's one "imagen-blobs" run
    ref = store.put("/ckpt/final/ema.safetensors")        # uploaded only if no blob has its sha256
    # {"uri": "runs:/<run>/sha256/<hex>/ema.safetensors", "sha256": "<hex>", "size": 3393780}
    stage_dir = assemble(entries, stored_dir, work_dir, "models:/imagen-cascade@champion: stage_0")

A registered model (pipeline/release/registry.py) keeps only small files in its own artifacts
(each stage's config.json); its weights and its text encoder's files live in the run tagged
``imagen.blob_store`` of experiment ``imagen-blobs``, at ``sha256/<hex>/<first name>``. The
model's MLmodel lists every file of every artifact with its sha256 and size under
``flavors.python_function.config.files`` (MLflow's ``model_config``)::

    files:
      stage_0:
        config.json:       {sha256: ..., size: 1595}                        # in the model itself
        ema.safetensors:   {sha256: ..., size: 4540484, uri: runs:/<run>/sha256/<hex>/ema.safetensors}
      text_encoder:
        spiece.model:      {sha256: ..., size: ..., uri: runs:/<run>/sha256/<hex>/spiece.model}

So a stage model, the cascade made of it, a re-registration under another name and every model
using one encoder share one copy of each file; ``put`` lists ``sha256/<hex>`` first and uploads
nothing that is already there. ``assemble`` rebuilds an artifact's folder from the model's own
files and the referenced blobs (downloaded through the same tracking server, ``runs:/`` URIs
only) and checks every file's sha256 and size, refusing a mismatch with the file's name.

Uploads: ``upload_settings`` sets MLflow's upload variables for the registration unless the
operator set them (see ``UPLOAD_DEFAULTS``); ``put`` itself retries a failed upload whole.
Blobs are never deleted by this code: deleting the ``imagen-blobs`` run breaks every model.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

BLOB_EXPERIMENT = "imagen-blobs"
BLOB_TAG = "imagen.blob_store"  # run tag; its value is the layout version
BLOB_LAYOUT = "sha256-v1"
FILES_KEY = "files"  # model_config key of the per-artifact file lists

# MLflow's own upload settings, set during registration unless already in the environment (names
# from mlflow/environment_variables.py, mlflow 3.17):
UPLOAD_DEFAULTS = {
    # mlflow-artifacts (a tracking server proxying S3 / GCS / Azure Blob): upload files from
    # MINIMUM_FILE_SIZE up in CHUNK_SIZE parts straight to the object store through presigned
    # URLs, instead of one multi-GB PUT through the server (mlflow #7564: 504s). A server whose
    # destination is a local folder answers "not supported" and MLflow falls back to one PUT.
    # The client must reach the object store: set it to false where only the server can.
    "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
    "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(100 << 20),
    # 100 MiB parts: S3 allows 10,000 parts, so files up to ~1 TB (MLflow's 10 MiB: ~100 GB)
    "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE": str(100 << 20),
    # Databricks / Azure Data Lake artifact stores: multipart (MLflow's default, made explicit)
    "MLFLOW_ENABLE_MULTIPART_UPLOAD": "true",
    # every request to a tracking server (each PUT, each part's credentials): retried with
    # exponential backoff on connection errors and 429/5xx, and given time for a big body
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "600",
    # direct GCS (resumable upload in chunks) and GCS / Azure Blob upload timeouts
    "MLFLOW_GCS_UPLOAD_CHUNK_SIZE": str(100 << 20),
    "MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT": "600",
}
UPLOAD_ATTEMPTS = 3  # a whole-file retry above MLflow's: a failed multipart upload is aborted, not resumed
_HEX = re.compile(r"[0-9a-f]{64}")
_REF = re.compile(r"runs:/([A-Za-z0-9_-]+)/sha256/([0-9a-f]{64})/([^/\\]+)")


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_entry(path: str) -> dict[str, Any]:
    """The manifest entry of a file the model stores itself."""
    return {"sha256": sha256_file(path), "size": os.path.getsize(path)}


@contextlib.contextmanager
def upload_settings() -> Iterator[None]:
    """``UPLOAD_DEFAULTS`` in the environment for the block, except those already set there."""
    added = [k for k in UPLOAD_DEFAULTS if k not in os.environ]
    os.environ.update({k: UPLOAD_DEFAULTS[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class BlobStore:
    """The ``imagen-blobs`` run of one tracking store; ``put`` counts what it uploads and reuses."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.uploaded_bytes = self.reused_bytes = self.uploaded_files = self.reused_files = 0

    @classmethod
    def open(cls, client, artifact_root: str | None = None) -> BlobStore:
        """The store's blob run, created when missing. Two registrations creating it at once both
        keep the oldest (the other deletes its own)."""
        from mlflow.exceptions import MlflowException

        from pipeline.tracking import ensure_experiment

        try:
            exp_id = ensure_experiment(BLOB_EXPERIMENT, artifact_root)
        except MlflowException:  # created by a concurrent registration between lookup and create
            exp_id = client.get_experiment_by_name(BLOB_EXPERIMENT).experiment_id
        found = cls._runs(client, exp_id)
        if found:
            return cls(client, found[0].info.run_id)
        mine = client.create_run(exp_id, run_name="blobs", tags={
            BLOB_TAG: BLOB_LAYOUT, "mlflow.note.content": "Weights and text encoder files of registered "
            "imagen models, one per sha256 (pipeline/release/blobs.py). Models reference them: never delete."})
        client.set_terminated(mine.info.run_id)
        oldest = cls._runs(client, exp_id)[0].info.run_id
        if oldest != mine.info.run_id:
            client.delete_run(mine.info.run_id)
        return cls(client, oldest)

    @staticmethod
    def _runs(client, exp_id: str) -> list:
        runs = client.search_runs([exp_id], filter_string=f"tags.`{BLOB_TAG}` = '{BLOB_LAYOUT}'", max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def _existing(self, digest: str, size: int) -> str | None:
        """Artifact path of a complete blob with this sha256 (a torn upload has another size)."""
        for f in self.client.list_artifacts(self.run_id, f"sha256/{digest}"):
            if not f.is_dir and (f.file_size is None or int(f.file_size) == size):
                return f.path
        return None

    def put(self, path: str) -> dict[str, Any]:
        """Store the file at ``path`` unless a blob with its sha256 is there; its manifest entry."""
        digest, size = sha256_file(path), os.path.getsize(path)
        found = self._existing(digest, size)
        if found is not None:
            self.reused_bytes += size
            self.reused_files += 1
            return {"uri": f"runs:/{self.run_id}/{found}", "sha256": digest, "size": size}
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                self.client.log_artifact(self.run_id, path, f"sha256/{digest}")
                found = self._existing(digest, size)
                if found is None:
                    raise OSError(f"sha256/{digest} in run {self.run_id} is incomplete after the upload")
                break
            except Exception as e:
                if attempt == UPLOAD_ATTEMPTS:
                    raise RuntimeError(
                        f"uploading {path} ({size} bytes) to run {self.run_id} of experiment {BLOB_EXPERIMENT} "
                        f"failed {attempt} times, last: {type(e).__name__}: {str(e)[:300]}: check the artifact "
                        "store; where the client cannot reach the object store behind the tracking server, "
                        "set MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD=false") from None
                print(f"[register] upload of {os.path.basename(path)} failed ({type(e).__name__}); attempt "
                      f"{attempt + 1} of {UPLOAD_ATTEMPTS}", file=sys.stderr, flush=True)
                time.sleep(2.0 * 2 ** (attempt - 1))
        self.uploaded_bytes += size
        self.uploaded_files += 1
        return {"uri": f"runs:/{self.run_id}/{found}", "sha256": digest, "size": size}

    def summary(self) -> dict[str, Any]:
        return {"blob_run": self.run_id, "uploaded_files": self.uploaded_files,
                "uploaded_bytes": self.uploaded_bytes, "reused_files": self.reused_files,
                "reused_bytes": self.reused_bytes}


def safe_relpath(rel: Any) -> bool:
    """A relative path inside a folder: no absolute path, no '..', no backslash or empty part."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def read_manifest(config: dict[str, Any], where: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``config[FILES_KEY]`` (artifact -> relative path -> entry), checked; {} for a model
    registered before files were listed (its files are all inside it, unverified)."""
    files = config.get(FILES_KEY)
    if files is None:
        return {}
    bad = f"{where}: MLmodel config '{FILES_KEY}' is malformed"
    if not isinstance(files, dict):
        raise ValueError(f"{bad}: register the model again")
    for art, entries in files.items():
        if not isinstance(entries, dict) or not entries:
            raise ValueError(f"{bad} at {art!r}: register the model again")
        for rel, e in entries.items():
            ok = (safe_relpath(rel) and isinstance(e, dict) and isinstance(e.get("sha256"), str)
                  and _HEX.fullmatch(e["sha256"]) and isinstance(e.get("size"), int) and e["size"] >= 0)
            uri = e.get("uri") if isinstance(e, dict) else None
            if ok and uri is not None:
                m = _REF.fullmatch(uri) if isinstance(uri, str) else None
                ok = m is not None and m.group(2) == e["sha256"]
            if not ok:
                raise ValueError(f"{bad} at {art}/{rel} ({e!r}): entries are {{sha256, size[, uri: "
                                 "runs:/RUN/sha256/HEX/NAME]}}; register the model again")
    return files


def verify(path: str, entry: dict[str, Any], what: str) -> None:
    """ValueError naming ``what`` unless the file at ``path`` has the entry's size and sha256."""
    size = os.path.getsize(path)
    digest = sha256_file(path) if size == entry["size"] else None
    if digest != entry["sha256"]:
        found = f"{size} bytes" if digest is None else f"sha256 {digest[:16]}..."
        where = f" (from {entry['uri']})" if entry.get("uri") else ""
        fix = ("the stored blob is damaged: delete that artifact from the run and register the checkpoint "
               "again" if entry.get("uri") else "the model's files were altered: register it again")
        raise ValueError(f"{what}: {found}, the model records {entry['size']} bytes with sha256 "
                         f"{entry['sha256'][:16]}...{where}; refusing to load it: {fix}")


def _download(uri: str, target: str, scratch: str, what: str) -> None:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    os.makedirs(scratch, exist_ok=True)
    try:
        got = download_artifacts(artifact_uri=uri, dst_path=scratch)
    except (MlflowException, OSError) as e:
        import mlflow

        first = (getattr(e, "message", None) or str(e)).splitlines()[0]
        raise RuntimeError(f"{what}: cannot download {uri} from {mlflow.get_tracking_uri()} ({first}): the "
                           "model references files in the tracking store it was registered in; point "
                           "--tracking-uri / MLFLOW_TRACKING_URI there") from None
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(got, target)


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def assemble(entries: dict[str, dict[str, Any]], stored: str | None, target: str, what: str) -> str:
    """Folder ``target`` with exactly the files of ``entries``: linked from ``stored`` (what the
    model holds itself) or downloaded from their ``uri``, each checked against its sha256 and
    size. ``what`` names the artifact in messages. Returns ``target``."""
    scratch = target.rstrip("/") + ".download"
    fetched: dict[str, str] = {}  # sha256 -> a checked file already here (model == ema, say)
    try:
        for rel, entry in sorted(entries.items()):
            dst = os.path.join(target, *rel.split("/"))
            if entry.get("uri") and entry["sha256"] in fetched:
                _link(fetched[entry["sha256"]], dst)
            elif entry.get("uri"):
                _download(entry["uri"], dst, scratch, f"{what}/{rel}")
            else:
                src = os.path.join(stored, *rel.split("/")) if stored else ""
                if not os.path.isfile(src):
                    raise FileNotFoundError(f"{what}/{rel}: listed in the model's MLmodel but not stored in "
                                            "it: register the model again")
                _link(src, dst)
            verify(dst, entry, f"{what}/{rel}")
            fetched[entry["sha256"]] = dst
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
