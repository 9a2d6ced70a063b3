"""Local services on loopback for the smoke test, the test suite, `make airflow` and
`make mlflow-ui`.

    with mlflow_server(workdir) as uri:     # real `mlflow server`, SQLite backend, local artifacts
        ...                                 # uri == "http://127.0.0.1:<port>"
    with airflow_services(home) as af:      # migrate, `gpu` pool, dag-processor, scheduler, triggerer, api-server
        af.cli("dags", "trigger", "imagen_full", "--conf", "{...}")
        af.rest("POST", "/api/v2/dags/imagen_full/dagRuns", {...})
        af.kill("scheduler"); af.start("scheduler")   # crash and restart one service

Airflow runs as four separate processes (not `airflow standalone`) so one can be killed
and restarted, with LocalExecutor, low parallelism, SQLite and the project's dags/ folder.
Every process started here is stopped on exit (terminate, then kill).

Hygiene: every listener binds 127.0.0.1 (Airflow 3.3's worker log server can only bind all
interfaces, so the scheduler runs with ``--skip-serve-logs``: the api-server reads task logs
from the shared local log folder instead); files and logs are created private (umask 077, the
admin password file is written 0600 here before the api-server starts, so Airflow never prints
it to a log); MLflow telemetry is off (``MLFLOW_DISABLE_TELEMETRY``) for servers and clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pipeline/dev/ -> repo
# The triggerer runs deferred tasks and sensors; without it the UI's health badge is red.
AIRFLOW_SERVICES = ("dag-processor", "scheduler", "triggerer", "api-server")
# Extra arguments per service: Airflow 3.3's log server binds every interface (no host setting).
SERVICE_ARGS = {"scheduler": ("--skip-serve-logs",), "triggerer": ("--skip-serve-logs",)}
PRIVATE_UMASK = 0o077  # for every service process: its logs, databases and password files are 0600
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"


def private_file(path: str, mode: str = "w"):
    """Open ``path`` for writing, created (or reset to) 0600: only this user can read it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC), 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process serving {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@contextmanager
def background(cmd: list[str], log_path: str, env: dict[str, str] | None = None
               ) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` with its output in ``log_path`` (0600); stop it on exit."""
    with private_file(log_path) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ),
                                start_new_session=True, umask=PRIVATE_UMASK)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mlflow_command(workdir: str, port: int) -> list[str]:
    """A lean `mlflow server`: one worker, loopback, SQLite store and artifacts under workdir."""
    return [os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{os.path.abspath(workdir)}/mlflow.db",
            "--artifacts-destination", os.path.join(os.path.abspath(workdir), "mlartifacts")]


@contextmanager
def mlflow_server(workdir: str, port: int | None = None, timeout: float = 120.0) -> Iterator[str]:
    """Run a real MLflow tracking server on 127.0.0.1; yields its URI."""
    os.makedirs(workdir, exist_ok=True)
    port = port or free_port()
    # job execution off: it adds consumer processes (~2 GB) this server does not need
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **NO_TELEMETRY}
    with background(mlflow_command(workdir, port), os.path.join(workdir, "mlflow.log"), env) as proc:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", timeout=timeout, proc=proc)
        yield uri


def airflow_env(home: str, port: int, dags_folder: str | None = None, parallelism: int = 4,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Airflow process (services and CLI) of one local deployment."""
    return {
        **os.environ,
        "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
        "AIRFLOW_HOME": os.path.abspath(home),
        "AIRFLOW__CORE__DAGS_FOLDER": dags_folder or os.path.join(REPO, "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # One worker process per parallel task: the default of 32 would swamp a laptop.
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        # Off by default; if someone turns it on, it still listens on loopback only.
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": "127.0.0.1",
        "AIRFLOW__API__WORKERS": "1",
        # Task processes report to the api-server's execution API: tell them where it is.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # Scheduler and api-server sign and check task tokens with this: it must be shared.
        "AIRFLOW__API_AUTH__JWT_SECRET": _jwt_secret(home),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        **NO_TELEMETRY,  # the tasks are MLflow clients
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **(extra or {}),
    }


def _jwt_secret(home: str) -> str:
    """A random secret kept in AIRFLOW_HOME, so a restarted service still trusts old tokens."""
    return _secret_file(os.path.join(home, "jwt_secret"), lambda: secrets.token_urlsafe(32))


def _secret_file(path: str, make) -> str:
    """The contents of ``path``, written 0600 with ``make()`` if it is not there yet; an older
    file with looser permissions is tightened."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make())
    os.chmod(path, 0o600)
    with open(path) as f:
        return f.read().strip()


def admin_password_file(home: str) -> str:
    """Write the simple auth manager's password file (0600) before the api-server starts: the
    api-server then finds the admin user there and never prints a generated password to its log."""
    path = os.path.join(home, PASSWORDS_FILE)
    _secret_file(path, lambda: json.dumps({"admin": secrets.token_urlsafe(16)}) + "\n")
    return path


class AirflowServices:
    """A running local Airflow: its processes, URL and environment, and ways to drive it."""

    def __init__(self, home: str, port: int, env: dict[str, str]):
        self.home, self.port, self.env = home, port, env
        self.url = f"http://127.0.0.1:{port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self._token: str | None = None

    def start(self, name: str) -> subprocess.Popen:
        """Start one service (``dag-processor``, ``scheduler`` or ``api-server``)."""
        log = private_file(os.path.join(self.home, f"{name}.log"), "a")
        self.procs[name] = subprocess.Popen([os.path.join(BIN, "airflow"), name, *SERVICE_ARGS.get(name, ())],
                                            stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, umask=PRIVATE_UMASK)
        log.close()
        return self.procs[name]

    def kill(self, name: str) -> None:
        """SIGKILL a service and everything it started (as a crashed machine would lose them)."""
        proc = self.procs.pop(name)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``airflow ARGS`` against this deployment; output captured."""
        out = subprocess.run([os.path.join(BIN, "airflow"), *args], env=self.env, capture_output=True,
                             text=True, umask=PRIVATE_UMASK)
        if check and out.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} exited with {out.returncode}:\n{out.stderr[-3000:]}")
        return out

    def password(self, user: str = "admin") -> str:
        """The admin password (written 0600 by :func:`admin_password_file` before the services start)."""
        path = os.path.join(self.home, PASSWORDS_FILE)
        with open(path) as f:
            return json.load(f)[user]

    def rest(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the public REST API with a token from ``POST /auth/token``."""
        if self._token is None:
            self._token = http_json("POST", f"{self.url}/auth/token",
                                     {"username": "admin", "password": self.password()})["access_token"]
        return http_json(method, self.url + path, body, {"Authorization": f"Bearer {self._token}"})


    def wait_for_dag(self, dag_id: str, timeout: float = 180.0) -> None:
        """Wait until the dag-processor has parsed ``dag_id`` into the metadata DB."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.rest("GET", f"/api/v2/dags/{dag_id}")
                return
            except RuntimeError:
                time.sleep(2)
        raise TimeoutError(f"the dag-processor did not register {dag_id} within {timeout:.0f}s; "
                           f"see {self.home}/dag-processor.log")

    def trigger_rest(self, dag_id: str, conf: dict[str, Any], run_id: str) -> dict[str, Any]:
        """``POST /api/v2/dags/{dag_id}/dagRuns``: queue a run now."""
        return self.rest("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                         {"dag_run_id": run_id, "logical_date": None, "conf": conf})

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600.0, poll: float = 3.0) -> str:
        """Poll the REST API until the run succeeds or fails; returns its state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.rest("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                return state
            time.sleep(poll)
        raise TimeoutError(f"{dag_id} run {run_id} did not finish within {timeout:.0f}s; task logs are "
                           f"under {self.home}/logs")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """{task_id or task_id[map_index]: state} of one run."""
        tis = self.rest("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")
        return {ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else ""): ti["state"]
                for ti in tis["task_instances"]}


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # the service and its workers and task processes


def http_json(method: str, url: str, body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url} answered {e.code}: {e.read()[:500]!r}") from None


@contextmanager
def airflow_services(home: str, port: int | None = None, dags_folder: str | None = None,
                     gpu_slots: int = 1, parallelism: int = 4, env: dict[str, str] | None = None,
                     timeout: float = 180.0) -> Iterator[AirflowServices]:
    """Migrate the metadata DB, create the ``gpu`` pool, start dag-processor, scheduler, triggerer
    and api-server on 127.0.0.1; yield them; stop them all on exit. ``env`` adds variables
    (``MLFLOW_TRACKING_URI``, Airflow settings) to every process."""
    os.makedirs(home, mode=0o700, exist_ok=True)
    port = port or free_port()
    af = AirflowServices(home, port, airflow_env(home, port, dags_folder, parallelism, env))
    admin_password_file(home)
    af.cli("db", "migrate")
    af.cli("pools", "set", "gpu", str(gpu_slots), "GPU training tasks: slots = trainings at once")
    try:
        for name in AIRFLOW_SERVICES:
            af.start(name)
        wait_http(f"{af.url}/api/v2/monitor/health", timeout=timeout, proc=af.procs["api-server"])
        yield af
    finally:
        af.stop_all()
