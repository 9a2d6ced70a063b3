"""Train one cascade stage so that a retry or a rerun is cheap, with any launcher.

    from pipeline.train.launch import run_stage, train_stage
    run_stage(layout=RunLayout(root), stage="base64", preset="tiny", embeddings=EMB, max_steps=60,
              launcher="kubernetes", launcher_options={"image": "registry/imagen-pipeline:0.1"})
    train_stage(job, make_launcher("local"), nodes=1, procs_per_node=2)

The launchers themselves (``local``, ``kubernetes``), their registry and their options' schemas
are :mod:`pipeline.train.launchers`. This module adds what every launcher shares: the checkpoint
directory is named after the settings that decide the result (:func:`checkpoint_key`), the
trainer resumes from its newest step checkpoint, and a finished run leaves ``result.json`` so
the same settings later reuse it instead of training again. :func:`run_stage` is the one call
an orchestrator task makes (dags/imagen_common.py); it checks the trigger form's
``launcher_options`` against the chosen launcher's schema before anything starts.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.layout import RunLayout
    from pipeline.train.job import TrainJob
    from pipeline.train.launchers import Launcher

def checkpoint_key(settings: dict[str, Any]) -> str:
    """A short, stable name for the settings that decide a training result: the same settings
    give the same checkpoint directory, so a retry resumes it and a rerun reuses it."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def data_fingerprint(filtered: str) -> str:
    """Hash of the filtered shards' manifest (it records the input shards and filter settings),
    so new or refiltered data gets a new checkpoint directory."""
    from pipeline.layout import manifest_of, manifest_sha256

    digest = manifest_sha256(filtered)
    if digest is None:
        raise FileNotFoundError(f"{manifest_of(filtered)} is missing: run the filter step on {filtered} first")
    return digest[:16]


def train_stage(job: TrainJob, launcher: Launcher, nodes: int = 1, procs_per_node: int = 1
                ) -> dict[str, Any]:
    """Train ``job`` with ``launcher`` unless ``job.checkpoint_dir`` already holds a finished
    result; returns the trainer's summary plus ``"reused": bool``.

    ``job.resume`` should be ``"latest"`` so a retry after a crash continues from the newest
    step checkpoint instead of starting over.
    """
    from imagen.checkpoint import CONFIG_NAME
    from pipeline import storage
    from pipeline.layout import RunDir

    marker = RunDir(job.checkpoint_dir).result  # written last, after the trainer succeeded
    if storage.exists(marker):
        done = storage.read_json(marker)
        if done.get("checkpoint") and storage.exists(storage.join(done["checkpoint"], CONFIG_NAME)):
            print(f"[launch] {job.stage}: reusing the finished run in {job.checkpoint_dir} "
                  f"(step {done.get('step')}); change a training setting or run_tag to train again",
                  flush=True)
            return {**done, "reused": True}
    result = launcher.launch(job, nodes, procs_per_node)  # its summary names the root (once)
    storage.write_json(marker, result)  # the run's completion marker, written last
    return {**result, "reused": False}


def stage_job(layout: RunLayout, stage: str, preset: str, embeddings: str, max_steps: int,
              world_size: int = 1, run_tag: str = "", data: str | None = None) -> TrainJob:
    """The TrainJob of one stage of the run ``layout``, in ``layout.checkpoints(stage,
    "<preset>-<key>")``, where the key hashes everything that decides the result
    (``checkpoint_key``). ``data``: the filtered shards (default: ``layout.filtered``)."""
    from pipeline import storage
    from pipeline.train.job import TrainJob

    data = data or layout.filtered
    key = checkpoint_key({"stage": stage, "preset": preset, "max_steps": max_steps,
                          "data": data_fingerprint(data), "embeddings": storage.basename(embeddings),
                          "world_size": world_size, "run_tag": run_tag})
    return TrainJob(stage=stage, preset=preset, data=data, embeddings=embeddings,
                    checkpoint_dir=layout.checkpoints(stage, f"{preset}-{key}"), root=layout.root,
                    max_steps=max_steps, resume="latest", run_name=f"{stage}-{preset}-{key}")


def run_stage(*, layout: RunLayout, stage: str, preset: str, embeddings: str, max_steps: int,
              data: str | None = None, launcher: str = "local", launcher_options: dict[str, Any] | None = None,
              nodes: int = 1, procs_per_node: int = 1, run_tag: str = "") -> dict[str, Any]:
    """One call for an orchestrator task: build the stage's job under ``layout``, pick the
    launcher by name, train (or reuse a finished run with the same settings).
    ``launcher_options`` must be keys of that launcher's schema
    (:func:`pipeline.train.launchers.options_schema`)."""
    from pipeline.train.launchers import check_options, make_launcher

    # Only the chosen launcher's schema keys come from a trigger form: never another launcher's
    # options, nor the Python-only hooks (api, sleep, in_process, runner).
    options = check_options(launcher, launcher_options)
    runner = make_launcher(launcher, **options)  # checks the values before anything else
    job = stage_job(layout, stage, preset, embeddings, max_steps, nodes * procs_per_node, run_tag, data)
    return train_stage(job, runner, nodes, procs_per_node)
