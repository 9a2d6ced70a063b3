"""pipeline/release/registry.py against a real `mlflow server` on 127.0.0.1: stage and cascade models,
lineage tags, aliases and promotion, `sample` == pyfunc `predict`, and one-line errors."""

import hashlib
import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from imagen.checkpoint import save_weights
from imagen.config import preset
from imagen.text import T5TextEncoder
from imagen.unet import UNet
from pipeline.grids import label_margins
from pipeline.layout import RunLayout

PROMPTS = ["a red circle on a white background", "a blue square on a white background"]


def make_stage(root, stage, encoder_dir, seed=0) -> str:
    """A stage weights dir like training leaves in ROOT/checkpoints/<stage>/run1/final (its
    metadata records the root, as training does: the registry finds the manifest through it)."""
    cfg = preset("tiny", stage)
    torch.manual_seed(seed)
    state = UNet(cfg.unet).state_dict()
    path = RunLayout(root).checkpoints(stage, "run1") + "/final"
    save_weights(path, state, cfg, ema=state, metadata={
        "encoder_id": T5TextEncoder(encoder_dir).encoder_id, "encoder_name": encoder_dir, "step": 7,
        "root": root})
    return path


@pytest.fixture(scope="module")
def reg(tmp_path_factory, mlflow_uri):
    """Base and SR stages, a dataset manifest, a training run for the base stage (as the
    trainer leaves it) and an evaluation of it, all on the session's MLflow server."""
    import mlflow

    from pipeline.dev.tinymodels import build_tiny_t5
    from pipeline.release.evaluate import evaluate

    root = tmp_path_factory.mktemp("regroot")
    enc = build_tiny_t5(str(root / "t5"))
    other = build_tiny_t5(str(root / "t5-other"), seed=1)
    (root / "filtered").mkdir()
    manifest = json.dumps({"kept": 120, "rejected": 5}).encode()
    (root / "filtered" / "manifest.json").write_bytes(manifest)
    base, sr = make_stage(str(root), "base64", enc), make_stage(str(root), "sr256", enc, seed=1)
    attrs = root / "attributes.json"
    attrs.write_text(json.dumps({"colors": {"red": [220, 30, 30], "blue": [40, 70, 220]},
                                 "shapes": ["circle", "square"]}))
    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("reg-test") or client.get_experiment(client.create_experiment("reg-test"))
    train_run = client.create_run(exp.experiment_id, tags={"checkpoint": os.path.abspath(base)})
    client.set_terminated(train_run.info.run_id)  # training ended; evaluate and register come later
    ev = evaluate(base, attributes=str(attrs), steps=1, tracking_uri=mlflow_uri, output=str(root / "eval"))
    mlflow.set_tracking_uri(mlflow_uri)
    return {"root": root, "encoder": enc, "other": other, "base": base, "sr": sr, "uri": mlflow_uri,
            "client": client, "train_run": train_run.info.run_id, "eval": ev,
            "manifest_sha": hashlib.sha256(manifest).hexdigest()}


def test_stage_model_carries_lineage_and_eval_metrics(reg):
    from pipeline.release.registry import register

    client = reg["client"]
    trained = client.get_run(reg["train_run"]).info
    out = register([reg["base"]], tracking_uri=reg["uri"])
    assert out["name"] == "imagen-base64" and out["uri"] == "models:/imagen-base64@challenger"
    assert out["run_id"] == reg["train_run"] and out["tracking_uri"] == reg["uri"]  # into the training run
    # ... which is not reopened: it keeps its training start and end time (issue 28 item 8)
    after = client.get_run(reg["train_run"]).info
    assert (after.status, after.start_time, after.end_time) == ("FINISHED", trained.start_time, trained.end_time)
    mv = client.get_model_version("imagen-base64", out["version"])
    assert client.get_model_version_by_alias("imagen-base64", "challenger").version == out["version"]
    tags = mv.tags
    # a few tags a user filters on; the rest of the lineage is in the description
    assert set(tags) == {"stages", "encoder_id", "dataset_manifest_sha256", "git_commit", "training_runs",
                         "weights_dtype", "imagen.source", "eval_run", "blob_run"}
    assert tags["encoder_id"] == T5TextEncoder(reg["encoder"]).encoder_id
    assert tags["dataset_manifest_sha256"] == reg["manifest_sha"] and tags["training_runs"] == reg["train_run"]
    assert f"| base64 | tiny | {preset('tiny', 'base64').image_size} px | 7 | `{reg['train_run']}` |" in mv.description
    assert os.path.abspath(reg["base"]) in mv.description and "Sample grids" in mv.description
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(__file__)).stdout.strip()
    assert tags["git_commit"].split("-")[0] == (head or "unknown")
    m = reg["eval"]["metrics"]
    assert out["eval_metrics"]["eval/alignment_guided"] == pytest.approx(m["alignment_guided"], abs=1e-5)
    assert out["eval_metrics"]["eval/seconds_per_image"] == pytest.approx(m["seconds_per_image/base64"], rel=1e-5)
    assert tags["eval_run"] == reg["train_run"]
    # the registered model is described; the LoggedModel is named after it, not "model"
    assert "base64" in client.get_registered_model("imagen-base64").description
    logged = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert logged.name == "imagen-base64" and logged.source_run_id == reg["train_run"]
    # the pyfunc: an input example, and optional params without sentinel values
    import mlflow

    info = mlflow.models.get_model_info(mv.source)
    params = {p.name: p.default for p in info.signature.params.params}
    assert params["guidance_scale"] is None and params["steps"] is None and params["sampler"] is None
    assert params["stage_guidance"] == [] and params["seed"] == 0
    assert info.saved_input_example_info is not None


