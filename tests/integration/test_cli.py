"""`imagen-pipeline` entry point: every verb answers --help, bad input gives one error line."""

import os
import subprocess
import sys

import pytest

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
VERBS = ["tiny-data", "download", "filter", "embed", "train", "evaluate", "register", "sample"]


def test_top_level_help_lists_every_verb():
    out = subprocess.run([BIN, "--help"], capture_output=True, text=True, check=True).stdout
    for verb in VERBS:
        assert verb in out


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_has_help(verb):
    out = subprocess.run([BIN, verb, "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"usage: imagen-pipeline {verb}")


def test_missing_checkpoint_is_one_clear_error_line(tmp_path):
    proc = subprocess.run([BIN, "register", "--checkpoint", str(tmp_path / "nope"), "--name", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"imagen-pipeline register: error: {tmp_path / 'nope' / 'config.json'} not found: "
        f"is {tmp_path / 'nope'} a stage weights directory?"]
