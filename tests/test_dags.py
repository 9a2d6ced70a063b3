"""DAG files: import cleanly, parse fast, stay thin (no heavy imports at parse time), retry."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAGS = os.path.join(REPO, "dags")

PARSE = r"""
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
t2 = time.perf_counter()
heavy = sorted(m for m in ("torch", "transformers", "mlflow", "img2dataset", "pyarrow", "webdataset")
               if m in sys.modules)
dags = {d: {"tasks": sorted(t.task_id for t in dag.tasks),
            "retries": {t.task_id: t.retries for t in dag.tasks},
            "deps": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}}
        for d, dag in bag.dags.items()}
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "parse_s": t2 - t1,
                  "heavy": heavy, "dags": dags}))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", PARSE, DAGS], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dags_import_without_errors_and_fast(parsed):
    assert parsed["errors"] == {}
    assert "imagen_full" in parsed["dags"]
    assert parsed["parse_s"] < 2.0, parsed["parse_s"]


def test_no_heavy_imports_at_parse_time(parsed):
    assert parsed["heavy"] == []


def test_imagen_full_shape_and_retries(parsed):
    dag = parsed["dags"]["imagen_full"]
    assert dag["tasks"] == ["download", "embed", "filter_shards", "register", "train"]
    assert dag["deps"]["filter_shards"] == ["download"]
    assert dag["deps"]["train"] == ["embed", "filter_shards"]
    assert dag["deps"]["register"] == ["train"]
    assert all(r >= 1 for r in dag["retries"].values()), dag["retries"]


def test_params_reject_bad_values():
    from airflow.sdk.exceptions import ParamValidationError

    sys.path.insert(0, DAGS)
    try:
        import imagen_full as mod
    finally:
        sys.path.remove(DAGS)
    params = mod.PARAMS
    with pytest.raises(ParamValidationError, match="sr512"):
        params["stage"].resolve("sr512")
    with pytest.raises(ParamValidationError, match="minimum|less"):
        params["max_steps"].resolve(-5)
    assert params["max_steps"].resolve(10) == 10
