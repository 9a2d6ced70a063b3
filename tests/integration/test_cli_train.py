"""``imagen-pipeline train`` as a user meets it (issue 28 items 2-4): a rerun reuses the finished
run, Ctrl-C stops cleanly and says how to resume, a resume on refiltered data is refused.

Every test runs the real entry point in a subprocess on the tiny data (tests/conftest.py).
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
STOPPED = re.compile(r"^imagen-pipeline train: stopped at step (\d+); resume with `(.+)`$")


def train_args(data, emb, ckpt, steps, tmp_path, *extra):
    return [BIN, "train", "--stage", "base64", "--preset", "tiny", "--data", str(data), "--embeddings", emb,
            "--checkpoint-dir", str(ckpt), "--max-steps", str(steps), "--global-batch", "8",
            "--sample-every", "0", "--eval-every", "0", "--log-every", "2",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *extra]


def run(cmd, timeout=600):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def run_ok(cmd):
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


def mlflow_status(tmp_path, run_id):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status


def interrupt_after(cmd, ckpt, step, sig=signal.SIGINT, timeout=300):
    """Start ``cmd``, send ``sig`` (SIGINT as Ctrl-C does, SIGTERM as Airflow or Kubernetes do) once
    step-<step> exists; its exit code, stdout, stderr."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    target = ckpt / f"step-{step:08d}"
    deadline = time.monotonic() + timeout
    while not target.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


def assert_stopped_cleanly(rc, out, err, ckpt, tmp_path, max_steps):
    """Exit 130, one line saying the step and the resume command, no traceback, a checkpoint of
    that step and no final weights, the MLflow run KILLED. Returns (step, resume argv, summary)."""
    assert rc == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    match = STOPPED.match(err.strip().splitlines()[-1])
    assert match, err[-2000:]
    step = int(match.group(1))
    assert 0 < step < max_steps
    assert (ckpt / f"step-{step:08d}" / "model.safetensors").exists()
    assert not (ckpt / "final").exists() and not (ckpt / "result.json").exists()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] is True and summary["step"] == step
    assert mlflow_status(tmp_path, summary["run_id"]) == "KILLED"
    resume = shlex.split(match.group(2))
    assert resume[:2] == ["imagen-pipeline", "train"] and resume[-2:] == ["--resume", "latest"]
    return step, [BIN, *resume[1:]], summary


def test_ctrl_c_checkpoints_says_how_to_resume_and_the_command_resumes(filtered_shards, tiny_embeddings,
                                                                       tmp_path):
    ckpt = tmp_path / "run1"
    cmd = train_args(filtered_shards, tiny_embeddings, ckpt, 40, tmp_path, "--checkpoint-every", "3")
    rc, out, err = interrupt_after(cmd, ckpt, 3)
    step, resume, stopped = assert_stopped_cleanly(rc, out, err, ckpt, tmp_path, 40)

    done, printed = run_ok(resume)  # the printed command, as is
    assert f"resumed from {ckpt / f'step-{step:08d}'} at step {step}" in printed
    assert done["step"] == 40 and done["reused"] is False
    assert done["run_id"] == stopped["run_id"]  # the same MLflow run goes on
    assert mlflow_status(tmp_path, done["run_id"]) == "FINISHED"


def test_sigterm_reaches_torchrun_workers(filtered_shards, tiny_embeddings, tmp_path):
    """SIGTERM (what Airflow sends a task it stops, and Kubernetes a pod) stops like Ctrl-C."""
    ckpt = tmp_path / "ddp"
    cmd = train_args(filtered_shards, tiny_embeddings, ckpt, 40, tmp_path, "--checkpoint-every", "2",
                     "--nproc-per-node", "2")
    rc, out, err = interrupt_after(cmd, ckpt, 2, signal.SIGTERM)
    step, resume, summary = assert_stopped_cleanly(rc, out, err, ckpt, tmp_path, 40)
    assert summary["signal"] == "SIGTERM"
    # every rank stopped at the same step and wrote its RNGs into that checkpoint
    assert {"rng-0.pt", "rng-1.pt"} <= set(os.listdir(ckpt / f"step-{step:08d}"))
    assert "--nproc-per-node" in resume
    time.sleep(0.5)
    leftover = subprocess.run(["pgrep", "-f", str(ckpt)], capture_output=True, text=True).stdout.split()
    assert not leftover, "a worker outlived the stopped command"


def test_rerun_reuses_the_finished_run_and_new_run_trains_again(filtered_shards, tiny_embeddings, tmp_path):
    ckpt = tmp_path / "run1"
    cmd = train_args(filtered_shards, tiny_embeddings, ckpt, 2, tmp_path, "--checkpoint-every", "2")
    first, _ = run_ok(cmd)
    assert first["reused"] is False and first["step"] == 2
    files = {p: os.path.getmtime(ckpt / p) for p in os.listdir(ckpt)}

    again, printed = run_ok(cmd)
    assert again["reused"] is True
    assert (again["checkpoint"], again["run_id"]) == (first["checkpoint"], first["run_id"])
    assert f"reusing the finished run in {ckpt}" in printed and first["run_id"] in printed
    assert {p: os.path.getmtime(ckpt / p) for p in os.listdir(ckpt)} == files  # nothing written

    new, printed = run_ok([*cmd, "--new-run"])
    assert new["reused"] is False and new["checkpoint"] == str(ckpt) + "-2/final"
    assert new["run_id"] != first["run_id"] and f"training in {ckpt}-2" in printed

    other = run(train_args(filtered_shards, tiny_embeddings, ckpt, 4, tmp_path))
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"imagen-pipeline train: error: {ckpt} holds a finished run of other settings (max_steps 2 -> 4): pass "
        "--resume latest to continue it, --new-run to train in a new folder, or another --checkpoint-dir"]


@pytest.fixture()
def own_data(filtered_shards, tmp_path):
    """A copy of the filtered shards this test may refilter (the session's stay as they are)."""
    data = tmp_path / "root" / "filtered"
    shutil.copytree(filtered_shards, data)
    return data


def test_resume_on_refiltered_data_is_refused_unless_allowed(own_data, tiny_embeddings, tmp_path):
    from pipeline.layout import manifest_sha256

    ckpt = tmp_path / "run1"
    before = manifest_sha256(str(own_data))
    run_ok(train_args(own_data, tiny_embeddings, ckpt, 2, tmp_path, "--checkpoint-every", "2"))
    manifest = json.loads((own_data / "manifest.json").read_text())
    (own_data / "manifest.json").write_text(json.dumps({**manifest, "refiltered": True}))  # a refilter
    after = manifest_sha256(str(own_data))

    cmd = train_args(own_data, tiny_embeddings, ckpt, 4, tmp_path, "--resume", "latest")
    refused = run(cmd)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"imagen-pipeline train: error: checkpoint {ckpt / 'step-00000002'} was trained on data")
    assert before in line and after in line and "--allow-data-change" in line
    assert not (ckpt / "step-00000004").exists()

    done, printed = run_ok([*cmd, "--allow-data-change"])
    assert done["step"] == 4 and "at step 2" in printed
