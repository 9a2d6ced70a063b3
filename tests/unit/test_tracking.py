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
    root = tmp_path / "root"
    assert tracking.resolve_tracking_uri(None, str(root)) == f"sqlite:///{root}/mlflow.db"
    assert root.is_dir()  # made, so SQLite can create the file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(None, str(root)) == "http://127.0.0.1:5000"
    assert tracking.resolve_tracking_uri("sqlite:///x.db", str(root)) == "sqlite:///x.db"


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
