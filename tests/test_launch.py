"""Launchers: the registry, the local launcher (a real trainer subprocess, its output streamed,
its error carried), and train_stage's reuse of a finished run with the same settings."""

import json
import os
import sys
import time

import pytest

from pipeline import launch
from pipeline.train import TrainJob


def test_registry_lists_builtin_launchers_and_explains_mistakes():
    assert {"local", "kubernetes"} <= set(launch.launcher_names())
    assert isinstance(launch.make_launcher("local"), launch.LocalLauncher)
    with pytest.raises(ValueError, match="unknown launcher 'slurm'.*kubernetes.*local"):
        launch.make_launcher("slurm")
    with pytest.raises(TypeError, match="launcher 'local' does not take these options"):
        launch.make_launcher("local", image="x")


def test_run_streaming_echoes_lines_and_fails_with_the_last_ones(capsys):
    code = "import sys\nfor i in range(50): print('line', i)\nsys.exit(3)"
    with pytest.raises(RuntimeError, match=r"exited with 3; last output:\nline 10\n(.|\n)*line 49$"):
        launch.run_streaming([sys.executable, "-c", code])
    assert "line 0\n" in capsys.readouterr().out  # streamed, not only the tail


def test_local_launcher_refuses_several_nodes(tmp_path):
    job = TrainJob(stage="base64", preset="tiny", data=str(tmp_path), embeddings=str(tmp_path),
                   checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="nodes=2.*launcher=kubernetes"):
        launch.LocalLauncher().launch(job, nodes=2, procs_per_node=1)


def test_local_launcher_fails_with_the_trainers_error(tmp_path):
    job = TrainJob(stage="base64", preset="tiny", data=str(tmp_path / "no-such-shards"),
                   embeddings=str(tmp_path / "no-such-embeddings"), checkpoint_dir=str(tmp_path / "ckpt"),
                   max_steps=2)
    with pytest.raises(RuntimeError, match=r"pipeline.train .*exited with 1(.|\n)*no-such-embeddings"):
        launch.train_stage(job, launch.make_launcher("local"))
    assert not os.path.exists(tmp_path / "ckpt" / launch.RESULT_NAME)  # no completion marker


def test_checkpoint_dir_names_the_settings(filtered_shards, tmp_path):
    def job(**kw):
        args = {"root": str(tmp_path), "stage": "sr256", "preset": "tiny", "data": filtered_shards,
                "embeddings": "/e/enc-a", "max_steps": 10, **kw}
        return launch.stage_job(**args).checkpoint_dir

    same = job()
    assert same == job() and same.startswith(str(tmp_path / "checkpoints" / "sr256" / "tiny-"))
    assert len({same, job(max_steps=11), job(run_tag="again"), job(embeddings="/e/enc-b"),
                job(world_size=2), job(preset="sr256")}) == 6
    with pytest.raises(FileNotFoundError, match="manifest.json is missing: run the filter step"):
        job(data=str(tmp_path))


def test_run_stage_trains_once_then_reuses(filtered_shards, tiny_embeddings, tmp_path):
    kw = {"root": str(tmp_path), "stage": "base64", "preset": "tiny", "data": filtered_shards,
          "embeddings": tiny_embeddings, "max_steps": 3}
    first = launch.run_stage(**kw)
    assert first["reused"] is False and first["step"] == 3
    ckpt_dir = os.path.dirname(first["checkpoint"])
    with open(os.path.join(ckpt_dir, launch.RESULT_NAME)) as f:
        assert json.load(f)["checkpoint"] == first["checkpoint"]
    files = {p: os.path.getmtime(os.path.join(ckpt_dir, p)) for p in os.listdir(ckpt_dir)}

    t0 = time.perf_counter()
    second = launch.run_stage(**kw)
    assert time.perf_counter() - t0 < 2.0  # no trainer process started
    assert second == {**first, "reused": True}
    assert {p: os.path.getmtime(os.path.join(ckpt_dir, p)) for p in os.listdir(ckpt_dir)} == files
