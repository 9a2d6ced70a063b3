"""Issue 28 through `airflow dags test imagen_full`, as a user meets it (a migrated SQLite metadata
DB, the repo's dags/, the tiny dataset served on 127.0.0.1):

- a conf key that is no Param (`max_stepz`) fails the run's first task before any work, naming
  `max_steps`, without retries (item 9: conf keys checked);
- a URL list that does not exist fails `download` after one try, although the DAG retries (item 9:
  input errors fail fast);
- a run through `embed` emits `imagen_raw_shards`, `imagen_filtered_shards` and `imagen_embeddings`
  with the run's root in their `extra` (item 9: data Assets), training and later steps marked
  successful (`--mark-success-pattern`).

The trigger form's schema as the UI drives it: tests/unit/test_dags.py. About 1.5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
AFTER_EMBED = r"(train_|evaluate|register|promote).*"  # task ids Airflow fullmatches: marked successful, not run


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, tiny_dataset):
    """A migrated metadata DB; ``run(conf, *extra)`` runs `airflow dags test imagen_full`."""
    work = tmp_path_factory.mktemp("trigger-form")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "IMAGEN_ALLOW_PRIVATE_NETWORKS")}
    env.update({"AIRFLOW_HOME": str(work / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(REPO, "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "MLFLOW_DISABLE_TELEMETRY": "true", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1",
                "WANDB_MODE": "disabled", "IMAGEN_ALLOW_HOSTS": f"127.0.0.1:{tiny_dataset.port}",
                # the DAG's retry policy, with a short delay: a retried task would show try 3 here
                "IMAGEN_RETRIES": "2", "IMAGEN_RETRY_DELAY_SECONDS": "1",
                "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    subprocess.run([os.path.join(BIN, "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    db = str(work / "airflow" / "airflow.db")

    def run(conf: dict, *extra: str) -> str:
        proc = subprocess.run([os.path.join(BIN, "airflow"), "dags", "test", "imagen_full", "-c", json.dumps(conf),
                               *extra], env=env, capture_output=True, text=True, timeout=600)
        return proc.stdout + proc.stderr

    return {"run": run, "db": db, "work": work}


def _tries(db: str, run_marker: str) -> dict[str, tuple[str, int]]:
    """{task_id: (state, try_number)} of the newest run whose conf holds ``run_marker``."""
    with sqlite3.connect(db) as con:
        run_id = con.execute("SELECT run_id FROM dag_run WHERE dag_id='imagen_full' AND CAST(conf AS TEXT) "
                             "LIKE ? ORDER BY id DESC LIMIT 1", (f"%{run_marker}%",)).fetchone()[0]
        rows = con.execute("SELECT task_id, state, try_number FROM task_instance WHERE dag_id='imagen_full' "
                           "AND run_id=? AND map_index=-1", (run_id,)).fetchall()
    return {t: (s, n) for t, s, n in rows}


def test_unknown_conf_key_fails_the_first_task_naming_the_param(airflow, tmp_path):
    root = str(tmp_path / "typo")
    out = airflow["run"]({"root": root, "url_list": "/nowhere/urls.parquet", "max_stepz": 5})
    assert "unknown conf key 'max_stepz': did you mean 'max_steps'?" in out, out[-3000:]
    tries = _tries(airflow["db"], "max_stepz")
    assert tries["download"] == ("failed", 1), tries  # refused before any work, never retried
    assert not os.path.exists(root)  # nothing written


def test_missing_url_list_fails_after_one_try(airflow, tmp_path):
    missing = str(tmp_path / "no-such-urls.parquet")
    out = airflow["run"]({"root": str(tmp_path / "data"), "url_list": missing})
    assert "not retried" in out and "no-such-urls.parquet" in out, out[-3000:]
    tries = _tries(airflow["db"], "no-such-urls")
    assert tries["download"] == ("failed", 1), tries  # retries=2 in DEFAULT_ARGS: not used
    assert tries["filter_shards"][0] == "upstream_failed"


def test_imagen_full_emits_the_data_assets(airflow, tiny_dataset, tiny_encoder_dir, tmp_path):
    root = str(tmp_path / "assets")
    conf = {"root": root, "url_list": tiny_dataset.urls, "encoder": tiny_encoder_dir, "stages": ["base64"],
            "presets": {"base64": "tiny"}, "filtered_shard_size": 50, "embed_shards_per_task": 8}
    out = airflow["run"](conf, "--mark-success-pattern", AFTER_EMBED)
    tries = _tries(airflow["db"], root)
    assert {t: tries[t][0] for t in ("download", "retry_failed", "filter_shards", "plan_embed")} == dict.fromkeys(
        ("download", "retry_failed", "filter_shards", "plan_embed"), "success"), out[-3000:]
    with sqlite3.connect(airflow["db"]) as con:
        events = con.execute("SELECT a.name, e.source_task_id, CAST(e.extra AS TEXT) FROM asset_event e "
                             "JOIN asset a ON a.id = e.asset_id WHERE e.source_dag_id='imagen_full'").fetchall()
    by_asset = {}
    for name, task, extra in events:
        by_asset.setdefault(name, []).append((task, json.loads(extra)))
    assert sorted(by_asset) == ["imagen_embeddings", "imagen_filtered_shards", "imagen_raw_shards"], events
    assert by_asset["imagen_raw_shards"] == [("retry_failed", {"root": root, "path": f"{root}/raw"})]
    assert by_asset["imagen_filtered_shards"] == [("filter_shards", {"root": root, "path": f"{root}/filtered"})]
    for task, extra in by_asset["imagen_embeddings"]:  # one event per mapped embed batch
        assert task == "embed" and extra["root"] == root and extra["path"].startswith(f"{root}/embeddings/")
        assert ".." in extra["shards"]
