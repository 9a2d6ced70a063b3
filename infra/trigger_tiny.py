"""Run imagen_full for real on the local services, on the tiny synthetic dataset:
`airflow dags trigger` -> scheduler -> LocalExecutor -> every task -> the MLflow registry.

    make services-up && make trigger-tiny      # then watch http://127.0.0.1:8080 ; make services-down
    python infra/trigger_tiny.py [--workdir DIR] [--max-steps 30] [--port 8080]

It renders the tiny dataset and a tiny T5 encoder into DIR (default /tmp/imagen-tiny), serves
the images on 127.0.0.1 while the run downloads them, unpauses imagen_full, triggers it with
the CLI, waits for the run through the REST API and prints every task's state. Data goes to
DIR/data. The services must have been started from this checkout (`make services-up`): their
fetch guard lets through IMAGEN_ALLOW_HOSTS, by default 127.0.0.1:8799, the port the images are
served on here (`--tiny-port`); the trigger form has no switch for private networks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from imagen.config import STAGES  # noqa: E402
from pipeline.dev.services import AirflowServices, airflow_env  # noqa: E402


def tiny_conf(tiny: str, root: str, max_steps: int) -> dict:
    """The imagen_full conf for the tiny dataset in ``tiny`` (small shards, every stage)."""
    return {"root": root, "url_list": os.path.join(tiny, "urls.parquet"),
            "encoder": os.path.join(tiny, "t5-tiny"),
            "presets": dict.fromkeys(STAGES, "tiny"), "max_steps": max_steps, "filtered_shard_size": 50,
            "embed_shards_per_task": 2,
            "attributes": os.path.join(tiny, "attributes.json")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/imagen-tiny")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--port", type=int, default=8080, help="the api-server's port")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--tiny-port", type=int, default=8799,
                   help="loopback port for the images; the services' IMAGEN_ALLOW_HOSTS must list 127.0.0.1:PORT")
    a = p.parse_args()
    home = os.environ.get("AIRFLOW_HOME", os.path.join(REPO, ".airflow"))
    af = AirflowServices(home, a.port, airflow_env(home, a.port))

    from pipeline.dev.tinydata import make_tiny_dataset, serve
    from pipeline.dev.tinymodels import build_tiny_t5

    tiny = os.path.join(a.workdir, "tiny")
    try:  # bind first, then bake the port into the URLs
        server = serve(tiny if os.path.isdir(tiny) else _mkdir(tiny), a.tiny_port)
    except OSError as e:
        sys.exit(f"cannot serve the tiny dataset on 127.0.0.1:{a.tiny_port} ({e}): free the port, or pass "
                 "--tiny-port P after restarting the services with IMAGEN_ALLOW_HOSTS=127.0.0.1:P")
    try:
        make_tiny_dataset(tiny, n=120, seed=0, port=server.server_address[1])
        if not os.path.isdir(os.path.join(tiny, "t5-tiny")):
            build_tiny_t5(os.path.join(tiny, "t5-tiny"))  # a local encoder: no hub needed
        run_id = f"tiny__{time.strftime('%Y%m%dT%H%M%S')}"
        af.wait_for_dag("imagen_full")
        af.cli("dags", "unpause", "imagen_full")
        conf = tiny_conf(tiny, os.path.join(a.workdir, "data"), a.max_steps)
        print(f"$ airflow dags trigger imagen_full --run-id {run_id} --conf '{json.dumps(conf)}'", flush=True)
        af.cli("dags", "trigger", "imagen_full", "--run-id", run_id, "--conf", json.dumps(conf))
        state = af.wait_run("imagen_full", run_id, timeout=a.timeout)
    finally:
        server.shutdown()
        server.server_close()
    for task, task_state in sorted(af.task_states("imagen_full", run_id).items()):
        print(f"  {task:<24} {task_state}")
    print(f"imagen_full {run_id}: {state}  ({af.url}/dags/imagen_full/runs/{run_id})")
    return 0 if state == "success" else 1


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
