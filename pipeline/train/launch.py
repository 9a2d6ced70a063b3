"""Train one cascade stage so that a retry or a rerun is cheap, with any launcher.

    from pipeline.train.launch import run_stage, train_stage
    run_stage(layout=RunLayout(root), stage="base64", preset="tiny", embeddings=EMB, max_steps=60,
              launcher="kubernetes", launcher_options={"image": "registry/imagen-pipeline:0.1"})
    train_stage(job, make_launcher("local"), nodes=1, procs_per_node=2)

The launchers themselves (``local``, ``kubernetes``), their registry and their options' schemas
are :mod:`pipeline.train.launchers`. This module adds what every launcher shares: the checkpoint
directory is named after the settings that decide the result (:func:`checkpoint_key`), the
trainer resumes from its newest step checkpoint, and a finished run leaves ``result.json`` so
the same settings later reuse it instead of training again (:func:`train_stage`, the one
decision for the DAGs and the CLI's ``train`` verb; ``--new-run`` picks a new folder with
:func:`new_run_dir`). :func:`run_stage` is the one call an orchestrator task makes (dags/imagen_common.py); it checks the trigger form's
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


# TrainJob fields that do not change what is trained (where it goes, how it is tracked, how the
# data is read, how often it is saved or printed, how to resume; resume is exact whatever the
# checkpoint cadence): every other field is part of the settings (job_settings).
NOT_SETTINGS = ("checkpoint_dir", "root", "resume", "allow_data_change", "tracking_uri", "experiment",
                "run_name", "num_workers", "device", "checkpoint_every", "keep_checkpoints", "log_every")
AGAIN_DAG = "change a training setting or run_tag to train again"
AGAIN_CLI = "pass --new-run to train again in a new folder"


def job_settings(job: TrainJob, world_size: int, run_tag: str = "") -> dict[str, Any]:
    """What decides ``job``'s result: stage, preset, steps, the data (its manifest's hash), the
    embeddings folder, the world size and ``run_tag``, plus every other option set away from
    its default. The DAG names a run's folder after these (:func:`stage_job`); a finished run
    is reused only for the same ones (:func:`train_stage`)."""
    import dataclasses

    from imagen.config import preset
    from pipeline import storage

    steps = job.max_steps if job.max_steps is not None else preset(job.preset, job.stage).train.max_steps
    settings: dict[str, Any] = {"stage": job.stage, "preset": job.preset, "max_steps": steps,
                                "data": data_fingerprint(job.data), "embeddings": storage.basename(job.embeddings),
                                "world_size": world_size, "run_tag": run_tag}
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        if f.name not in settings and f.name not in NOT_SETTINGS and value != f.default:
            settings[f.name] = value
    return settings


def finished_run(checkpoint_dir: str) -> dict[str, Any] | None:
    """The ``result.json`` of a finished run in ``checkpoint_dir`` whose final weights are
    there, else None."""
    from imagen.checkpoint import CONFIG_NAME
    from pipeline import storage
    from pipeline.layout import RunDir

    marker = RunDir(checkpoint_dir).result  # written last, after the trainer succeeded
    if not storage.exists(marker):
        return None
    done = storage.read_json(marker)
    if done.get("checkpoint") and storage.exists(storage.join(done["checkpoint"], CONFIG_NAME)):
        return done
    return None


def new_run_dir(checkpoint_dir: str) -> str:
    """Where ``train --new-run`` trains: ``checkpoint_dir`` itself when it holds nothing yet,
    else the first of ``<checkpoint_dir>-2``, ``-3``, ... that does not exist."""
    from pipeline import storage

    if not storage.exists(checkpoint_dir) or not storage.list_files(checkpoint_dir):
        return checkpoint_dir
    n = 2
    while storage.exists(f"{checkpoint_dir}-{n}"):
        n += 1
    return f"{checkpoint_dir}-{n}"


def _differences(recorded: dict[str, Any], now: dict[str, Any]) -> str:
    names = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    def shown(value: Any) -> str:
        return "default" if value is None else repr(value)

    return ", ".join(f"{k} {shown(recorded.get(k))} -> {shown(now.get(k))}" for k in names)


def train_stage(job: TrainJob, launcher: Launcher, nodes: int = 1, procs_per_node: int = 1,
                run_tag: str = "", again: str = AGAIN_DAG) -> dict[str, Any]:
    """Train ``job`` with ``launcher`` unless ``job.checkpoint_dir`` already holds a finished
    run of the same settings (:func:`job_settings`); returns the trainer's summary plus
    ``"reused": bool``. The one decision of the DAGs and the CLI's ``train`` verb.

    Without ``job.resume``, a folder holding a finished run of other settings, or an unfinished
    run, is refused (training from step 0 there would mix two runs' checkpoints); the error
    says what to pass. ``job.resume == "latest"`` (the DAGs') continues the newest step
    checkpoint instead. ``again``: how the reuse message says to train again.
    """
    from pipeline import storage
    from pipeline.layout import RunDir
    from pipeline.train.checkpointing import list_checkpoints

    settings = job_settings(job, nodes * procs_per_node, run_tag)
    done = finished_run(job.checkpoint_dir)
    # a marker without settings was written before they were recorded: by the DAG, whose
    # folder name is their key
    if done and done.get("settings", settings) == settings:
        print(f"[launch] {job.stage}: reusing the finished run in {job.checkpoint_dir} (step {done.get('step')}, "
              f"checkpoint {done['checkpoint']}, MLflow run {done.get('run_id')}); {again}", flush=True)
        return {**done, "reused": True}
    if not job.resume:
        fix = ("pass --resume latest to continue it, --new-run to train in a new folder, or another "
               "--checkpoint-dir")
        if done:
            raise ValueError(f"{job.checkpoint_dir} holds a finished run of other settings "
                             f"({_differences(done['settings'], settings)}): {fix}")
        steps = list_checkpoints(job.checkpoint_dir)
        if steps:
            raise ValueError(f"{job.checkpoint_dir} holds an unfinished run (newest checkpoint "
                             f"{storage.basename(steps[-1])}): {fix}")
    result = launcher.launch(job, nodes, procs_per_node)  # its summary names the root (once)
    result = {**result, "settings": settings}
    storage.write_json(RunDir(job.checkpoint_dir).result, result)  # the completion marker, written last
    return {**result, "reused": False}


def stage_job(layout: RunLayout, stage: str, preset: str, embeddings: str, max_steps: int,
              world_size: int = 1, run_tag: str = "", data: str | None = None) -> TrainJob:
    """The TrainJob of one stage of the run ``layout``, in ``layout.checkpoints(stage,
    "<preset>-<key>")``, where the key hashes everything that decides the result
    (:func:`job_settings`, ``checkpoint_key``). ``data``: the filtered shards (default:
    ``layout.filtered``)."""
    import dataclasses

    from pipeline.train.job import TrainJob

    job = TrainJob(stage=stage, preset=preset, data=data or layout.filtered, embeddings=embeddings,
                   root=layout.root, max_steps=max_steps, resume="latest")
    key = checkpoint_key(job_settings(job, world_size, run_tag))
    return dataclasses.replace(job, checkpoint_dir=layout.checkpoints(stage, f"{preset}-{key}"),
                               run_name=f"{stage}-{preset}-{key}")


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
    return train_stage(job, runner, nodes, procs_per_node, run_tag)
