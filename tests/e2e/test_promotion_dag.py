"""End to end: promotion gated in the DAG. ``airflow dags test imagen_full`` runs on one data root
(the base stage only, tiny data served on 127.0.0.1, the root's SQLite MLflow store):

1. a good run: its version is the first, so it becomes ``@champion``;
2. a run made worse on purpose (a new ``run_tag``, one training step): its version stays
   ``@challenger``, ``@champion`` still points to the first, and the version's tags and
   description hold both validation losses, scored in the promote task;
3. the reverse order: with the bad version made champion by hand (the command the gate's
   reason gives), the good run again (everything reused: no download, filter, embed, training or
   registration is redone) promotes the good version back.

The later runs reuse the first run's raw, filtered and embedded shards. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from pipeline.dev.tinydata import OWN_SERVER_POLITENESS
from pipeline.layout import RunLayout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
PREFIX = "gate"
MODEL, CASCADE = f"{PREFIX}-base64", f"{PREFIX}-cascade"
GOOD_STEPS, BAD_STEPS = 2, 1  # the tiny preset's global batch of 16: val/loss about 0.26 and 0.29


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dag(tmp_path_factory, tiny_dataset, tiny_encoder_dir):
    """A migrated Airflow metadata DB and a function that runs imagen_full on one root."""
    work = tmp_path_factory.mktemp("promotion-dag")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "IMAGEN_ALLOW_PRIVATE_NETWORKS")}
    env.update({"AIRFLOW_HOME": str(work / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(REPO, "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "MLFLOW_DISABLE_TELEMETRY": "true", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1",
                "WANDB_MODE": "disabled", "IMAGEN_RETRIES": "0",  # a failed task fails the test at once
                "IMAGEN_ALLOW_HOSTS": f"127.0.0.1:{tiny_dataset.port}",
                "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    _run([os.path.join(BIN, "airflow"), "db", "migrate"], env, 300)
    _run([os.path.join(BIN, "airflow"), "pools", "set", "gpu", "1", "training tasks"], env, 120)
    root = str(work / "data")
    base = {"root": root, "url_list": tiny_dataset.urls, "encoder": tiny_encoder_dir, "stages": ["base64"],
            "presets": {"base64": "tiny"}, "model_prefix": PREFIX, "filtered_shard_size": 50, "embed_shards_per_task": 8,
            "val_fraction": 0.1, "val_max": 4, **OWN_SERVER_POLITENESS}  # a split of several samples whatever the URLs' port

    def run(**conf) -> str:
        t0 = time.monotonic()
        out = _run([os.path.join(BIN, "airflow"), "dags", "test", "imagen_full", "-c",
                    json.dumps({**base, **conf})], env, 600)
        print(f"imagen_full {conf}: {time.monotonic() - t0:.0f}s")
        return out

    return {"run": run, "root": root, "db": str(work / "airflow" / "airflow.db")}


def _client(root: str):
    import mlflow

    return mlflow.MlflowClient(RunLayout(root).tracking_uri())


def _aliases(root: str, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in _client(root).get_registered_model(name).aliases.items()}


def _promote_states(db: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT task_id, state FROM task_instance WHERE task_id LIKE 'promote_%' "
                           "ORDER BY start_date").fetchall()
    return [(t, s) for t, s in rows]


def test_a_worse_run_stays_challenger_and_the_reverse_order_promotes(dag, monkeypatch):
    # the root's own store, as the DAG's tasks use it: not a server an earlier test of this
    # session left in the environment (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = dag["root"]
    dag["run"](max_steps=GOOD_STEPS)
    assert _aliases(root, MODEL) == {"challenger": "1", "champion": "1"}
    assert _aliases(root, CASCADE) == {"challenger": "1", "champion": "1"}
    first = _client(root).get_model_version(MODEL, "1").tags
    assert first["promotion.decision"] == "first_version" and float(first["promotion.value"]) > 0
    good_loss = float(first["promotion.value"])
    # the training run says which DAG run and task made it (Airflow's task context, set by the
    # task runner and inherited by the torchrun workers)
    trained = _client(root).get_run(_client(root).get_model_version(MODEL, "1").run_id).data.tags
    assert trained["airflow.dag_id"] == "imagen_full" and trained["airflow.task_id"].startswith("train_"), trained
    assert trained["airflow.dag_run_id"]

    dag["run"](max_steps=BAD_STEPS, run_tag="worse")
    assert _aliases(root, MODEL) == {"challenger": "2", "champion": "1"}
    mv = _client(root).get_model_version(MODEL, "2")
    assert mv.tags["promotion.decision"] == "kept_challenger" and mv.tags["promotion.champion_version"] == "1"
    bad_loss = float(mv.tags["promotion.value"])
    # the champion was scored again in the promote task, on the same split: the same figure
    assert float(mv.tags["promotion.champion_value"]) == pytest.approx(good_loss, rel=1e-5)
    assert bad_loss > good_loss
    assert f"does not beat champion v1's {good_loss:.4f}" in mv.description
    assert f"register --name {MODEL} --promote --version 2" in mv.description
    cascade = _client(root).get_model_version(CASCADE, "2").tags
    assert cascade["promotion.decision"] == "kept_challenger" and "base64 v2 kept_challenger" in cascade[
        "promotion.stages"]
    assert _aliases(root, CASCADE) == {"challenger": "2", "champion": "1"}

    # The reverse order: the bad version is champion (promoted by hand, as the reason says how);
    # the good run again reuses everything, and its version wins back on the same split.
    from pipeline.release.registry import promote

    promote(MODEL, version="2", tracking_uri=RunLayout(root).tracking_uri())
    dag["run"](max_steps=GOOD_STEPS)
    assert _aliases(root, MODEL) == {"challenger": "1", "champion": "1"}
    back = _client(root).get_model_version(MODEL, "1").tags
    assert back["promotion.decision"] == "promoted" and back["promotion.champion_version"] == "2"
    assert float(back["promotion.value"]) == pytest.approx(good_loss, rel=1e-5)
    assert float(back["promotion.champion_value"]) == pytest.approx(bad_loss, rel=1e-5)
    assert sorted(str(v.version) for v in _client(root).search_model_versions(f"name='{MODEL}'")) == ["1", "2"]
    assert _aliases(root, CASCADE)["champion"] == "1"  # its stage is champion again: nothing to do

    states = _promote_states(dag["db"])
    assert states.count(("promote_base64", "success")) == 3 and ("promote_cascade", "success") in states
    assert {s for t, s in states if t in ("promote_sr256", "promote_sr1024")} == {"skipped"}