def test_cascade_sample_and_predict_give_identical_images(reg, tmp_path):
    import mlflow

    from pipeline.release.registry import register
    from pipeline.release.sample import sample_images

    out = register([reg["base"], reg["sr"]], tracking_uri=reg["uri"])
    assert out["name"] == "imagen-cascade"
    assert reg["client"].get_model_version("imagen-cascade", out["version"]).tags["stages"] == "base64,sr256"
    res = sample_images(PROMPTS, "models:/imagen-cascade@challenger", str(tmp_path / "s"), seeds=[5, 6],
                        steps=1, tracking_uri=reg["uri"], progress=False)
    assert [os.path.basename(p) for p in res["images"]] == ["000-seed5.png", "001-seed5.png",
                                                            "000-seed6.png", "001-seed6.png"]
    written = np.stack([np.asarray(Image.open(p)) for p in res["images"]])
    assert written.shape == (4, 64, 64, 3)
    # a row per seed ("seed 5" to its left), a column per prompt (its text above)
    top, left = label_margins(64, 2, PROMPTS, ["seed 5"])
    assert top > 0 and np.asarray(Image.open(res["grid"])).shape == (top + 2 * 66 + 2, left + 2 * 66 + 2, 3)
    assert res["tracking_uri"] == reg["uri"]

    model = mlflow.pyfunc.load_model("models:/imagen-cascade@challenger")
    frame = pd.DataFrame({"prompt": PROMPTS})
    np.testing.assert_array_equal(model.predict(frame, params={"seed": 5, "steps": 1}), written[:2])
    np.testing.assert_array_equal(model.predict(frame, params={"seed": 6, "steps": 1}), written[2:])
    assert not np.array_equal(written[:2], written[2:])
    # stage selection: the base stage alone, also the same through both paths
    base_only = model.predict(frame, params={"seed": 5, "steps": 1, "stages": 1})
    assert base_only.shape == (2, 32, 32, 3)
    res1 = sample_images(PROMPTS[:1], "imagen-cascade@challenger", str(tmp_path / "one.png"), seeds=[5],
                         steps=1, stages=1, tracking_uri=reg["uri"], progress=False)
    assert res1["images"] == [str(tmp_path / "one.png")] and res1["grid"] is None
    alone = model.predict(frame[:1], params={"seed": 5, "steps": 1, "stages": 1})
    np.testing.assert_array_equal(np.asarray(Image.open(res1["images"][0])), alone[0])


def test_sr_stage_model_upsamples_given_images(reg):
    import io

    import mlflow

    from pipeline.release.registry import register

    out = register([reg["sr"]], tracking_uri=reg["uri"])
    assert out["name"] == "imagen-sr256"
    model = mlflow.pyfunc.load_model(out["uri"])
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (220, 30, 30)).save(buf, "PNG")
    frame = pd.DataFrame({"prompt": ["a red square"], "image": [buf.getvalue()]})
    images = model.predict(frame, params={"steps": 1, "seed": 1})
    assert images.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(images, model.predict(frame, params={"steps": 1, "seed": 1}))


