"""Launchers for real: the local launcher runs a trainer subprocess (its output streamed, its
errors raised), and ``run_stage`` names, trains and reuses a stage's checkpoint directory on the tiny data."""

import json
import os
import time

import pytest

from pipeline.layout import RESULT, RunLayout
from pipeline.train import launch
from pipeline.train.job import TrainJob
from pipeline.train.launchers import make_launcher


def test_local_launcher_fails_with_the_trainers_error(filtered_shards, tmp_path):
    job = TrainJob(stage="base64", preset="tiny", data=filtered_shards,
                   embeddings=str(tmp_path / "no-such-embeddings"), checkpoint_dir=str(tmp_path / "ckpt"),
                   max_steps=2)
    with pytest.raises(RuntimeError, match=r"pipeline.train exited with code 1(.|\n)*no-such-embeddings"):
        launch.train_stage(job, make_launcher("local"))
    assert not os.path.exists(tmp_path / "ckpt" / RESULT)  # no completion marker


def test_run_stage_trains_once_then_reuses(filtered_shards, tiny_embeddings, tmp_path):
    kw = {"layout": RunLayout(str(tmp_path)), "stage": "base64", "preset": "tiny", "data": filtered_shards,
          "embeddings": tiny_embeddings, "max_steps": 3}
    first = launch.run_stage(**kw)
    assert first["reused"] is False and first["step"] == 3
    ckpt_dir = os.path.dirname(first["checkpoint"])
    with open(os.path.join(ckpt_dir, RESULT)) as f:
        assert json.load(f)["checkpoint"] == first["checkpoint"]
    files = {p: os.path.getmtime(os.path.join(ckpt_dir, p)) for p in os.listdir(ckpt_dir)}

    t0 = time.perf_counter()
    second = launch.run_stage(**kw)
    assert time.perf_counter() - t0 < 2.0  # no trainer process started
    assert second == {**first, "reused": True}
    assert {p: os.path.getmtime(os.path.join(ckpt_dir, p)) for p in os.listdir(ckpt_dir)} == files
