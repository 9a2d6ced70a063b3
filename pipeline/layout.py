"""The folder layout of one run under its data root: the one place a folder name is joined on.

    from pipeline.layout import RunLayout
    layout = RunLayout("s3://bucket/run")        # or a local path; relative paths are made absolute
    layout.raw, layout.filtered, layout.manifest  # s3://bucket/run/raw, .../filtered, .../filtered/manifest.json
    layout.embeddings_root, layout.embeddings("t5-v1_1-xxl")
    layout.checkpoints("base64", "tiny-0123abcd")  # .../checkpoints/base64/tiny-0123abcd
    layout.tracking_uri()                          # the MLflow store of the run (see below)
    layout.locks("raw")                            # .../_locks/raw: leases of the run lock on raw/

Every property is a URI string built with :func:`pipeline.storage.join`, so a local path and an
``s3://`` / ``gs://`` URI take the same code path. The DAGs build a layout from their ``root``
Param, the CLI from ``--root``, and pass it (or its ``root`` string, through XCom and argv)
down to the steps; nothing parses a path to find the root again: training records the root in
every checkpoint's metadata (``config.json`` -> ``metadata.root``) and in ``result.json``.

The tracking store: ``$MLFLOW_TRACKING_URI`` when set, else a SQLite file under the root
(``ROOT/mlflow.db``, artifacts in ``ROOT/mlartifacts``) for a local root. SQLite cannot live on
an object store, so a remote root without ``$MLFLOW_TRACKING_URI`` gets a SQLite file on this
machine, one per root (``$IMAGEN_TRACKING_DIR``, default ``<tmp>/imagen-tracking/<hash>``), with
artifacts there too; set ``MLFLOW_TRACKING_URI`` to a server for anything shared.
Training, evaluation and registration all ask the layout, so they land in the same store.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.tracking import resolve_tracking_uri

TRACKING_DIR_ENV = "IMAGEN_TRACKING_DIR"  # where a remote root's local MLflow store lives


@dataclass(frozen=True)
class RunLayout:
    """The run's folders under ``root`` (a local path or an fsspec URI)."""

    root: str

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("the data root is empty: pass a local path or an fsspec URI (s3://bucket/run)")
        # Local roots are absolute, so a checkpoint's recorded root means the same from any cwd.
        object.__setattr__(self, "root", storage.normalize(self.root))

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.root)

    @property
    def raw(self) -> str:
        """img2dataset's output: ``000000.tar`` ... with their ``_stats.json``."""
        return storage.join(self.root, "raw")

    @property
    def filtered(self) -> str:
        """The filter step's even shards (and its restartable state in ``_filter/``)."""
        return storage.join(self.root, "filtered")

    @property
    def manifest(self) -> str:
        """The filter step's manifest: input shards, settings, counts (hashed into lineage)."""
        return storage.join(self.filtered, "manifest.json")

    @property
    def embeddings_root(self) -> str:
        """Where the embed step writes one folder per encoder."""
        return storage.join(self.root, "embeddings")

    def embeddings(self, encoder_dir: str) -> str:
        """The embeddings folder of one encoder (its folder name under ``embeddings/``)."""
        return storage.join(self.embeddings_root, encoder_dir)

    def checkpoints(self, stage: str, run: str | None = None) -> str:
        """``checkpoints/<stage>``, or one training run's folder under it (step-N/, final/,
        result.json, eval.json)."""
        parts = [stage] if run is None else [stage, run]
        return storage.join(self.root, "checkpoints", *parts)

    @property
    def artifacts(self) -> str:
        """MLflow artifacts of the default (SQLite) store."""
        return os.path.join(self.local_state, "mlartifacts") if not self.is_local else storage.join(
            self.root, "mlartifacts")

    @property
    def local_state(self) -> str:
        """A folder on this machine for what cannot live on the root itself (a remote root's
        SQLite store); the root itself for a local root."""
        if self.is_local:
            return self.root
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:12]
        return os.path.join(os.environ.get(TRACKING_DIR_ENV) or os.path.join(
            tempfile.gettempdir(), "imagen-tracking"), digest)

    def tracking_uri(self, explicit: str | None = None) -> str:
        """``explicit``, else ``$MLFLOW_TRACKING_URI``, else the run's SQLite store (made here)."""
        return resolve_tracking_uri(explicit, self.local_state)

    def evaluation(self, run_dir: str) -> str:
        """Grids of one evaluated training run (``<run>/eval``); its marker is ``eval.json``."""
        return storage.join(run_dir, "eval")

    @staticmethod
    def eval_marker(run_dir: str) -> str:
        return storage.join(run_dir, "eval.json")

    def locks(self, folder: str) -> str:
        """The run lock's leases on one folder of the run (``raw``, ``filtered``, ``embeddings``):
        ``_locks/<folder>/``, one lease file per holder (pipeline/lock.py owns their format)."""
        return storage.join(self.root, "_locks", folder)

    @classmethod
    def around(cls, data: str) -> RunLayout:
        """The CLI's default when ``--root`` is not given: the folder holding ``--data``
        (``ROOT/filtered``), as the README's commands lay a run out."""
        return cls(storage.parent(storage.normalize(data)))


def checkpoint_tracking(meta: dict[str, Any], uri: str | None = None) -> tuple[str, str | None]:
    """(tracking URI, local artifact root or None) for a checkpoint with metadata ``meta``:
    ``uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store of the root the checkpoint
    records (``metadata.root``: the store its training logged to). Evaluate and register use
    it, so they land in the training run's store by construction."""
    if meta.get("root"):
        layout = RunLayout(str(meta["root"]))
        return layout.tracking_uri(uri), layout.artifacts
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_tracking_uri(uri), None
    raise ValueError("the checkpoint records no data root (metadata.root in its config.json, written by "
                     "training): pass --tracking-uri, or set MLFLOW_TRACKING_URI")
