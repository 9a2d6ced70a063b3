"""Every `imagen-pipeline` verb run as a real subprocess on the tiny data, chained like the DAG:
tiny-data -> download -> filter -> embed -> train -> evaluate -> register -> sample."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")


# verb -> the stdout and stderr of each successful run of it in this module
OUTPUT: dict[str, list[tuple[str, str]]] = {}


def cli(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    OUTPUT.setdefault(args[0], []).append((proc.stdout, proc.stderr))
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_encoder(work):
    out = cli("tiny-data", "--output", str(work / "tiny"), "--n", "12", "--port", "8799")
    assert os.path.exists(out["urls"])
    assert os.path.exists(os.path.join(out["encoder"], "config.json"))
    return out["encoder"]


@pytest.fixture(scope="module")
def raw(tiny_dataset, work):
    out = cli("download", "--url-list", tiny_dataset.urls, "--output", str(work / "raw"),
              "--allow-private-networks", "--samples-per-shard", "50")
    assert out["shards"] == 3
    assert out["successes"] == 125 and out["failed"] == 6
    return out["output"]


def test_download_with_the_deployment_environment_variable(tiny_dataset, work):
    """Issue 24 item 0: the setting infra/README documents for on-premises image hosts, set the way an
    operator sets it (in the environment, no flag), downloads from a loopback host."""
    env = {"IMAGEN_ALLOW_PRIVATE_NETWORKS": "1", "IMAGEN_ALLOW_HOSTS": ""}
    out = cli("download", "--url-list", tiny_dataset.urls, "--output", str(work / "raw-env"),
              "--samples-per-shard", "50", env=env)
    assert out["successes"] == 125 and out["failed"] == 6 and out["refused"] == 0


@pytest.fixture(scope="module")
def filtered(raw, work):
    out = cli("filter", "--input", raw, "--output", str(work / "filtered"), "--samples-per-shard", "64")
    assert out["kept"] == 120 and out["kept"] + out["rejected"] == out["input_rows"]
    return str(work / "filtered")


@pytest.fixture(scope="module")
def embeddings(filtered, tiny_encoder, work):
    out = cli("embed", "--input", filtered, "--output", str(work / "embeddings"), "--encoder", tiny_encoder)
    # two training shards of 64 and 56, and the held-out split's shard
    assert out["samples"] == 120 and out["shards"] == len([n for n in os.listdir(filtered) if n.endswith(".tar")])
    return out["output"]


def test_data_verbs_say_nothing_on_stderr_when_all_is_well(tiny_encoder, raw, filtered, embeddings):
    """Issue 28 item 10: a successful tiny-data, download, filter and embed write their progress and
    counts on stdout and nothing on stderr (Airflow logs every stderr line as ERROR): no tqdm bar,
    no INFO line, no library warning."""
    for verb, info in (("tiny-data", '"encoder": '), ("download", "shard 00000 done"), ("filter", "kept"),
                       ("embed", "[embed] shard 1/")):
        assert OUTPUT[verb], verb
        for stdout, stderr in OUTPUT[verb]:
            assert stderr == "", (verb, stderr[-2000:])
            assert info in stdout, (verb, stdout[-2000:])


# what Airflow 3's task runner exports to a task's processes: runs made under it carry these as tags
AIRFLOW_CTX = {"AIRFLOW_CTX_DAG_ID": "imagen_full", "AIRFLOW_CTX_DAG_RUN_ID": "manual__cli",
               "AIRFLOW_CTX_TASK_ID": "train_base64", "AIRFLOW_CTX_TRY_NUMBER": "1"}


@pytest.fixture(scope="module")
def trained(filtered, embeddings, work, mlflow_uri):
    out = cli("train", "--stage", "base64", "--preset", "tiny", "--data", filtered, "--embeddings",
              embeddings, "--max-steps", "6", "--global-batch", "8", "--checkpoint-dir",
              str(work / "checkpoints" / "base64" / "run1"), "--tracking-uri", mlflow_uri, env=AIRFLOW_CTX)
    assert out["step"] == 6 and np.isfinite(out["loss"])
    assert out["tracking_uri"] == mlflow_uri
    import mlflow

    out["info"] = mlflow.MlflowClient(mlflow_uri).get_run(out["run_id"]).info  # as training left it
    return out


def test_evaluate_logs_alignment_metrics(trained, tiny_dataset, mlflow_uri):
    out = cli("evaluate", "--checkpoint", trained["checkpoint"], "--attributes",
              os.path.join(tiny_dataset.root, "attributes.json"), "--steps", "3", "--run-id",
              trained["run_id"], "--tracking-uri", mlflow_uri)
    m = out["metrics"]
    assert 0.0 <= m["alignment_guided"] <= 1.0 and 0.0 <= m["alignment_unguided"] <= 1.0
    # both right <= each right; 8 colours x 3 shapes in the tiny dataset's attributes
    assert m["alignment_guided"] <= min(m["alignment_color_guided"], m["alignment_shape_guided"])
    assert m["chance_alignment"] == pytest.approx(1 / 24) and m["seconds_per_image/base64"] > 0
    assert set(out["skipped"]) == {"fid", "clip_score", "validation_grid"}  # no --data: no held-out split
    assert Image.open(out["grids"]["guided"]).mode == "RGB"
    import mlflow

    run = mlflow.MlflowClient(mlflow_uri).get_run(trained["run_id"])
    assert run.data.metrics["eval/alignment_guided"] == pytest.approx(m["alignment_guided"])


def test_register_then_sample_matches_pyfunc(trained, work, mlflow_uri):
    reg = cli("register", "--checkpoint", trained["checkpoint"], "--name", "imagen-cli-test",
              "--run-id", trained["run_id"], "--tracking-uri", mlflow_uri, "--promote")
    assert reg["uri"] == "models:/imagen-cli-test@challenger" and reg["promoted"]
    png = str(work / "x.png")
    out = cli("sample", "a red circle on a white background", "--model", "models:/imagen-cli-test@champion",
              "--output", png,
              "--steps", "4", "--seed", "7", env={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert out["images"] == [png]
    via_cli = np.asarray(Image.open(png))
    assert via_cli.shape == (32, 32, 3)

    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pyfunc.load_model(reg["uri"])
    pred = model.predict(pd.DataFrame({"prompt": ["a red circle on a white background"]}),
                         params={"seed": 7, "steps": 4})
    np.testing.assert_array_equal(pred[0], via_cli)


def test_the_mlflow_ui_shows_what_the_cli_did(trained, mlflow_uri):
    """Issue 28 item 8, after the verbs above (train in an Airflow task's environment, evaluate and
    register into its run, sample): the training run keeps its status and times, its metrics are
    eval/<metric>, settings are tags, params are once and never "None", it carries the Airflow
    tags, the experiment opens in the training view, the LoggedModel is named after the model,
    the registered model is described and its version carries a few tags; and item 10: train,
    evaluate and register wrote nothing to stderr (Airflow logs each stderr line as ERROR)."""
    import mlflow

    assert OUTPUT.get("evaluate") and OUTPUT.get("register") and OUTPUT.get("sample"), "run with the tests above"
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(trained["run_id"])
    before = trained["info"]
    assert (run.info.status, run.info.start_time, run.info.end_time) == ("FINISHED", before.start_time,
                                                                         before.end_time)
    assert "eval/alignment_guided" in run.data.metrics and "eval/guidance_scale" not in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("eval") and not k.startswith("eval/")]
    assert run.data.tags["eval.guidance_scale"]
    assert not [k for k, v in run.data.params.items() if v == "None"]
    assert "encoder_name" in run.data.params and "text_encoder" not in run.data.params
    assert {k: run.data.tags.get(k) for k in ("airflow.dag_id", "airflow.dag_run_id", "airflow.task_id",
                                              "airflow.try_number")} == {
        "airflow.dag_id": "imagen_full", "airflow.dag_run_id": "manual__cli", "airflow.task_id": "train_base64",
        "airflow.try_number": "1"}
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    version = client.get_model_version_by_alias("imagen-cli-test", "champion")
    assert client.get_logged_model(version.source.removeprefix("models:/")).name == "imagen-cli-test"
    assert client.get_registered_model("imagen-cli-test").description and version.description
    assert len(version.tags) <= 10, version.tags
    for verb in ("train", "evaluate", "register"):  # sample draws a progress bar there (--no-progress: none)
        assert [err for _, err in OUTPUT[verb] if err] == [], verb


def test_sample_unknown_alias_is_one_error_line(mlflow_uri, work):
    proc = subprocess.run([BIN, "sample", "x", "--model", "models:/imagen-cli-test@nope", "--output",
                           str(work / "y.png")], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["imagen-pipeline sample: error: model 'imagen-cli-test' has no alias @nope; "
                     "its aliases: @challenger (v1), @champion (v1)"]
