"""The folder layout of one run under its data root: the one place a folder name is joined on.

    from pipeline.layout import RunLayout
    layout = RunLayout("s3://bucket/run")        # or a local path; relative paths are made absolute
    layout.raw, layout.filtered, layout.manifest  # s3://bucket/run/raw, .../filtered, .../filtered/manifest.json
    layout.embeddings_root, layout.embeddings("t5-v1_1-xxl")
    layout.checkpoints("base64", "tiny-0123abcd")  # .../checkpoints/base64/tiny-0123abcd
    run = layout.run("base64", "tiny-0123abcd")    # a RunDir: the files one training run shares
    run.result, run.final, run.step(100), run.eval_marker, run.eval_dir
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
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.tracking import resolve_tracking_uri

TRACKING_DIR_ENV = "IMAGEN_TRACKING_DIR"  # where a remote root's local MLflow store lives

# The names of the files steps share, each joined here only. A filtered folder may live outside
# a root (the CLI's --output), so its manifest has a function of the folder too (manifest_of).
MANIFEST = "manifest.json"  # filtered/: the filter step's manifest, written last (hashed into lineage)
RESULT = "result.json"  # a training run's completion marker, written by the launch after it succeeded
FINAL = "final"  # a training run's published weights (a copy of its last step-N)
STEP_PREFIX = "step-"  # step-00000100/: one step checkpoint (pipeline/train/checkpointing.py)
EVAL_MARKER = "eval.json"  # an evaluated training run's figures (a rerun reuses them)
EVAL_DIR = "eval"  # an evaluated training run's grids and sweeps


def manifest_of(filtered: str) -> str:
    """The manifest of a filtered-shards folder (``FILTERED/manifest.json``)."""
    return storage.join(filtered, MANIFEST)


def manifest_sha256(filtered: str) -> str | None:
    """sha256 (hex) of a filtered folder's manifest (any fsspec URI), None if it is missing.
    The manifest records the input shards and the filter settings, so this one hash names the
    dataset: training records it, launch keys checkpoint folders by it, and the registry tags
    model versions with it."""
    uri = manifest_of(filtered)
    if not storage.exists(uri):
        return None
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


@dataclass(frozen=True)
class RunDir:
    """One training run's folder (``checkpoints/<stage>/<preset>-<key>``) and the files in it
    that training, launch, evaluation and registration share."""

    path: str

    @classmethod
    def of(cls, checkpoint: str) -> RunDir:
        """The run holding a checkpoint (its ``final/`` or a ``step-N/``)."""
        return cls(storage.parent(storage.normalize(checkpoint)))

    @property
    def result(self) -> str:
        return storage.join(self.path, RESULT)

    @property
    def final(self) -> str:
        return storage.join(self.path, FINAL)

    def step(self, step: int) -> str:
        return storage.join(self.path, step_name(step))

    @property
    def eval_marker(self) -> str:
        return storage.join(self.path, EVAL_MARKER)

    @property
    def eval_dir(self) -> str:
        return storage.join(self.path, EVAL_DIR)


def step_name(step: int) -> str:
    """``step-00000100``: eight digits, so names sort by step."""
    return f"{STEP_PREFIX}{step:08d}"


STEP_NAME = re.compile(rf"^{STEP_PREFIX}(\d{{8}})$")  # matches step_name's output; group 1 is the step


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
        return manifest_of(self.filtered)

    @property
    def embeddings_root(self) -> str:
        """Where the embed step writes one folder per encoder."""
        return storage.join(self.root, "embeddings")

    def embeddings(self, encoder_dir: str) -> str:
        """The embeddings folder of one encoder (its folder name under ``embeddings/``)."""
        return storage.join(self.embeddings_root, encoder_dir)

    def checkpoints(self, stage: str, run: str | None = None) -> str:
        """``checkpoints/<stage>``, or one training run's folder under it (step-N/, final/,
        result.json, eval.json: :class:`RunDir`)."""
        parts = [stage] if run is None else [stage, run]
        return storage.join(self.root, "checkpoints", *parts)

    def run(self, stage: str, run: str) -> RunDir:
        """One training run's folder and its shared files."""
        return RunDir(self.checkpoints(stage, run))

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
