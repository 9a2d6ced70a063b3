"""The registry at scale (pipeline/release/blobs.py) against a real MLflow store (SQLite + a local
artifact folder, walked file by file): the three tiny stages and their cascade store each weight
file and the text encoder once; loading through the pyfunc and through loading.py gives the
images the checkpoints give; a damaged blob is refused naming the file; bf16 registration halves
the weights; a model registered by older code (files copied inside) still loads."""

import hashlib
import os
import pathlib
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from imagen.checkpoint import save_weights
from imagen.config import preset
from imagen.text import T5TextEncoder
from imagen.unet import UNet
from pipeline.layout import RunLayout

STAGES = ["base64", "sr256", "sr1024"]
PROMPTS = ["a red circle on a white background", "a blue square on a white background"]
PARAMS = {"seed": 3, "steps": 1}
SMALL = 64 << 10  # what one version adds beside referenced blobs: MLmodel, code file, config.json's


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def stored_files(folder) -> dict[str, int]:
    """Every file under the artifact store's folder -> its size."""
    return {os.path.join(d, f): os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs}


def make_stage(root, stage, encoder_dir, seed) -> str:
    """A stage's final weights as training leaves them (EMA differs from the raw weights)."""
    cfg = preset("tiny", stage)
    torch.manual_seed(seed)
    state = UNet(cfg.unet).state_dict()
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    path = RunLayout(root).checkpoints(stage, "run1") + "/final"
    save_weights(path, state, cfg, ema=ema, metadata={
        "encoder_id": T5TextEncoder(encoder_dir).encoder_id, "encoder_name": encoder_dir, "step": 7, "root": root})
    return path


def reference_images(checkpoints, encoder, n_stages=None):
    """What the checkpoints themselves give, built with the installed package."""
    from pipeline.release.loading import ModelFiles, build_cascade, predict_images

    cascade = build_cascade(ModelFiles("checkpoints", list(checkpoints)), encoder=encoder)
    return predict_images(cascade, pd.DataFrame({"prompt": PROMPTS}), {**PARAMS, "stages": n_stages or 0})


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """The smoke cascade's shape: three tiny stages and a tiny local encoder, registered stage by
    stage and then as the cascade into ROOT's SQLite store, artifacts under ROOT/mlartifacts."""
    import mlflow

    from pipeline.dev.tinymodels import build_tiny_t5
    from pipeline.release.registry import register

    root = str(tmp_path_factory.mktemp("blobroot"))
    enc = build_tiny_t5(os.path.join(root, "t5"))
    ckpts = [make_stage(root, s, enc, seed=i) for i, s in enumerate(STAGES)]
    uri = f"sqlite:///{root}/mlflow.db"
    artifacts = RunLayout(root).artifacts
    grown = []
    for ckpt in ckpts:
        before = sum(stored_files(artifacts).values())
        out = register([ckpt], tracking_uri=uri)
        grown.append((out, sum(stored_files(artifacts).values()) - before))
    before = sum(stored_files(artifacts).values())
    cascade = register(ckpts, tracking_uri=uri)
    grown.append((cascade, sum(stored_files(artifacts).values()) - before))
    mlflow.set_tracking_uri(uri)
    return {"root": root, "encoder": enc, "ckpts": ckpts, "uri": uri, "artifacts": artifacts,
            "grown": grown, "cascade": cascade}


def test_each_weight_file_and_the_encoder_are_stored_once(blobs):
    weights = [os.path.join(c, f) for c in blobs["ckpts"] for f in ("model.safetensors", "ema.safetensors")]
    encoder = [os.path.join(d, f) for d, _, fs in os.walk(blobs["encoder"]) for f in fs]
    files = stored_files(blobs["artifacts"])
    copies = Counter(sha256(p) for p in files)
    assert all(copies[sha256(w)] == 1 for w in weights)  # the stages' weights: once, not again for the cascade
    assert all(copies[sha256(f)] == 1 for f in encoder)  # the encoder: once, not once per version
    weight_bytes = sum(os.path.getsize(w) for w in weights)
    encoder_bytes = sum(os.path.getsize(f) for f in encoder)
    total = sum(files.values())
    # 27.3 MB here; the layout before copied the encoder into each of the 4 versions and the
    # weights into the stage model and again into the cascade: 54.9 MB for the same registrations
    assert weight_bytes + encoder_bytes <= total < weight_bytes + encoder_bytes + 4 * SMALL
    stage_outs, (cascade, cascade_grew) = blobs["grown"][:3], blobs["grown"][3]
    assert cascade["blobs"]["uploaded_bytes"] == 0 and cascade_grew < SMALL
    assert cascade["blobs"]["reused_bytes"] == weight_bytes + encoder_bytes
    assert stage_outs[0][0]["blobs"]["uploaded_bytes"] == encoder_bytes + sum(
        os.path.getsize(w) for w in weights[:2])
    assert [o["blobs"]["uploaded_bytes"] for o, _ in stage_outs[1:]] == [
        sum(os.path.getsize(w) for w in weights[2:4]), sum(os.path.getsize(w) for w in weights[4:])]
    assert len({o["blobs"]["blob_run"] for o, _ in blobs["grown"]}) == 1  # one blob run per store


