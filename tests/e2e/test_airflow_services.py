"""imagen_full for real on local Airflow services (dag-processor, scheduler, api-server with
LocalExecutor on 127.0.0.1) and a real MLflow server, on the tiny dataset:

- triggered with `airflow dags trigger`; the scheduler (with its workers and the running
  training) is SIGKILLed mid-run and restarted; the interrupted task is retried and the run
  succeeds with every output written once;
- the health badge is green: a triggerer runs beside the scheduler;
- triggered again through the REST API (POST /auth/token, POST /api/v2/dags/{id}/dagRuns) with
  the same conf: it succeeds, reusing every shard, checkpoint and model version.
"""

import json
import os
import time

import pytest

from pipeline.data.caption_cache import CACHE_DIR
from pipeline.dev.services import airflow_services
from pipeline.dev.tinydata import OWN_SERVER_POLITENESS

# One stage keeps this test near 3 minutes on 2 CPUs; the smoke test trains all three.
STAGES = ("base64",)
# Fast failure detection so the killed task is retried within seconds, not the default minutes.
FAST_RECOVERY = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "5",
    "IMAGEN_RETRY_DELAY_SECONDS": "2",
}


@pytest.fixture(scope="module")
def services(tmp_path_factory, mlflow_uri, tiny_dataset):
    home = str(tmp_path_factory.mktemp("airflow-home"))
    # The fetch guard's exemption is the deployment's (no trigger-form Param): the tiny image server.
    guard = {"IMAGEN_ALLOW_HOSTS": f"127.0.0.1:{tiny_dataset.port}", "IMAGEN_ALLOW_PRIVATE_NETWORKS": "0"}
    with airflow_services(home, gpu_slots=3, parallelism=3,
                          env={"MLFLOW_TRACKING_URI": mlflow_uri, **FAST_RECOVERY, **guard}) as af:
        af.wait_for_dag("imagen_full")
        af.cli("dags", "unpause", "imagen_full")
        yield af


@pytest.fixture(scope="module")
def conf(tiny_dataset, tiny_encoder_dir, tmp_path_factory):
    return {"root": str(tmp_path_factory.mktemp("data")), "url_list": tiny_dataset.urls,
            "encoder": tiny_encoder_dir,
            "max_steps": 10, "filtered_shard_size": 50, "embed_shards_per_task": 2,
            "model_prefix": "svc", "stages": list(STAGES), "presets": dict.fromkeys(STAGES, "tiny"),
            **OWN_SERVER_POLITENESS}


@pytest.fixture(scope="module")
def first_run(services, conf):
    """CLI trigger, scheduler killed while a stage trains, scheduler restarted, run finished."""
    run_id = "cli_run"
    services.cli("dags", "trigger", "imagen_full", "--run-id", run_id, "--conf", json.dumps(conf))
    killed = _wait_for_running_train(services, run_id)
    services.kill("scheduler")
    time.sleep(2)
    services.start("scheduler")
    state = services.wait_run("imagen_full", run_id, timeout=900)
    return {"run_id": run_id, "state": state, "killed": killed, "conf": conf}


def test_cli_trigger_survives_a_scheduler_kill(services, first_run, mlflow_uri):
    assert first_run["state"] == "success", services.task_states("imagen_full", first_run["run_id"])
    tis = services.rest("GET", f"/api/v2/dags/imagen_full/dagRuns/{first_run['run_id']}"
                               f"/taskInstances/{first_run['killed']}")
    assert tis["state"] == "success" and tis["try_number"] >= 2  # the interrupted try was retried
    root = first_run["conf"]["root"]
    _assert_written_once(root)
    assert _versions(mlflow_uri) == {f"svc-{s}": ["1"] for s in (*STAGES, "cascade")}


def test_rest_trigger_with_the_same_conf_reuses_everything(services, first_run, mlflow_uri):
    root = first_run["conf"]["root"]
    before = _outputs(root)
    run = services.trigger_rest("imagen_full", first_run["conf"], "rest_run")
    assert run["state"] in ("queued", "running")
    assert services.wait_run("imagen_full", "rest_run", timeout=600) == "success"
    assert _outputs(root) == before  # no shard, embedding or checkpoint rewritten
    assert _versions(mlflow_uri) == {f"svc-{s}": ["1"] for s in (*STAGES, "cascade")}
    for s in STAGES:
        xcom = services.rest("GET", f"/api/v2/dags/imagen_full/dagRuns/rest_run/taskInstances/train_{s}"
                                    "/xcomEntries/return_value?deserialize=true")
        assert xcom["value"]["reused"] is True


def test_health_badge_is_green_with_a_triggerer(services):
    """Issue 28, item 9: the services start a triggerer, so every component the UI's health badge
    shows (metadatabase, scheduler, triggerer, dag processor) is healthy."""
    deadline = time.monotonic() + 120
    while True:
        health = services.rest("GET", "/api/v2/monitor/health")
        states = {k: v.get("status") for k, v in health.items() if isinstance(v, dict)}
        if set(states.values()) == {"healthy"} or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert states.get("triggerer") == "healthy" and set(states.values()) == {"healthy"}, health


def _wait_for_running_train(af, run_id, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = af.task_states("imagen_full", run_id)
        running = [t for t, s in states.items() if t.startswith("train_") and s == "running"]
        if running:
            time.sleep(3)  # let the trainer get going, so the kill interrupts real work
            return running[0]
        assert "failed" not in states.values(), states
        time.sleep(1)
    raise TimeoutError(f"no train task started: {af.task_states('imagen_full', run_id)}")


def _outputs(root):
    """{relative path: mtime} of shards, embeddings and checkpoints under the data root."""
    out = {}
    for top in ("filtered", "embeddings", "checkpoints"):
        for d, _, files in os.walk(os.path.join(root, top)):
            for f in files:
                out[os.path.relpath(os.path.join(d, f), root)] = os.path.getmtime(os.path.join(d, f))
    return out


def _assert_written_once(root):
    shards = sorted(f for f in os.listdir(os.path.join(root, "filtered")) if f.endswith(".tar"))
    emb_dirs = [d for d in os.listdir(os.path.join(root, "embeddings")) if d != CACHE_DIR]  # one encoder's
    assert len(emb_dirs) == 1, emb_dirs
    parquets = sorted(os.listdir(os.path.join(root, "embeddings", emb_dirs[0])))
    assert parquets == [s.replace(".tar", ".parquet") for s in shards]  # one each, no temp leftovers
    assert sorted(os.listdir(os.path.join(root, "checkpoints"))) == sorted(STAGES)  # others skipped
    for s in STAGES:
        runs = os.listdir(os.path.join(root, "checkpoints", s))
        assert len(runs) == 1, runs  # one checkpoint directory per stage, however many tries
        names = os.listdir(os.path.join(root, "checkpoints", s, runs[0]))
        assert "final" in names and "result.json" in names
        assert not [n for n in names if n.endswith(".tmp")], names


def _versions(uri):
    import mlflow

    client = mlflow.MlflowClient(uri)
    names = [f"svc-{s}" for s in (*STAGES, "cascade")]
    return {n: sorted(v.version for v in client.search_model_versions(f"name='{n}'")) for n in names}
