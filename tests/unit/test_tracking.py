"""pipeline/tracking.py without a tracking server: where the store is, and a RunLogger that never
stops training (off, disabled, a server that is down, a call that fails: a warning at most)."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from pipeline import tracking


def test_tracking_uri_explicit_then_environment_then_sqlite_under_the_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    assert tracking.resolve_tracking_uri(None, str(root)) == f"sqlite:///{root}/mlflow.db"
    assert root.is_dir()  # made, so SQLite can create the file
    # no root, no URI: no default in the working directory, an error saying how to point at one
    with pytest.raises(ValueError, match=r"pass --tracking-uri URI, set MLFLOW_TRACKING_URI, or give the data root"):
        tracking.resolve_tracking_uri(None)
    assert os.listdir(tmp_path) == ["root"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(None, str(root)) == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("sqlite:///x.db", str(root)) == "sqlite:///x.db"


def test_a_missing_sqlite_store_is_an_error_naming_where_it_looked(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(FileNotFoundError, match=f"sample --model m: no MLflow store at {tmp_path}/mlflow.db"):
        tracking.check_store(uri, "sample --model m")
    assert not (tmp_path / "mlflow.db").exists()
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert tracking.check_store(uri, "x") == uri
    assert tracking.check_store("http://127.0.0.1:5000", "x") == "http://127.0.0.1:5000"  # a server: it says


AIRFLOW_ENV = {"AIRFLOW_CTX_DAG_ID": "imagen_full", "AIRFLOW_CTX_DAG_RUN_ID": "manual__2026-01-01",
               "AIRFLOW_CTX_TASK_ID": "train_base64", "AIRFLOW_CTX_TRY_NUMBER": "2"}


def test_airflow_tags_come_from_the_task_context_airflow_exports(monkeypatch):
    for k in AIRFLOW_ENV:
        monkeypatch.delenv(k, raising=False)
    assert tracking.airflow_tags() == {}  # outside Airflow
    for k, v in AIRFLOW_ENV.items():  # as airflow.sdk's task runner sets them (context_to_airflow_vars)
        monkeypatch.setenv(k, v)
    assert tracking.airflow_tags() == {"airflow.dag_id": "imagen_full", "airflow.dag_run_id": "manual__2026-01-01",
                                       "airflow.task_id": "train_base64", "airflow.try_number": "2"}


def test_a_run_made_in_an_airflow_task_carries_its_tags_and_opens_in_the_training_view(tmp_path, monkeypatch):
    import mlflow

    for k, v in AIRFLOW_ENV.items():
        monkeypatch.setenv(k, v)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = tracking.RunLogger(uri, "imagen", "base64-tiny", artifact_root=str(tmp_path / "art"),
                                tags={"stage": "base64"}, system_metrics=False)
    logger.log_params({"text_encoder": "/e", "encoder_name": "/e", "lr": 0.1, "resume": None})
    logger.end()
    client = mlflow.MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert logger.tracking_uri == uri
    assert run.data.tags["airflow.dag_id"] == "imagen_full" and run.data.tags["airflow.try_number"] == "2"
    assert run.data.tags["airflow.task_id"] == "train_base64" and run.data.tags["stage"] == "base64"
    # one name per fact, and no "None"
    assert run.data.params == {"encoder_name": "/e", "lr": "0.1"}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_stages_that_start_at_once_all_get_their_run_in_the_one_experiment(tmp_path, monkeypatch):
    """imagen_full trains its stages side by side: each looks the experiment up, finds none, and
    creates it; the ones that lose that race use the winner's experiment instead of training
    without a run (seen on `make trigger-tiny`: base64 had no training run)."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    made = mlflow.create_experiment("imagen")  # by the stage that won
    real = mlflow.get_experiment_by_name
    lookups = []

    def looked_up_before_the_winner_made_it(name):
        lookups.append(name)
        return None if len(lookups) == 1 else real(name)

    monkeypatch.setattr(mlflow, "get_experiment_by_name", looked_up_before_the_winner_made_it)
    logger = tracking.RunLogger(uri, "imagen", "base64-tiny", system_metrics=False)
    logger.end()
    assert logger.enabled and logger.run_id and lookups == ["imagen", "imagen"]
    assert mlflow.MlflowClient(uri).get_run(logger.run_id).info.experiment_id == made


