"""imagen/text.py in a fresh interpreter: importing it loads no heavy library; ``--encoder``
paths through the CLI, from other working directories (issue 28)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from imagen.text import T5TextEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAPTIONS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a photo of a dog on the beach",
]


def test_import_is_lazy():
    code = "import sys, imagen.text; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    enc = T5TextEncoder("google/t5-v1_1-xxl")  # no download, no load
    assert enc._model is None and enc.max_length == 128
    assert enc.dtype == torch.float32 and enc.device == "cpu"
    assert T5TextEncoder("x", dtype="bf16", device="cpu").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        T5TextEncoder("x", dtype="int3")


BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}


def cli(args, cwd):
    return subprocess.run([BIN, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)


def test_a_relative_encoder_is_recorded_resolved_and_works_from_another_folder(
        filtered_shards, tiny_encoder_dir, tmp_path):
    """Issue 28 item 5: embed with ``--encoder ./t5`` in one folder, then train and sample in
    another: the recorded encoder is the folder's absolute path, and sampling finds it."""
    from pipeline.data.embed import read_metadata

    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    os.symlink(tiny_encoder_dir, here / "t5")
    made = cli(["embed", "--input", filtered_shards, "--output", str(tmp_path / "emb"), "--encoder", "./t5"], here)
    assert made.returncode == 0, made.stderr[-2000:]
    emb = json.loads(made.stdout.strip().splitlines()[-1])["output"]
    assert read_metadata(emb)["encoder_name"] == str(here / "t5")  # absolute, as resolved where typed

    ckpt = tmp_path / "ckpt"
    trained = cli(["train", "--stage", "base64", "--preset", "tiny", "--data", filtered_shards, "--embeddings", emb,
                   "--checkpoint-dir", str(ckpt), "--max-steps", "1", "--global-batch", "4", "--sample-every", "0",
                   "--eval-every", "0", "--tracking-uri", "off"], elsewhere)
    assert trained.returncode == 0, trained.stderr[-2000:]
    with open(ckpt / "final" / "config.json") as f:
        assert json.load(f)["text_encoder"] == str(here / "t5")
    sampled = cli(["sample", "a red circle", "--model", str(ckpt / "final"), "--output", "x.png", "--steps", "2",
                   "--no-progress"], elsewhere)  # a weights directory: no tracking store needed
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert (elsewhere / "x.png").exists()


def test_a_missing_encoder_folder_is_not_found_and_a_hub_name_stays_a_hub_name(filtered_shards, tmp_path):
    out = str(tmp_path / "emb")
    missing = cli(["embed", "--input", filtered_shards, "--output", out, "--encoder", "./no-such-t5"], tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"imagen-pipeline embed: error: encoder folder not found: ./no-such-t5 ({tmp_path / 'no-such-t5'}): "
        "pass a folder save_pretrained wrote, or a hub name such as google/t5-v1_1-xxl"]
    hub = cli(["embed", "--input", filtered_shards, "--output", out, "--encoder", "google/t5-v1_1-xxl"], tmp_path)
    assert hub.returncode != 0
    # taken for a hub name: the hub's own (offline) error, not a missing folder
    assert "encoder folder not found" not in hub.stderr and "huggingface.co" in hub.stderr
