"""Issue 24 item 7 through ``imagen-pipeline train``, as an operator runs it: more processes than
the machine has devices are refused in one line that says what to pass, before anything starts.
The trigger form's road (the DAG Params into run_stage) is tests/unit/test_launch.py.

    .venv/bin/pytest tests/integration/test_integrity_round3_launch_cli.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")


def train_cli(tmp_path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    args = ["train", "--stage", "base64", "--preset", "tiny", "--data", str(tmp_path / "filtered"), "--embeddings",
            str(tmp_path / "emb"), "--checkpoint-dir", str(tmp_path / "ckpt"), *extra]
    environ = {k: v for k, v in os.environ.items() if k != "IMAGEN_LOCAL_MAX_PROCESSES"}
    return subprocess.run([BIN, *args], capture_output=True, text=True, timeout=600, env={**environ, **(env or {})})


def test_train_refuses_more_processes_than_devices(tmp_path):
    proc = train_cli(tmp_path, "--nproc-per-node", "4096")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("imagen-pipeline train: error: 1 node(s) x 4096 process(es) per node = 4096 training "
                           "processes on this machine, which has ")
    assert "--nproc-per-node" in line and "IMAGEN_LOCAL_MAX_PROCESSES=4096" in line
    assert not (tmp_path / "ckpt").exists()


def test_a_bad_override_is_named(tmp_path):
    proc = train_cli(tmp_path, "--nproc-per-node", "2", env={"IMAGEN_LOCAL_MAX_PROCESSES": "lots"})
    assert proc.returncode == 2
    assert "IMAGEN_LOCAL_MAX_PROCESSES='lots': set it to a whole number" in proc.stderr