def test_promotion_by_flag_and_by_metric_rule(reg):
    from pipeline.release.registry import promote, register

    client, name = reg["client"], "reg-test-promotion"

    def champion():
        return client.get_model_version_by_alias(name, "champion").version

    v1 = register([reg["base"]], name, tracking_uri=reg["uri"], tags={"eval/score": "0.5"},
                  promote_on="score")
    assert v1["promoted"] and "no champion yet" in v1["promotion"] and champion() == v1["version"]
    v2 = register([reg["base"]], name, tracking_uri=reg["uri"], tags={"eval/score": "0.4"},
                  promote_on="score:max")
    assert not v2["promoted"] and champion() == v1["version"]
    assert v2["promotion"] == f"eval/score 0.4 does not beat champion v{v1['version']}'s 0.5 (max)"
    assert client.get_model_version_by_alias(name, "challenger").version == v2["version"]
    moved = promote(name, tracking_uri=reg["uri"])  # --promote without a checkpoint: the challenger
    assert moved["version"] == v2["version"] and champion() == v2["version"]
    v3 = register([reg["base"]], name, tracking_uri=reg["uri"], tags={"eval/score": "0.3"},
                  promote_on="score:min")  # lower is better: 0.3 beats the champion's 0.4
    assert v3["promoted"] and champion() == v3["version"]
    with pytest.raises(ValueError, match="METRIC:min"):
        register([reg["base"]], name, tracking_uri=reg["uri"], promote_on="score:best")


