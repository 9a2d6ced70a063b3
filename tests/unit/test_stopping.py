"""pipeline/train/stopping.py: a signal sets a flag (a second one aborts), and the resume
command is the command the user typed with ``--resume latest``."""

import os
import shlex
import signal

import pytest

from pipeline.train.stopping import StopSignals, TrainingStopped, resume_command


def test_first_signal_sets_the_flag_a_second_aborts_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_resume_command_is_the_typed_one_resuming_the_stopped_folder():
    typed = ["train", "--stage", "base64", "--data", "/r/filtered", "--checkpoint-dir", "/r/run1", "--new-run",
             "--resume=step-00000002", "--max-steps", "40", "--embeddings", "/r/emb dir"]
    got = resume_command("imagen-pipeline", typed, "/r/run1-2")
    assert shlex.split(got) == ["imagen-pipeline", "train", "--stage", "base64", "--data", "/r/filtered",
                                "--max-steps", "40", "--embeddings", "/r/emb dir", "--checkpoint-dir", "/r/run1-2",
                                "--resume", "latest"]
    line = str(TrainingStopped({"step": 7, "resume": got}))
    assert line == f"stopped at step 7; resume with `{got}`"
