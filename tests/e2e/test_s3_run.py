"""End to end on object storage: the whole pipeline with an ``s3://`` data root against a real
S3-compatible server (moto's server mode) on 127.0.0.1, started and stopped here.

1. ``airflow dags test imagen_full`` with ``root=s3://imagen-e2e/run`` (the base stage only):
   img2dataset writes the raw shards to S3, then filter, embed, train, evaluate and register
   read and write there; the MLflow store is the layout's (a SQLite file on this machine). With
   no task retries (``IMAGEN_RETRIES=0``): every task passes on its first try, and the run locks
   the data tasks took (``ROOT/_locks``) are all released.
2. A training run killed with SIGKILL after a checkpoint is complete on S3, then rerun with
   ``--resume latest``: it continues from that S3 checkpoint and finishes.
3. ``imagen-pipeline sample`` from the registered model.

s3fs/botocore read the endpoint from ``AWS_ENDPOINT_URL_S3`` and the keys from the usual AWS
variables, as a deployment on MinIO would set them. About 3-4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("moto.server", reason="needs the dev extra: moto[server]")
s3fs = pytest.importorskip("s3fs", reason="needs the dev extra: s3fs")

from pipeline.data.caption_cache import CACHE_DIR  # noqa: E402
from pipeline.dev.services import free_port  # noqa: E402
from pipeline.dev.tinydata import OWN_SERVER_POLITENESS  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
BUCKET = "imagen-e2e"
ROOT = f"s3://{BUCKET}/run"
PREFIX = "s3e2e"


@pytest.fixture(scope="module")
def s3(tmp_path_factory, tiny_dataset):
    """moto's S3 server on a free loopback port, a bucket, and the environment every step
    (and every subprocess) reads: endpoint, keys, where the root's tracking store lives."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    work = tmp_path_factory.mktemp("s3run")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "NO_PROXY": "127.0.0.1,localhost",
           "IMAGEN_TRACKING_DIR": str(work / "tracking"), "IMAGEN_ALLOW_HOSTS": f"127.0.0.1:{tiny_dataset.port}"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("MLFLOW_TRACKING_URI", "AWS_PROFILE", "AWS_SESSION_TOKEN", "IMAGEN_ALLOW_PRIVATE_NETWORKS"):
            mp.delenv(k, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(BUCKET)
        try:
            yield {"work": work, "port": port}
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def _fs():
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return fs


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dag_run(s3, tiny_dataset, tiny_encoder_dir):
    """``airflow dags test imagen_full`` with the s3:// root, the base stage only."""
    work = s3["work"]
    env = {**os.environ, "AIRFLOW_HOME": str(work / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(REPO, "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
           "MLFLOW_DISABLE_TELEMETRY": "true", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1",
           "IMAGEN_RETRIES": "0",  # a first try that fails fails the test (a retry once hid a stale S3 listing)
           "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    _run([os.path.join(BIN, "airflow"), "db", "migrate"], env, 300)
    _run([os.path.join(BIN, "airflow"), "pools", "set", "gpu", "3", "training tasks"], env, 120)
    conf = {"root": ROOT, "url_list": tiny_dataset.urls, "encoder": tiny_encoder_dir, "stages": ["base64"],
            "presets": {"base64": "tiny"}, "max_steps": 6, "model_prefix": PREFIX, "filtered_shard_size": 50, "embed_shards_per_task": 2,
            "attributes": os.path.join(tiny_dataset.root, "attributes.json"), **OWN_SERVER_POLITENESS}
    t0 = time.monotonic()
    out = _run([os.path.join(BIN, "airflow"), "dags", "test", "imagen_full", "-c", json.dumps(conf)], env, 900)
    print(f"airflow dags test imagen_full on {ROOT}: {time.monotonic() - t0:.0f}s")
    return {"env": env, "stdout": out, "db": str(work / "airflow" / "airflow.db")}


def test_the_dag_runs_on_s3(dag_run):
    import sqlite3

    import mlflow

    with sqlite3.connect(dag_run["db"]) as db:
        tries = db.execute("SELECT task_id, map_index, try_number, state FROM task_instance").fetchall()
    assert tries and all(state in ("success", "skipped") and n <= 1 for _, _, n, state in tries), tries
    assert ("download", -1, 1, "success") in tries, tries
    layout, fs = RunLayout(ROOT), _fs()
    assert not fs.glob(f"{ROOT}/_locks/*/*.json")  # every task released its run lock
    assert fs.glob(f"{layout.raw}/*.tar") and fs.glob(f"{layout.raw}/*_stats.json")  # img2dataset wrote there
    assert fs.exists(layout.manifest) and fs.glob(f"{layout.filtered}/0*.tar")
    assert fs.glob(f"{layout.embeddings_root}/*/0*.parquet")
    (run_dir,) = fs.ls(layout.checkpoints("base64"))
    run_dir = f"s3://{run_dir}"
    done = json.loads(fs.cat(f"{run_dir}/result.json"))
    assert done["root"] == ROOT and done["checkpoint"] == f"{run_dir}/final" and done["step"] == 6
    assert json.loads(fs.cat(f"{run_dir}/final/config.json"))["metadata"]["root"] == ROOT
    assert fs.exists(f"{run_dir}/eval.json") and fs.glob(f"{run_dir}/eval/grid_*.png")
    assert not os.path.exists(os.path.join(os.getcwd(), "s3:"))  # no URI taken for a local path
    client = mlflow.MlflowClient(layout.tracking_uri())  # training and registration: one store
    version = client.get_model_version_by_alias(f"{PREFIX}-base64", "challenger")
    assert f"`{run_dir}/final`" in version.description  # each stage's checkpoint, in its lineage table
    assert version.run_id == done["run_id"]  # logged into the training run
    assert str(client.get_model_version_by_alias(f"{PREFIX}-cascade", "challenger").version) == "1"


def test_a_killed_training_run_resumes_from_s3(dag_run, tmp_path):
    layout = RunLayout(ROOT)
    (emb,) = [d for d in _fs().ls(layout.embeddings_root) if d.rsplit("/", 1)[-1] != CACHE_DIR]  # the encoder's
    ckpt = layout.checkpoints("base64", "killed")
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "base64", "--preset", "tiny", "--root", ROOT,
           "--data", layout.filtered, "--embeddings", f"s3://{emb}", "--checkpoint-dir", ckpt,
           "--max-steps", "24", "--checkpoint-every", "2", "--sample-every", "0", "--log-every", "1",
           "--resume", "latest"]
    env, log = dag_run["env"], tmp_path / "killed.log"
    with open(log, "w") as out:
        first = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while not _fs().glob(f"{ckpt}/step-*/_COMPLETE"):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no complete checkpoint on S3 within 240 s"
            time.sleep(0.5)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    fs = _fs()
    assert not fs.exists(f"{ckpt}/final")
    steps = sorted(p.rsplit("/", 2)[-2] for p in fs.glob(f"{ckpt}/step-*/_COMPLETE"))
    out = _run(cmd, env, 600)
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert resumed and f"{ckpt}/step-" in resumed[0], out[-3000:]
    assert int(resumed[0].rsplit("at step ", 1)[1]) >= int(steps[0].removeprefix("step-"))
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 24 and summary["checkpoint"] == f"{ckpt}/final" and summary["root"] == ROOT
    assert _fs().exists(f"{ckpt}/final/model.safetensors")


def test_sample_from_the_registered_model(dag_run, tmp_path):
    from PIL import Image

    png = tmp_path / "sample.png"
    _run([os.path.join(BIN, "imagen-pipeline"), "sample", "a red circle on a white background", "--model",
          f"models:/{PREFIX}-base64@challenger", "--output", str(png), "--steps", "4", "--no-progress",
          "--tracking-uri", RunLayout(ROOT).tracking_uri()], dag_run["env"], 300)
    assert Image.open(png).size == (32, 32)
