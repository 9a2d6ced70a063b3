"""DAG files parsed the way Airflow parses them (a child interpreter with BundleDagBag): they
import cleanly, parse fast, stay thin (no heavy imports at parse time), retry with backoff, put
training in the `gpu` pool and chain the per-phase DAGs through Assets."""

import json
import os
import subprocess
import sys

import pytest

from tests.unit.test_dags import DAGS, PARSE, STAGES  # shared with the unit tier

# BundleDagBag, as the dag-processor, `airflow dags test` and task runners use it: it puts the
# DAGs folder on sys.path, so DAG files can import dags/imagen_common.py.


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": DAGS}
    out = subprocess.run([sys.executable, "-c", PARSE, DAGS], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dags_import_without_errors_and_fast(parsed):
    assert parsed["errors"] == {}
    assert set(parsed["dags"]) == {"imagen_full", "imagen_data", "imagen_embed", "imagen_train_stage"}
    assert all(s < 2.0 for s in parsed["per_file_s"].values()), parsed["per_file_s"]
    assert "imagen_common.py" not in parsed["per_file_s"]  # .airflowignore: a helper, not a DAG file


def test_no_heavy_imports_at_parse_time(parsed):
    assert parsed["heavy"] == []


def test_every_task_retries_with_backoff(parsed):
    for dag_id, dag in parsed["dags"].items():
        assert all(r >= 1 for r in dag["retries"].values()), (dag_id, dag["retries"])
        assert all(b and b > 1 for b in dag["backoff"].values()), (dag_id, dag["backoff"])


def test_imagen_full_shape(parsed):
    dag = parsed["dags"]["imagen_full"]
    deps = dag["deps"]
    assert deps["retry_failed"] == ["download"]  # the transient failures fetched again on their own
    assert deps["filter_shards"] == ["retry_failed"]
    assert deps["plan_embed"] == ["filter_shards"]
    # the folders come from the run's root (imagen_common.run_layout): XCom only orders the tasks,
    # so embed follows plan_embed, and each stage the embed tasks (hence the filter)
    assert deps["embed"] == ["plan_embed"]
    for s in STAGES:  # stages train in parallel, each once the embeddings are there
        assert deps[f"train_{s}"] == ["embed"]
        assert dag["pools"][f"train_{s}"] == "gpu"
        assert deps[f"register_{s}"] == ["evaluate", f"train_{s}"]
        assert dag["outlets"][f"register_{s}"] == [f"imagen_model_{s}"]
    assert deps["evaluate"] == [f"train_{s}" for s in sorted(STAGES)]
    assert deps["register_cascade"] == ["evaluate"] + [f"train_{s}" for s in sorted(STAGES)]
    assert dag["pools"]["download"] == "default_pool"
    # the data Assets too (issue 28): the Assets graph shows raw -> filtered -> embeddings -> models
    assert "download" not in dag["outlets"]  # retry_failed emits the raw shards, once they are complete
    assert {t: dag["outlets"][t] for t in ("retry_failed", "filter_shards", "embed")} == {
        "retry_failed": ["imagen_raw_shards"], "filter_shards": ["imagen_filtered_shards"],
        "embed": ["imagen_embeddings"]}


def test_phase_dags_chain_through_assets(parsed):
    dags = parsed["dags"]
    assert dags["imagen_data"]["deps"]["filter_shards"] == ["retry_failed"]
    assert dags["imagen_data"]["outlets"] == {"retry_failed": ["imagen_raw_shards"],
                                              "filter_shards": ["imagen_filtered_shards"]}
    assert dags["imagen_embed"]["schedule"] == ["imagen_filtered_shards"]
    assert dags["imagen_embed"]["outlets"] == {"publish": ["imagen_embeddings"]}
    assert dags["imagen_train_stage"]["schedule"] == ["imagen_embeddings"]
    assert dags["imagen_train_stage"]["pools"]["train"] == "gpu"
    # an AssetAlias: the stage is a Param, so the task adds imagen_model_<stage> at run time
    assert dags["imagen_train_stage"]["outlets"] == {"register": ["imagen_stage_model"]}
