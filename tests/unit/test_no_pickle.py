"""No code runs from a training checkpoint: optimizer and RNG state load as tensors only, and a
pickle planted in their place is refused, not run. The registered-model side (sample, evaluate
and pyfunc against a real `mlflow server`) is tests/integration/test_no_pickle.py."""

import json
import os
import pathlib
import shutil
import sys

import pytest
import torch

from imagen.config import preset
from imagen.unet import UNet

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
NAME = "nopickle-base64"


class Planted:
    """Unpickling this writes ``marker``: what an attacker's pickle would do, harmlessly."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "code from a model file ran")


def test_training_state_loads_tensors_only(tmp_path):
    """optimizer.pt and rng-N.pt load with torch.load(weights_only=True): a pickle planted as
    either is refused, not run (pipeline/train/checkpointing.py)."""
    from imagen.ema import EMA
    from pipeline.train import checkpointing as ckpt

    cfg = preset("tiny", "base64")
    model = UNet(cfg.unet)
    ema = EMA(model, cfg.ema())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = ckpt.TrainState(model, ema, optimizer, torch.Generator().manual_seed(0), cfg, {})
    step = ckpt.save_checkpoint(str(tmp_path), 1, state, rank=0, world=1, keep=2)
    assert ckpt.load_checkpoint(step, state, 0, 1, torch.device("cpu"))["step"] == 1  # a real one loads

    marker = str(tmp_path / "MARKER")
    for name in ("optimizer.pt", "rng-0.pt"):
        bad = str(tmp_path / "bad")
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(step, bad)
        torch.save(Planted(marker), os.path.join(bad, name))
        with pytest.raises(ValueError, match=f"{name} is not a tensors-only torch file .Weights only load failed"):
            ckpt.load_checkpoint(bad, state, 0, 1, torch.device("cpu"))
        assert not os.path.exists(marker), name
    assert json.loads(pathlib.Path(step, "config.json").read_text())["stage"] == "base64"
