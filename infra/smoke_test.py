"""End-to-end smoke test on the embedded default: tiny data -> `airflow dags test imagen_full`
-> MLflow registry -> `imagen-pipeline sample`. Everything local, loopback only.

    make smoke-test                       # or: python infra/smoke_test.py [--workdir DIR] [--keep]

It renders the tiny dataset and serves it on 127.0.0.1, starts a real `mlflow server`
(SQLite backend, local artifacts) on 127.0.0.1, migrates a temporary Airflow metadata DB
(SQLite), runs the DAG in process with `airflow dags test`, checks that the registry has the
model under its alias, samples a PNG from it, and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

from pipeline.services import background, free_port, mlflow_server, wait_http

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MODEL_NAME = "imagen-base64"


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where outputs go (default: a new temp dir)")
    p.add_argument("--max-steps", type=int, default=60, help="training steps (default 60)")
    args = p.parse_args()
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="imagen-smoke-"))
    os.makedirs(work, exist_ok=True)
    t_start = time.monotonic()
    img_port, mlflow_port = free_port(), free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    env = {
        **os.environ,
        "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
        "AIRFLOW_HOME": os.path.join(work, "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(REPO, "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "MLFLOW_TRACKING_URI": tracking,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    tiny = os.path.join(work, "tiny")
    root = os.path.join(work, "data")
    with ExitStack() as stack:
        step(f"tiny dataset + loopback image server on 127.0.0.1:{img_port}")
        server = stack.enter_context(background(
            [os.path.join(BIN, "imagen-pipeline"), "tiny-data", "--output", tiny, "--port", str(img_port),
             "--serve"], os.path.join(work, "tiny-server.log"), env))
        wait_http(f"http://127.0.0.1:{img_port}/urls.parquet", timeout=120, proc=server)

        step(f"mlflow server on {tracking}")
        stack.enter_context(mlflow_server(work, mlflow_port))

        step("airflow db migrate (SQLite)")
        run([os.path.join(BIN, "airflow"), "db", "migrate"], env)

        conf = {"root": root, "url_list": os.path.join(tiny, "urls.parquet"),
                "encoder": os.path.join(tiny, "t5-tiny"), "allow_private_networks": True,
                "max_steps": args.max_steps, "model_name": MODEL_NAME}
        step("airflow dags test imagen_full")
        run([os.path.join(BIN, "airflow"), "dags", "test", "imagen_full", "-c", json.dumps(conf)], env)

        step("registry check")
        import mlflow

        mlflow.set_tracking_uri(tracking)
        mv = mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, "challenger")
        print(f"registered: {MODEL_NAME} version {mv.version} (alias challenger)")

        step("sample from the registry")
        png = os.path.join(work, "sample.png")
        run([os.path.join(BIN, "imagen-pipeline"), "sample", "a red circle on a white background",
             "--model", f"models:/{MODEL_NAME}@challenger", "--output", png], env)
        with open(png, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                raise RuntimeError(f"{png} is not a PNG")

    elapsed = time.monotonic() - t_start
    print(f"""
Smoke test passed in {elapsed:.0f}s.
  registered model : models:/{MODEL_NAME}@challenger (version {mv.version})
  sample image     : {png}
  data root        : {root}   (raw/, filtered/, embeddings/, checkpoints/)
  airflow home     : {env['AIRFLOW_HOME']}
  mlflow store     : sqlite:///{work}/mlflow.db, artifacts {work}/mlartifacts
Open the UIs on this run:
  mlflow server --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri sqlite:///{work}/mlflow.db \\
      --artifacts-destination {work}/mlartifacts      # then http://127.0.0.1:5000
  AIRFLOW_HOME={env['AIRFLOW_HOME']} make airflow     # then http://127.0.0.1:8080
""")
    return 0


if __name__ == "__main__":
    if shutil.which("airflow", path=BIN) is None:
        sys.exit("airflow is not installed in this Python environment: run `make install` first")
    sys.exit(main())
