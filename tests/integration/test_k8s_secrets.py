"""infra/k8s's scripts run for real, without a cluster: Airflow's simple auth manager signs in
with the passwords from the secret, and the Postgres init script takes any password, quotes
included (against a throwaway Postgres on a Unix socket and 127.0.0.1 when its binaries are
installed)."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from tests.unit.test_k8s_secrets import (  # shared with the unit tier
    SECRET,
    containers,
    find,
    pod_spec,
)


def test_airflow_requires_sign_in_with_passwords_from_the_secret(tmp_path):
    data = find("ConfigMap", "airflow-env")["data"]
    assert data["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    assert data["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    api, init = auth_init_container()
    script, src, dst = init["command"][2:]
    assert dst == data["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    volumes = {v["name"]: v for v in pod_spec(api)["volumes"]}
    secret_volume = next(m["name"] for m in init["volumeMounts"] if src.startswith(m["mountPath"] + "/"))
    assert volumes[secret_volume]["secret"]["secretName"] == SECRET
    auth_volume = next(m["name"] for m in containers(api)[-1]["volumeMounts"] if dst.startswith(m["mountPath"]))
    assert "emptyDir" in volumes[auth_volume]  # writable, private to the pod: the auth manager opens it a+

    env = {**os.environ, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer"}

    def run(passwords: str):
        (tmp_path / "in.json").write_text(passwords)
        out = tmp_path / "out.json"
        out.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "in.json"), str(out)],
                              capture_output=True, text=True, env=env, timeout=60)
        return proc, out

    proc, out = run(json.dumps({"admin": "a'b\"c", "viewer": "v", "extra": "x"}))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == {"admin": "a'b\"c", "viewer": "v"}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    proc, out = run(json.dumps({"admin": "a"}))  # viewer has none: Airflow would make one up and log it
    assert proc.returncode != 0 and not out.exists()
    assert "has no password for ['viewer']" in proc.stderr
    proc, out = run("{not json")
    assert proc.returncode != 0 and "must be a JSON object of user -> password" in proc.stderr


@pytest.mark.skipif(not (shutil.which("initdb") and shutil.which("pg_ctl") and shutil.which("psql")),
                    reason="needs the PostgreSQL server binaries (initdb, pg_ctl, psql)")
def test_postgres_init_script_takes_passwords_with_quotes():
    script = find("ConfigMap", "postgres-init")["data"]["init.sh"]
    root = os.geteuid() == 0
    if root:
        try:
            import pwd

            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root with no postgres user to run the server as")
    as_pg = ["runuser", "-u", "postgres", "--"] if root else []
    work = tempfile.mkdtemp(prefix="imagen-pg-")  # under /tmp: the postgres user must reach it
    if root:
        os.chown(work, pg.pw_uid, pg.pw_gid)
    data, sock, port = os.path.join(work, "data"), work, _free_port()
    passwords = {"postgres": "root'pw", "airflow": "it's a \"quoted\" pa$$word; DROP ROLE x; --",
                 "mlflow": "back\\slash 'and' $(date) :'x'"}
    pwfile = os.path.join(work, "pw")
    with open(pwfile, "w") as f:
        f.write(passwords["postgres"])
    if root:
        os.chown(pwfile, pg.pw_uid, pg.pw_gid)
    env = {**os.environ, "PGHOST": sock, "PGPORT": str(port)}
    try:
        subprocess.run([*as_pg, "initdb", "-D", data, "-U", "postgres", f"--pwfile={pwfile}",
                        "--auth-local=trust", "--auth-host=scram-sha-256"], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([*as_pg, "pg_ctl", "-D", data, "-w", "-l", os.path.join(work, "log"), "-o",
                        f"-k {sock} -p {port} -h 127.0.0.1", "start"], check=True, capture_output=True,
                       timeout=120)
        init = os.path.join(work, "init.sh")
        with open(init, "w") as f:
            f.write(script)
        proc = subprocess.run(["bash", init], capture_output=True, text=True, timeout=60, env={
            **env, "AIRFLOW_DB_PASSWORD": passwords["airflow"], "MLFLOW_DB_PASSWORD": passwords["mlflow"]})
        assert proc.returncode == 0, proc.stderr

        def connect(user, db, password):
            return subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", db, "-tAc",
                                   "select current_user"], capture_output=True, text=True, timeout=30,
                                  env={**os.environ, "PGPASSWORD": password})

        for user, db in (("airflow", "airflow"), ("mlflow", "mlflow"), ("mlflow", "mlflow_auth")):
            ok = connect(user, db, passwords[user])
            assert ok.returncode == 0 and ok.stdout.strip() == user, ok.stderr
        assert connect("airflow", "airflow", "wrong").returncode != 0
        assert connect("postgres", "postgres", passwords["postgres"]).stdout.strip() == "postgres"
    finally:
        subprocess.run([*as_pg, "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        time.sleep(0.2)
        shutil.rmtree(work, ignore_errors=True)










def auth_init_container():
    api = find("Deployment", "airflow-api-server")
    init = next(c for c in pod_spec(api)["initContainers"] if c["name"] == "auth-file")
    assert init["command"][:2] == ["python", "-c"]
    return api, init


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
