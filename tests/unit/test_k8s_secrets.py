"""infra/k8s without a cluster: no Secret is deployed by kustomize (the user creates
``imagen-secrets``, with the command in infra/README.md), MLflow runs its basic-auth app and
Airflow its simple auth manager on user-supplied passwords, and no password sits in a URI.
Running the auth scripts (and a throwaway Postgres) is tests/integration/test_k8s_secrets.py."""

import configparser
import glob
import json
import os
import re

import pytest

yaml = pytest.importorskip("yaml")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(REPO, "infra", "k8s")
SECRET = "imagen-secrets"


def docs() -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        with open(path) as f:
            out += [d for d in yaml.safe_load_all(f) if d]
    return out


def find(kind: str, name: str) -> dict:
    return next(d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def secret_keys() -> set[str]:
    """Every key of imagen-secrets a manifest reads."""
    keys = set()

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if ref:
                assert ref["name"] == SECRET
                keys.add(ref["key"])
            if node.get("secretName") == SECRET:
                keys.update(item["key"] for item in node["items"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs())
    return keys


def readme_secret_command() -> str:
    with open(os.path.join(REPO, "infra", "README.md")) as f:
        text = f.read()
    m = re.search(rf"kubectl create secret generic {SECRET}.*?(?:\n\n|```)", text, re.S)
    assert m, f"infra/README.md shows no `kubectl create secret generic {SECRET}` command"
    return m.group(0)


def test_kustomize_deploys_no_secret():
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        kust = yaml.safe_load(f)
    assert not [r for r in kust["resources"] if "secret" in r.lower()]
    assert not [d for d in docs() if d["kind"] == "Secret"]  # not even an example with known passwords


def test_every_secret_key_is_created_by_the_documented_command():
    command = readme_secret_command()
    given = set(re.findall(r"--from-(?:literal|file)=([\w.-]+)=", command))
    assert secret_keys() == given
    # every value is generated or typed by the user, none is written in the README
    for value in re.findall(r"--from-literal=[\w.-]+=(\S+)", command):
        assert value.startswith(('"$', "$")), value


def test_no_password_inside_a_uri():
    for d in docs():
        for c in containers(d) if d["kind"] in ("Deployment", "StatefulSet", "Job") else []:
            text = json.dumps([c.get("args", []), c.get("command", []), c.get("env", [])])
            for uri in re.findall(r"[a-z0-9+]+://[^\s\"']+", text):
                assert not re.match(r"[a-z0-9+]+://[^/@]*:[^/@]*@", uri), f"{d['metadata']['name']}: {uri}"
    for name, value in find("ConfigMap", "airflow-env")["data"].items():
        assert not re.match(r"[a-z0-9+]+://[^/@]*:[^/@]*@", str(value)), name


def test_mlflow_runs_basic_auth_on_user_supplied_secrets():
    mlflow = find("Deployment", "mlflow")
    (c,) = containers(mlflow)
    assert "--app-name=basic-auth" in c["args"]
    env = env_of(c)
    for name, key in (("MLFLOW_AUTH_ADMIN_PASSWORD", "mlflow-admin-password"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "mlflow-flask-secret-key"),
                      ("PGPASSWORD", "mlflow-db-password")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": key}
    ini_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    mount = next(m for m in c["volumeMounts"] if ini_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod_spec(mlflow)["volumes"] if v["name"] == mount["name"])
    ini = find("ConfigMap", volume["configMap"]["name"])["data"][os.path.basename(ini_path)]
    cfg = configparser.ConfigParser()
    cfg.read_string(ini)
    section = cfg["mlflow"]
    assert "admin_password" not in section  # MLflow ships none; the Secret gives it
    assert section["default_permission"] in ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
    assert section["database_uri"] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow_auth"
    # the pipeline's tasks sign in
    sched = env_of(containers(find("Deployment", "airflow-scheduler"))[0])
    assert sched["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "mlflow-admin-password"


