"""pipeline.logs: information on stdout, warnings and errors on stderr, Hugging Face bars off."""

from __future__ import annotations

import logging
import os

import pytest

from pipeline import logs


@pytest.fixture
def root_logger():
    """Give the root logger back as pytest set it up (setup() replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_info_goes_to_stdout_and_warnings_to_stderr(root_logger, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # leave the Hugging Face bars alone here
    monkeypatch.setenv("MLFLOW_CONFIGURE_LOGGING", "true")  # and MLflow's loggers (the next test's subject)
    logs.setup(verbose=False)
    log = logging.getLogger("pipeline.test")
    log.debug("not shown")
    log.info("a count")
    log.warning("a warning")
    log.error("an error")
    out, err = capsys.readouterr()
    assert [line.split(" ", 2)[2] for line in out.splitlines()] == ["INFO pipeline.test: a count"]
    assert [line.split(" ", 2)[2] for line in err.splitlines()] == ["WARNING pipeline.test: a warning",
                                                                    "ERROR pipeline.test: an error"]
    logs.setup(verbose=True)
    log.debug("shown")
    out, err = capsys.readouterr()
    assert out.endswith("DEBUG pipeline.test: shown\n") and err == ""


def test_quiet_progress_bars_turns_off_transformers_bars(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        logs.quiet_progress_bars()
        assert not hf_logging.is_progress_bar_enabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # for the processes it starts
        hf_logging.enable_progress_bar()
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's choice wins
        logs.quiet_progress_bars()
        assert hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_mlflow_lines_are_information_on_stdout():
    """Issue 28 item 10: MLflow gives its loggers a stderr handler of its own when imported ("Skip
    logging GPU metrics" on every train: ERROR lines in an Airflow task log). After setup(), in a
    fresh interpreter, its INFO is on stdout, its warnings stay on stderr, and alembic's INFO is off;
    so too when mlflow was imported first."""
    import subprocess
    import sys

    code = """import logging, sys
if sys.argv[1] == "before":
    import mlflow
from pipeline import logs
logs.setup()
import mlflow
logging.getLogger("mlflow.system_metrics").info("Skip logging GPU metrics")
logging.getLogger("mlflow.tracking").warning("a real warning")
logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_CONFIGURE_LOGGING",)}
    for when in ("after", "before"):
        proc = subprocess.run([sys.executable, "-c", code, when], capture_output=True, text=True, env=env,
                              timeout=120, check=True)
        assert [line.split(" ", 2)[2] for line in proc.stdout.splitlines()] == [
            "INFO mlflow.system_metrics: Skip logging GPU metrics"], when
        assert [line.split(" ", 2)[2] for line in proc.stderr.splitlines()] == [
            "WARNING mlflow.tracking: a real warning"], (when, proc.stderr)
