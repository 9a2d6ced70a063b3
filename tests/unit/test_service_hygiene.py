"""Local service hygiene (pipeline.dev.services), at unit level: no Airflow or MLflow server starts.

Password files and logs are 0600, every listener is configured for 127.0.0.1 (and Airflow's
log server, which can only bind every interface, is not started), MLflow telemetry is off.

    .venv/bin/pytest tests/unit/test_service_hygiene.py -q
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from pipeline.dev import services


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_airflow_env_binds_loopback_and_turns_telemetry_off(tmp_path):
    env = services.airflow_env(str(tmp_path / "home"), 8080)
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST"] == "127.0.0.1"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://127.0.0.1:8080/")
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert mode(tmp_path / "home" / "jwt_secret") == 0o600
    assert "--host" in services.mlflow_command(str(tmp_path), 5000)
    command = services.mlflow_command(str(tmp_path), 5000)
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_admin_password_file_is_private_and_kept(tmp_path):
    path = services.admin_password_file(str(tmp_path))
    assert mode(path) == 0o600
    password = json.loads(Path(path).read_text())["admin"]
    assert len(password) >= 16
    os.chmod(path, 0o644)  # as Airflow itself wrote it before
    assert services.admin_password_file(str(tmp_path)) == path and mode(path) == 0o600
    assert json.loads(Path(path).read_text())["admin"] == password  # a restart keeps the password


@pytest.fixture
def fake_airflow(tmp_path, monkeypatch):
    """An `airflow` executable that records its arguments and creates a file, then exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "airflow"
    script.write_text('#!/bin/sh\necho "$@" >> "$AIRFLOW_HOME/argv"\necho "secret output"\n'
                      'touch "$AIRFLOW_HOME/created-$1"\n')
    script.chmod(0o755)
    monkeypatch.setattr(services, "BIN", str(bin_dir))
    return tmp_path / "home"


def test_services_write_private_logs_and_skip_the_log_server(fake_airflow):
    home = fake_airflow
    af = services.AirflowServices(str(home), 8080, services.airflow_env(str(home), 8080))
    (home / "api-server.log").write_text("an old log with a password\n")
    os.chmod(home / "api-server.log", 0o644)
    for name in services.AIRFLOW_SERVICES:
        af.start(name).wait(timeout=30)
    af.cli("db", "migrate")
    argv = (home / "argv").read_text().splitlines()
    assert argv == ["dag-processor", "scheduler --skip-serve-logs", "triggerer --skip-serve-logs", "api-server",
                    "db migrate"]
    for name in services.AIRFLOW_SERVICES:
        assert mode(home / f"{name}.log") == 0o600
        assert mode(home / f"created-{name}") == 0o600  # the services' own files (umask 077)
    assert mode(home / "created-db") == 0o600
    assert "an old log" in (home / "api-server.log").read_text()  # appended, not lost


def test_background_log_is_private(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("")
    os.chmod(log, 0o644)
    child_file = tmp_path / "child-file"
    code = f"open({str(child_file)!r}, 'w').write('x'); print('hello')"
    with services.background([sys.executable, "-c", code], str(log)) as proc:
        proc.wait(timeout=30)
    assert mode(log) == 0o600 and "hello" in log.read_text()
    assert mode(child_file) == 0o600


def test_services_find_the_projects_dags_folder():
    """The local Airflow gets the repo's dags/ (the module sits two folders below the root)."""
    import os

    from pipeline.dev import services

    env = services.airflow_env("/tmp/airflow-home-unused", 8080)
    assert os.path.isfile(os.path.join(env["AIRFLOW__CORE__DAGS_FOLDER"], "imagen_full.py"))