def test_the_same_weights_under_another_name_upload_nothing(blobs):
    from pipeline.release.registry import register

    before = sum(stored_files(blobs["artifacts"]).values())
    out = register([blobs["ckpts"][0]], "imagen-base64-copy", tracking_uri=blobs["uri"])
    assert not out["reused"] and out["blobs"]["uploaded_bytes"] == 0
    assert sum(stored_files(blobs["artifacts"]).values()) - before < SMALL


def test_pyfunc_and_sample_give_the_checkpoints_images(blobs, tmp_path):
    import mlflow
    from PIL import Image

    from pipeline.release.sample import sample_images

    expected = reference_images(blobs["ckpts"], blobs["encoder"])
    assert expected.shape == (2, 128, 128, 3)
    model = mlflow.pyfunc.load_model("models:/imagen-cascade@challenger")
    np.testing.assert_array_equal(model.predict(pd.DataFrame({"prompt": PROMPTS}), params=PARAMS), expected)
    res = sample_images(PROMPTS, "models:/imagen-cascade@challenger", str(tmp_path / "c"), seeds=[3],
                        steps=1, tracking_uri=blobs["uri"], progress=False)
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in res["images"]]), expected)

    base = reference_images(blobs["ckpts"][:1], blobs["encoder"])  # a stage model, both ways
    stage = mlflow.pyfunc.load_model("models:/imagen-base64@challenger")
    np.testing.assert_array_equal(stage.predict(pd.DataFrame({"prompt": PROMPTS}), params=PARAMS), base)
    res = sample_images(PROMPTS, "imagen-base64@challenger", str(tmp_path / "b"), seeds=[3], steps=1,
                        tracking_uri=blobs["uri"], progress=False)
    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in res["images"]]), base)


def test_a_model_folder_fetches_its_references(blobs, tmp_path):
    """A downloaded model folder holds only config.json's: `sample --model FOLDER` fetches the rest."""
    import mlflow

    from pipeline.release.loading import model_files

    folder = mlflow.artifacts.download_artifacts("models:/imagen-cascade@challenger", dst_path=str(tmp_path))
    assert sorted(os.listdir(os.path.join(folder, "artifacts", "stage_0"))) == ["config.json"]
    with model_files(folder, progress=False) as files:
        assert sorted(os.listdir(files.stage_dirs[2])) == ["config.json", "ema.safetensors", "model.safetensors"]
        assert T5TextEncoder(files.encoder_dir).encoder_id.split("@")[1] == \
            T5TextEncoder(blobs["encoder"]).encoder_id.split("@")[1]


def _blob(blobs, checkpoint_file) -> str:
    digest = sha256(checkpoint_file)
    found = [p for p in stored_files(blobs["artifacts"]) if f"/sha256/{digest}/" in p]
    assert len(found) == 1, found
    return found[0]