def one_error_line(capsys, argv) -> str:
    from pipeline.cli import main

    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_user_errors_are_one_line(reg, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pipeline.release.registry import register

    register([reg["base"]], "reg-test-errors", tracking_uri=reg["uri"])
    capsys.readouterr()  # MLflow's own logging of that registration
    uri = ["--tracking-uri", reg["uri"]]
    out = ["--output", str(tmp_path / "x.png")]
    line = one_error_line(capsys, ["sample", "x", "--model", "models:/reg-test-missing@champion", *out, *uri])
    assert line.startswith("imagen-pipeline sample: error: no registered model 'reg-test-missing' at ")
    assert "reg-test-errors" in line  # names what does exist
    line = one_error_line(capsys, ["sample", "x", "--model", "models:/reg-test-errors@champion", *out, *uri])
    assert line.endswith("model 'reg-test-errors' has no alias @champion; its aliases: @challenger (v1)")
    line = one_error_line(capsys, ["sample", "x", "--model", "models:/reg-test-errors", *out, *uri])
    assert "write models:/NAME@ALIAS" in line
    line = one_error_line(capsys, ["register", "--name", "reg-test-missing", "--promote", *uri])
    assert "no registered model 'reg-test-missing'" in line
    # issue 28 item 7: one store rule; sample never makes an empty store where it looks
    empty = tmp_path / "no-store"
    line = one_error_line(capsys, ["sample", "x", "--model", "models:/reg-test-errors@challenger", *out,
                                   "--root", str(empty)])
    assert f"no MLflow store at {empty}/mlflow.db" in line and "--tracking-uri" in line
    assert not (empty / "mlflow.db").exists()
    line = one_error_line(capsys, ["sample", "x", "--model", "models:/reg-test-errors@challenger", *out])
    assert "no MLflow tracking store: pass --tracking-uri URI, set MLFLOW_TRACKING_URI, or give" in line
    # a checkpoint from another encoder: in a cascade, and against --encoder
    sr_other = make_stage(str(tmp_path), "sr256", reg["other"])
    line = one_error_line(capsys, ["register", "--checkpoint", reg["base"], "--checkpoint", sr_other, *uri])
    assert "stage sr256 was trained on text encoder t5-other@sha256:" in line
    line = one_error_line(capsys, ["register", "--checkpoint", reg["base"], "--encoder", reg["other"], *uri])
    assert "but the encoder given is t5-other@sha256:" in line


def test_registering_the_same_checkpoints_again_reuses_the_version(reg, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.release.registry import SOURCE_TAG, register

    client, name = reg["client"], "reg-test-idempotent"
    stage = make_stage(str(tmp_path), "base64", reg["encoder"], seed=3)
    first = register([stage], name, tracking_uri=reg["uri"])
    again = register([stage], name, tracking_uri=reg["uri"], alias="staging")
    assert not first["reused"] and again["reused"] and again["version"] == first["version"]
    assert client.get_model_version_by_alias(name, "staging").version == first["version"]
    assert client.get_model_version(name, first["version"]).tags[SOURCE_TAG]

    # what changes the version's content or description makes a new one
    tagged = register([stage], name, tracking_uri=reg["uri"], tags={"note": "x"})
    assert not tagged["reused"] and tagged["version"] != first["version"]
    forced = register([stage], name, tracking_uri=reg["uri"], new_version=True)
    assert not forced["reused"] and forced["version"] not in (first["version"], tagged["version"])
    weights = os.path.join(stage, "ema.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten in place
    rewritten = register([stage], name, tracking_uri=reg["uri"])
    assert not rewritten["reused"] and rewritten["version"] not in (first["version"], forced["version"])

    # the CLI: a rerun reuses, --new-version adds one
    capsys.readouterr()
    argv = ["register", "--checkpoint", stage, "--name", name, "--tracking-uri", reg["uri"]]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"] == rewritten["version"]
    assert main([*argv, "--new-version"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not out["reused"] and int(out["version"]) == int(rewritten["version"]) + 1
    assert len(client.search_model_versions(f"name='{name}'")) == 5

    # a no-op rerun logs nothing: no LoggedModel, no version
    def logged_models():
        return len(client.search_logged_models([e.experiment_id for e in client.search_experiments()]))

    before = logged_models()
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["reused"] and out["tracking_uri"] == reg["uri"]
    assert logged_models() == before and len(client.search_model_versions(f"name='{name}'")) == 5


def test_register_refuses_a_checkpoint_not_made_from_its_runs_embeddings(reg, tmp_path, capsys):
    """The encoder id a checkpoint records must be the one its training run logged from the
    embeddings (params are immutable): an edited config.json is refused."""
    client = reg["client"]
    stage = make_stage(str(tmp_path), "base64", reg["encoder"], seed=4)
    exp = client.get_experiment_by_name("reg-test")
    run = client.create_run(exp.experiment_id, tags={"checkpoint": os.path.abspath(stage)})
    client.log_param(run.info.run_id, "encoder_id", T5TextEncoder(reg["other"]).encoder_id)
    line = one_error_line(capsys, ["register", "--checkpoint", stage, "--name", "reg-test-mismatch",
                                   "--tracking-uri", reg["uri"]])
    assert f"{stage}/config.json records text encoder t5@sha256:" in line
    assert f"its training run {run.info.run_id} was made with t5-other@sha256:" in line


def test_hub_encoder_names_are_not_taken_from_a_checkpoint_alone(reg, tmp_path, capsys):
    import mlflow

    client, uri = reg["client"], ["--tracking-uri", reg["uri"]]
    stage = make_stage(str(tmp_path), "base64", reg["encoder"], seed=5)
    with open(os.path.join(stage, "config.json")) as f:
        doc = json.load(f)
    doc["metadata"].update(encoder_name="acme/t5-hub", encoder_id="acme/t5-hub@main")
    with open(os.path.join(stage, "config.json"), "w") as f:
        json.dump(doc, f)
    argv = ["register", "--checkpoint", stage, "--name", "reg-test-hub", *uri]
    line = one_error_line(capsys, argv)
    assert "names the hub text encoder 'acme/t5-hub', which no training run on this tracking server " \
           "confirms: pass --encoder acme/t5-hub" in line
    line = one_error_line(capsys, [*argv, "--encoder", "other/t5"])  # the user's name must fit too
    assert "trained on text encoder acme/t5-hub@main, but the encoder given is other/t5@main" in line

    from pipeline.cli import main

    assert main([*argv, "--encoder", "acme/t5-hub"]) == 0  # named by the user: registered by name
    version = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"]
    source = client.get_model_version("reg-test-hub", version).source
    mlflow.set_tracking_uri(reg["uri"])
    config = mlflow.models.get_model_info(source).flavors["python_function"]["config"]
    assert config["encoder_name"] == "acme/t5-hub"  # stored by name: no encoder files listed
    assert list(config["files"]) == ["stage_0"] and config["weights_dtype"] == "fp32"
    capsys.readouterr()  # get_model_info's download bar
    # sample downloads a hub encoder only when the user names it
    line = one_error_line(capsys, ["sample", "x", "--model", "models:/reg-test-hub@challenger", "--output",
                                   str(tmp_path / "x.png"), "--no-progress", *uri])
    assert line.endswith("names the hub text encoder acme/t5-hub and holds no local copy: pass --encoder "
                         "acme/t5-hub to download it from the hub, or --encoder DIR with a local copy")

    # a training run that logged the same hub name and id confirms it
    exp = client.get_experiment_by_name("reg-test")
    run = client.create_run(exp.experiment_id, tags={"checkpoint": os.path.abspath(stage)})
    client.log_param(run.info.run_id, "encoder_name", "acme/t5-hub")
    client.log_param(run.info.run_id, "encoder_id", "acme/t5-hub@main")
    assert main([*argv, "--new-version"]) == 0
