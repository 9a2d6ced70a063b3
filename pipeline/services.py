"""Local services on loopback for the smoke test, the test suite and `make mlflow-ui`.

    with mlflow_server(workdir) as uri:     # real `mlflow server`, SQLite backend, local artifacts
        ...                                 # uri == "http://127.0.0.1:<port>"

Every process started here is stopped on exit (terminate, then kill).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

BIN = os.path.dirname(sys.executable)


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
    """Start ``cmd`` with its output in ``log_path``; stop it on exit."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ),
                                start_new_session=True)
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
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with background(mlflow_command(workdir, port), os.path.join(workdir, "mlflow.log"), env) as proc:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", timeout=timeout, proc=proc)
        yield uri
