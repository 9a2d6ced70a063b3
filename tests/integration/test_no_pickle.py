"""No code runs from a model file: a planted ``python_model.pkl`` (a pickle whose unpickling
writes a marker file) in a registered model's artifacts, in its stage folders and in a plain
checkpoint folder is never loaded by `imagen-pipeline sample`, `imagen-pipeline evaluate` or
``mlflow.pyfunc.load_model`` (a models-from-code model has no pickle to load). `sample` also
ignores a replaced code file and an MLmodel rewritten to point at the pickle: it reads the
weights only. Against a real `mlflow server` on 127.0.0.1."""

import glob
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from imagen.checkpoint import save_weights
from imagen.config import preset
from imagen.text import T5TextEncoder
from imagen.unet import UNet

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
NAME = "nopickle-base64"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, mlflow_uri, tiny_encoder_dir):
    import mlflow

    from pipeline.release.registry import register

    root = tmp_path_factory.mktemp("nopickle")
    marker = str(root / "MARKER")
    cfg = preset("tiny", "base64")
    torch.manual_seed(0)
    state = UNet(cfg.unet).state_dict()
    ckpt = str(root / "checkpoints" / "base64" / "run1" / "final")
    save_weights(ckpt, state, cfg, ema=state, metadata={
        "encoder_id": T5TextEncoder(tiny_encoder_dir).encoder_id, "encoder_name": tiny_encoder_dir})
    out = register([ckpt], NAME, tracking_uri=mlflow_uri)
    # the model's folder in the server's artifact store (its --artifacts-destination)
    mlflow.set_tracking_uri(mlflow_uri)
    model_id = mlflow.MlflowClient().get_model_version(NAME, out["version"]).source.split("/")[-1]
    found = {os.path.realpath(p) for p in glob.glob(str(  # realpath: pytest adds "*current" links
        tmp_path_factory.getbasetemp() / "mlflow*" / "mlartifacts" / "*" / "models" / model_id / "artifacts"))}
    assert len(found) == 1, found
    store = found.pop()
    with open(os.path.join(store, "MLmodel")) as f:
        flavor = yaml.safe_load(f)["flavors"]["python_function"]
    stage = os.path.join(store, flavor["artifacts"]["stage_0"]["path"])
    pkls = [plant(d, marker) for d in (store, stage, ckpt)]

    # the plant is live: unpickling it writes the marker
    with open(pkls[0], "rb") as f:
        pickle.load(f)  # noqa: S301 - the point of the test
    assert os.path.exists(marker)
    os.remove(marker)
    return {"marker": marker, "uri": out["uri"], "store": store, "stage": stage, "ckpt": ckpt,
            "flavor": flavor, "mlflow": mlflow_uri, "root": root}


def test_the_registered_model_stores_code_and_weights_not_a_pickle(planted):
    flavor = planted["flavor"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert os.path.basename(flavor["model_code_path"]) == "pyfunc_model.py" and "python_model" not in flavor
    # the weights are referenced by sha256 (pipeline/release/blobs.py), not stored in the model
    assert sorted(os.listdir(planted["stage"])) == ["config.json", "python_model.pkl"]  # the last one planted
    assert not glob.glob(os.path.join(planted["store"], "**", "*.pt"), recursive=True)


def test_sample_runs_no_code_from_the_model(planted, tmp_path):
    out = str(tmp_path / "cli.png")
    proc = subprocess.run([BIN, "sample", "a red circle", "--model", planted["uri"], "--output", out,
                           "--steps", "1", "--no-progress", "--tracking-uri", planted["mlflow"]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.exists(out) and not os.path.exists(planted["marker"])

    from pipeline.cli import main

    # the model folder itself (its referenced weights fetched from the server), and a plain
    # checkpoint folder, each with a planted pickle
    for model in (planted["store"], planted["ckpt"]):
        assert main(["sample", "a red circle", "--model", model, "--output", str(tmp_path / "x.png"),
                     "--steps", "1", "--no-progress", "--tracking-uri", planted["mlflow"]]) == 0
        assert not os.path.exists(planted["marker"])


def test_sample_ignores_a_replaced_code_file_and_mlmodel(planted, tmp_path):
    """What only mlflow.pyfunc.load_model would run: a code file that writes the marker, and an
    MLmodel turned into a pickled-model one. `sample` reads neither as code."""
    from pipeline.cli import main

    tampered = str(tmp_path / "tampered")
    shutil.copytree(planted["store"], tampered)
    pathlib.Path(tampered, "pyfunc_model.py").write_text(
        f"import pathlib\npathlib.Path({planted['marker']!r}).write_text('ran')\n")
    with open(os.path.join(tampered, "MLmodel")) as f:
        doc = yaml.safe_load(f)
    flavor = doc["flavors"]["python_function"]
    flavor.pop("model_code_path")
    flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    with open(os.path.join(tampered, "MLmodel"), "w") as f:
        yaml.safe_dump(doc, f)
    assert main(["sample", "a red circle", "--model", tampered, "--output", str(tmp_path / "t.png"),
                 "--steps", "1", "--no-progress", "--tracking-uri", planted["mlflow"]]) == 0
    assert not os.path.exists(planted["marker"])


def test_evaluate_runs_no_code_from_the_model(planted, tmp_path):
    from pipeline.cli import main

    for ckpt in (planted["ckpt"],):  # the registered stage folder holds only config.json now
        assert main(["evaluate", "--checkpoint", ckpt, "--steps", "1", "--output", str(tmp_path / "eval"),
                     "--tracking-uri", planted["mlflow"]]) == 0
        assert not os.path.exists(planted["marker"])


def test_pyfunc_load_model_ignores_the_planted_pickle(planted):
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(planted["mlflow"])
    model = mlflow.pyfunc.load_model(planted["uri"])
    images = model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"steps": 1})
    assert images.shape == (1, 32, 32, 3)
    assert not os.path.exists(planted["marker"])


class Planted:
    """Unpickling this writes ``marker``: what an attacker's pickle would do, harmlessly."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "code from a model file ran")


def plant(folder: str, marker: str) -> str:
    path = os.path.join(folder, "python_model.pkl")
    with open(path, "wb") as f:
        pickle.dump(Planted(marker), f)
    return path