def test_a_damaged_blob_is_refused_naming_the_file(blobs, tmp_path, capsys):
    import mlflow

    from pipeline.cli import main
    from pipeline.release.sample import sample_images

    blob = _blob(blobs, os.path.join(blobs["ckpts"][1], "ema.safetensors"))
    original = pathlib.Path(blob).read_bytes()
    try:
        with open(blob, "r+b") as f:  # one flipped byte, same size
            f.seek(len(original) // 2)
            f.write(bytes([original[len(original) // 2] ^ 0xFF]))
        with pytest.raises(ValueError, match=r"models:/imagen-cascade@challenger: stage_1/ema\.safetensors: "
                                             r"sha256 [0-9a-f]{16}\.\.\., the model records"):
            sample_images(PROMPTS, "models:/imagen-cascade@challenger", str(tmp_path / "x"), seeds=[0],
                          steps=1, tracking_uri=blobs["uri"], progress=False)
        with pytest.raises(ValueError, match=r"this model: stage_1/ema\.safetensors: sha256 .* damaged"):
            mlflow.pyfunc.load_model("models:/imagen-cascade@challenger")
        with open(blob, "wb") as f:  # a torn upload: shorter
            f.write(original[:-10])
        capsys.readouterr()
        assert main(["sample", "x", "--model", "models:/imagen-sr256@challenger", "--output",
                     str(tmp_path / "y.png"), "--tracking-uri", blobs["uri"], "--no-progress"]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"stage_0/ema.safetensors: {len(original) - 10} bytes, the model records {len(original)} bytes" in line
        assert "delete that artifact from the run and register the checkpoint again" in line
    finally:
        with open(blob, "wb") as f:
            f.write(original)
    # the stage models that do not use it still load
    mlflow.pyfunc.load_model("models:/imagen-base64@challenger")


def test_bf16_registration_halves_the_weights_and_samples(blobs, tmp_path, capsys):
    import json

    import mlflow
    from safetensors import safe_open

    from imagen.checkpoint import load_model
    from pipeline.cli import main
    from pipeline.release.loading import model_files

    ckpt = blobs["ckpts"][0]
    capsys.readouterr()
    argv = ["register", "--checkpoint", ckpt, "--name", "imagen-base64-bf16", "--weights-dtype", "bf16",
            "--tracking-uri", blobs["uri"]]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fp32 = sum(os.path.getsize(os.path.join(ckpt, f)) for f in ("model.safetensors", "ema.safetensors"))
    assert 0.49 < out["blobs"]["uploaded_bytes"] / fp32 < 0.51
    client = mlflow.MlflowClient(blobs["uri"])
    assert client.get_model_version("imagen-base64-bf16", out["version"]).tags["weights_dtype"] == "bf16"
    assert main(argv) == 0  # a rerun reuses the bf16 version
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"] == out["version"]

    with model_files("models:/imagen-base64-bf16@challenger", progress=False) as files:
        with safe_open(os.path.join(files.stage_dirs[0], "ema.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
        model, _, _ = load_model(files.stage_dirs[0])  # upcast into the fp32 U-Net
    trained, _, _ = load_model(ckpt)
    for (k, got), want in zip(model.state_dict().items(), trained.state_dict().values(), strict=True):
        assert got.dtype == torch.float32, k
        torch.testing.assert_close(got, want.to(torch.bfloat16).float(), rtol=0, atol=0)
    images = mlflow.pyfunc.load_model("models:/imagen-base64-bf16@challenger").predict(
        pd.DataFrame({"prompt": PROMPTS}), params=PARAMS)
    full = reference_images([ckpt], blobs["encoder"])
    assert images.shape == full.shape == (2, 32, 32, 3)
    assert np.abs(images.astype(int) - full.astype(int)).mean() < 8  # bf16 rounding, not another model


def test_a_model_registered_by_older_code_still_loads(blobs, tmp_path):
    """The layout before blobs: stage weights and the encoder copied into the model, no file list."""
    import mlflow

    from imagen.checkpoint import load_config
    from pipeline.release.loading import model_files
    from pipeline.release.registry import PYFUNC_CODE, _signature_and_example
    from pipeline.release.sample import sample_images

    ckpts = blobs["ckpts"][:2]
    exp = mlflow.MlflowClient().create_experiment("old-layout")  # not set_experiment: no global left behind
    with mlflow.start_run(experiment_id=exp):  # what register's log_model call was before blobs
        info = mlflow.pyfunc.log_model(
            name="model", python_model=PYFUNC_CODE, model_config={"encoder_name": None},
            artifacts={"stage_0": ckpts[0], "stage_1": ckpts[1], "text_encoder": blobs["encoder"]},
            signature=_signature_and_example([load_config(c)[0] for c in ckpts])[0],
            pip_requirements=["torch==2.13.0", "safetensors", "transformers", "sentencepiece", "pandas"])
    mlflow.register_model(info.model_uri, "imagen-old-layout")
    expected = reference_images(ckpts, blobs["encoder"])
    model = mlflow.pyfunc.load_model("models:/imagen-old-layout/1")
    np.testing.assert_array_equal(model.predict(pd.DataFrame({"prompt": PROMPTS}), params=PARAMS), expected)
    res = sample_images(PROMPTS, "models:/imagen-old-layout/1", str(tmp_path / "o"), seeds=[3], steps=1,
                        tracking_uri=blobs["uri"], progress=False)
    from PIL import Image

    np.testing.assert_array_equal(np.stack([np.asarray(Image.open(p)) for p in res["images"]]), expected)
    with model_files("models:/imagen-old-layout/1", progress=False) as files:
        assert sorted(os.listdir(files.stage_dirs[0])) == ["config.json", "ema.safetensors", "model.safetensors"]