def test_logging_to_a_finished_run_keeps_its_status_and_times(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("e", artifact_location=f"file://{tmp_path}/art")
    run_id = client.create_run(exp).info.run_id
    client.set_terminated(run_id)
    before = client.get_run(run_id).info
    (tmp_path / "grid.png").write_bytes(b"png")
    tracking.log_to_run(client, run_id, {"eval/psnr": 21.5}, {"eval.guidance_scale": "3"},
                        {str(tmp_path / "grid.png"): "eval"})
    after = client.get_run(run_id)
    assert (after.info.status, after.info.start_time, after.info.end_time) == (
        "FINISHED", before.start_time, before.end_time)
    assert after.data.metrics == {"eval/psnr": 21.5} and after.data.tags["eval.guidance_scale"] == "3"
    assert [f.path for f in client.list_artifacts(run_id, "eval")] == ["eval/grid.png"]


def test_flatten_nested_dicts():
    assert tracking.flatten({"unet": {"channels": 32, "mults": [1, 2]}, "lr": 0.1, "a": {"b": {"c": 1}}}) == {
        "unet.channels": 32, "unet.mults": [1, 2], "lr": 0.1, "a.b.c": 1}


def every_call(logger: tracking.RunLogger) -> None:
    logger.log_params({"a": 1})
    logger.log_metrics({"loss": 0.5}, step=1)
    logger.log_dict({"a": 1}, "x.json")
    logger.log_image(None, key="samples", step=1)
    logger.log_dataset("/data/filtered", "filtered-shards", "0" * 64)
    logger.set_tags({"checkpoint": "/x"})
    logger.end()


@pytest.mark.parametrize("kwargs", [{"tracking_uri": tracking.OFF}, {"tracking_uri": "sqlite:///x.db",
                                                                     "enabled": False}])
def test_off_or_disabled_logs_nothing_and_never_fails(kwargs, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    logger = tracking.RunLogger(experiment="e", run_name="r", **kwargs)
    assert not logger.enabled and logger.run_id is None
    every_call(logger)
    assert os.listdir(tmp_path) == []  # no store was created


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens


def test_a_server_that_is_down_costs_one_warning(caplog):
    uri = f"http://127.0.0.1:{closed_port()}"
    assert not tracking.server_up(uri, timeout=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        logger = tracking.RunLogger(uri, "e", "r")
    assert not logger.enabled and logger.run_id is None
    assert [r.getMessage() for r in caplog.records] == [
        f"MLflow server {uri} is not answering; training goes on without tracking (checkpoints are unaffected)"]
    every_call(logger)


def test_failing_calls_warn_at_most_once_a_minute(caplog, monkeypatch):
    import mlflow

    logger = tracking.RunLogger(tracking.OFF, "e", "r")
    logger.enabled = True  # as if the run had started, then the store went away

    def broken(*args, **kwargs):
        raise ConnectionError("store gone")

    monkeypatch.setattr(mlflow, "log_metrics", broken)
    monkeypatch.setattr(mlflow, "log_params", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        logger.log_metrics({"loss": 1.0}, step=1)
        logger.log_params({"a": 1})
        logger.log_metrics({"loss": 1.0}, step=2)
    assert [r.getMessage() for r in caplog.records] == ["MLflow log_metrics failed (store gone); skipped"]


def test_params_are_cut_to_mlflows_limit(monkeypatch):
    import mlflow

    seen = {}
    monkeypatch.setattr(mlflow, "log_params", lambda params: seen.update(params))
    logger = tracking.RunLogger(tracking.OFF, "e", "r")
    logger.enabled = True
    logger.log_params({"long": "x" * 10_000, "n": 3})
    assert seen == {"long": "x" * 6000, "n": "3"}


def test_code_version_is_the_commit_marked_dirty_else_the_package(monkeypatch):
    import subprocess

    answers = {"rev-parse": "0123abc\n", "status": " M pipeline/x.py\n"}

    def fake_git(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, stdout=answers[cmd[1]], stderr="")

    monkeypatch.setattr(subprocess, "run", fake_git)
    assert tracking.code_version() == "0123abc-dirty"
    answers["status"] = ""
    assert tracking.code_version() == "0123abc"

    def no_git(cmd, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert tracking.code_version().startswith("imagen-pipeline==")


def test_manifest_sha256_names_the_filtered_data(tmp_path):
    from pipeline.layout import manifest_sha256

    assert manifest_sha256(str(tmp_path)) is None
    (tmp_path / "manifest.json").write_bytes(b"{}")
    assert manifest_sha256(str(tmp_path)) == \
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def test_the_dataset_input_of_a_local_folder_warns_nothing(tmp_path):
    """MLflow 3.17 calls every local path an ambiguous dataset source (a UserWarning on stderr on
    every train, issue 28 item 10); the input is still logged."""
    import warnings

    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = tracking.RunLogger(uri, "imagen", "base64-tiny", system_metrics=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logger.log_dataset(str(tmp_path / "filtered"), "filtered", "ab" * 32)
    logger.end()
    assert [str(w.message) for w in seen if issubclass(w.category, UserWarning)] == []
    inputs = mlflow.MlflowClient(uri).get_run(logger.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("filtered", "ab" * 8)]
