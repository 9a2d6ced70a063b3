"""Start and stop the local services on 127.0.0.1: Airflow (dag-processor, scheduler, triggerer,
api-server; LocalExecutor, SQLite, this repo's dags/, a `gpu` pool) and a lean MLflow server.

    python infra/services.py airflow            # foreground, Ctrl-C stops it   (make airflow)
    python infra/services.py mlflow             # foreground                    (make mlflow-ui)
    python infra/services.py up                 # both, in the background       (make services-up)
    python infra/services.py status | down      #                               (make services-down)

State lives in ``.airflow/`` (AIRFLOW_HOME: metadata DB, logs, the generated admin password in
``simple_auth_manager_passwords.json.generated``) and ``.mlflow/`` (tracking DB, artifacts).
When MLflow runs, Airflow's tasks log to it (``MLFLOW_TRACKING_URI``). To use the Airflow CLI
on the same deployment: ``export AIRFLOW_HOME=$PWD/.airflow``. The tasks' fetch guard lets through
``IMAGEN_ALLOW_HOSTS`` (default ``127.0.0.1:8799``, the tiny dataset's server) and, with
``IMAGEN_ALLOW_PRIVATE_NETWORKS=1``, every private address: set them before starting the services.

The `gpu` pool's slots are the trainings that may run at once (``--gpu-slots``, else
``IMAGEN_GPU_POOL_SLOTS``, else one per GPU ``nvidia-smi -L`` lists, else, on CPU, one per cascade
stage, so imagen_full's stages train side by side as its docs say).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.dev.services import PRIVATE_UMASK, airflow_services, mlflow_server, private_file  # noqa: E402

TINY_DATA_HOST = "127.0.0.1:8799"  # where infra/trigger_tiny.py serves the tiny dataset
GPU_SLOTS_ENV = "IMAGEN_GPU_POOL_SLOTS"


def default_gpu_slots(environ: dict[str, str] | None = None) -> int:
    """Slots of the `gpu` pool: ``IMAGEN_GPU_POOL_SLOTS``; else the GPUs here (one training each,
    the local launcher's default of one process per node); else, on CPU, every cascade stage at once."""
    env = os.environ if environ is None else environ
    if env.get(GPU_SLOTS_ENV, "").strip():
        slots = int(env[GPU_SLOTS_ENV])
        if slots < 1:
            sys.exit(f"{GPU_SLOTS_ENV}={slots}: set it to 1 or more (the trainings that may run at once)")
        return slots
    gpus = _gpu_count()
    if gpus:
        return gpus
    from imagen.config import STAGES

    return len(STAGES)


def _gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def _serve(args: argparse.Namespace, airflow: bool, mlflow: bool) -> None:
    """Run the chosen services until Ctrl-C or SIGTERM, then stop them all."""
    # SIGTERM (from `down`) unwinds like Ctrl-C, so every context manager stops its processes.
    signal.signal(signal.SIGTERM, _interrupt)
    with ExitStack() as stack:
        # The fetch guard's exemptions are deployment settings: by default the tasks may fetch the
        # tiny dataset's server (`make trigger-tiny`) and no other private address.
        env = {"IMAGEN_ALLOW_HOSTS": os.environ.get("IMAGEN_ALLOW_HOSTS", TINY_DATA_HOST)}
        if mlflow:
            uri = stack.enter_context(mlflow_server(args.mlflow_home, args.mlflow_port))
            env["MLFLOW_TRACKING_URI"] = uri
            print(f"MLflow  : {uri}", flush=True)
        if airflow:
            af = stack.enter_context(airflow_services(args.airflow_home, args.airflow_port,
                                                      gpu_slots=args.gpu_slots,
                                                      parallelism=args.parallelism, env=env))
            print(f"Airflow : {af.url}  (user admin, password in {args.airflow_home}/"
                  "simple_auth_manager_passwords.json.generated)\n"
                  f"gpu pool: {args.gpu_slots} slot(s): trainings at once\n"
                  f"CLI     : export AIRFLOW_HOME={args.airflow_home}", flush=True)
        print("running; Ctrl-C stops everything", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping ...", flush=True)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _pid_file(args: argparse.Namespace) -> str:
    return os.path.join(args.airflow_home, "services.pid")


def _up(args: argparse.Namespace) -> None:
    if _running_pid(args):
        sys.exit(f"services already running (pid {_running_pid(args)}); `make services-down` first")
    os.makedirs(args.airflow_home, exist_ok=True)
    log_path = os.path.join(args.airflow_home, "services.log")
    with private_file(log_path) as log:  # 0600, as every file the services write
        proc = subprocess.Popen([sys.executable, __file__, "both", *_forward(args)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, umask=PRIVATE_UMASK)
    with private_file(_pid_file(args)) as f:
        f.write(str(proc.pid))
    print(f"started (pid {proc.pid}); log: {log_path}; waiting for the services ...", flush=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with open(log_path) as f:
            text = f.read()
        if "running;" in text:
            print(text)
            return
        if proc.poll() is not None:
            sys.exit(f"services exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(1)
    sys.exit(f"services did not come up within 300 s; see {log_path}")


def _down(args: argparse.Namespace) -> None:
    pid = _running_pid(args)
    if not pid:
        print("no services running")
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(120):
        if not _alive(pid):
            break
        time.sleep(0.5)
    else:
        os.killpg(pid, signal.SIGKILL)
    os.remove(_pid_file(args))
    print(f"stopped (pid {pid})")


def _running_pid(args: argparse.Namespace) -> int | None:
    if not os.path.exists(_pid_file(args)):
        return None
    with open(_pid_file(args)) as f:
        pid = int(f.read().strip() or 0)
    return pid if pid and _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = f"/proc/{pid}/stat"
    if not os.path.exists(stat):
        return True
    with open(stat) as f:
        return f.read().split()[2] != "Z"  # a zombie counts as gone


def _forward(args: argparse.Namespace) -> list[str]:
    return ["--airflow-home", args.airflow_home, "--airflow-port", str(args.airflow_port),
            "--mlflow-home", args.mlflow_home, "--mlflow-port", str(args.mlflow_port),
            "--gpu-slots", str(args.gpu_slots), "--parallelism", str(args.parallelism)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["airflow", "mlflow", "both", "up", "down", "status"])
    p.add_argument("--airflow-home", default=os.environ.get("AIRFLOW_HOME", os.path.join(REPO, ".airflow")))
    p.add_argument("--airflow-port", type=int, default=8080)
    p.add_argument("--mlflow-home", default=os.environ.get("MLFLOW_HOME", os.path.join(REPO, ".mlflow")))
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--gpu-slots", type=int, default=None, help=(
        f"trainings at once (the gpu pool's slots); default: {GPU_SLOTS_ENV}, else one per GPU, else (CPU) "
        "one per cascade stage"))
    p.add_argument("--parallelism", type=int, default=4, help="Airflow tasks at once")
    args = p.parse_args()
    args.airflow_home, args.mlflow_home = map(os.path.abspath, (args.airflow_home, args.mlflow_home))
    if args.gpu_slots is None and args.command in ("airflow", "both", "up"):
        args.gpu_slots = default_gpu_slots()
    commands = {
        "airflow": lambda a: _serve(a, airflow=True, mlflow=False),
        "mlflow": lambda a: _serve(a, airflow=False, mlflow=True),
        "both": lambda a: _serve(a, airflow=True, mlflow=True),
        "up": _up, "down": _down,
        "status": lambda a: print(f"running (pid {_running_pid(a)})" if _running_pid(a) else "not running"),
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
