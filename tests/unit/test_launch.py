"""Launchers in this process: the registry of launchers and its one-line mistakes, and the
local launcher's single-process path (the CLI's) without a subprocess (its several nodes:
tests/unit/test_torchrun.py). The local launcher's real trainer subprocess and run_stage's
reuse are tests/integration/test_launch.py."""

import pytest

from pipeline.layout import RunLayout
from pipeline.train import launch
from pipeline.train.job import TrainJob


def test_registry_lists_builtin_launchers_and_explains_mistakes():
    assert {"local", "kubernetes"} <= set(launch.launcher_names())
    assert isinstance(launch.make_launcher("local"), launch.LocalLauncher)
    with pytest.raises(ValueError, match="unknown launcher 'slurm'.*kubernetes.*local"):
        launch.make_launcher("slurm")
    with pytest.raises(TypeError, match="launcher 'local' does not take these options"):
        launch.make_launcher("local", image="x")


def test_checkpoint_dir_names_the_settings(tmp_path):
    filtered = tmp_path / "filtered"  # the key hashes the filter step's manifest, nothing else of it
    filtered.mkdir()
    (filtered / "manifest.json").write_text('{"kept": 120, "shards": {"000000.tar": 120}}')

    def job(**kw):
        args = {"layout": RunLayout(str(tmp_path)), "stage": "sr256", "preset": "tiny", "data": str(filtered),
                "embeddings": "/e/enc-a", "max_steps": 10, **kw}
        return launch.stage_job(**args).checkpoint_dir

    same = job()
    assert same == job() and same.startswith(str(tmp_path / "checkpoints" / "sr256" / "tiny-"))
    assert len({same, job(max_steps=11), job(run_tag="again"), job(embeddings="/e/enc-b"),
                job(world_size=2), job(preset="sr256")}) == 6
    with pytest.raises(FileNotFoundError, match="manifest.json is missing: run the filter step"):
        job(data=str(tmp_path))
    (filtered / "manifest.json").write_text('{"kept": 119, "shards": {"000000.tar": 119}}')
    assert job() != same  # refiltered data: a new checkpoint directory


def test_local_launcher_in_process_is_the_clis_road(monkeypatch):
    """``in_process`` (the CLI's train verb) runs a one-process job here, through the worker's
    ``run``; several processes, and every job without it (the DAGs'), go to a child process."""
    calls = []
    monkeypatch.setattr("pipeline.train.worker.run", lambda job: calls.append(("here", 1)) or {"step": 1})
    monkeypatch.setattr(launch, "train_subprocess", lambda argv, n: calls.append(("child", n)) or {"step": 2})
    job = TrainJob(stage="base64", preset="tiny", data="d", embeddings="e", checkpoint_dir="c")
    assert launch.make_launcher("local", in_process=True).launch(job, 1, 1) == {"step": 1}
    assert launch.make_launcher("local", in_process=True).launch(job, 1, 2) == {"step": 2}
    assert launch.make_launcher("local").launch(job, 1, 1) == {"step": 2}
    assert calls == [("here", 1), ("child", 2), ("child", 1)]


def test_run_stage_refuses_the_in_process_hook_from_a_trigger_form(tmp_path):
    with pytest.raises(ValueError, match="unknown keys \\['in_process'\\]"):
        launch.run_stage(layout=RunLayout(str(tmp_path)), stage="base64", preset="tiny", data=str(tmp_path),
                         embeddings=str(tmp_path), max_steps=1, launcher_options={"in_process": True})
