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
