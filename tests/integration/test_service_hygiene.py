"""Local service hygiene (pipeline.dev.services) with a real Airflow import in a child interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.dev import services


def test_airflow_does_not_print_a_password_it_finds_in_the_file(tmp_path):
    """Airflow's simple auth manager prints only passwords it generates: ours is already there."""
    home = tmp_path / "home"
    services.admin_password_file(str(home))
    code = ("from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager\n"
            "SimpleAuthManager().init()\n")
    env = {**services.airflow_env(str(home), 8080), "AIRFLOW__CORE__AUTH_MANAGER":
           "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    password = json.loads((home / services.PASSWORDS_FILE).read_text())["admin"]
    assert password not in out.stdout + out.stderr and "Password for user" not in out.stdout + out.stderr
