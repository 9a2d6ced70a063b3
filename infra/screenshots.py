"""Headless Chromium screenshots of the running UIs, for the docs and for review: the imagen_full
trigger form with its defaults (its top, and its foot with the Trigger button, enabled or not), the
DAG's grid, its graph with the Assets its tasks emit (raw -> filtered -> embeddings -> models), the
Assets page's graph of the imagen_embeddings Asset, and the MLflow runs compare view of the stages'
training runs (one row per stage, their metrics side by side).

    make services-up && make trigger-tiny      # services on 127.0.0.1, a tiny run for content
    python infra/screenshots.py                # PNGs in .screenshots/, a summary line per PNG
    python infra/screenshots.py --out /tmp/shots --airflow-url http://127.0.0.1:8080

Chromium: ``apt-get install -y chromium`` (Debian/Ubuntu; or set ``CHROMIUM=/path/to/chrome``).
It is driven through the DevTools protocol (``websocket-client``, installed with the project's
kubernetes dependency): the trigger form is a dialog behind a button, with no URL of its own.
Airflow login: a token from ``POST /auth/token`` with the admin password in
``$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated`` is set as the UI's cookie; services
run with ``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True`` need none. Not part of the tests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Any

from pipeline.dev.services import http_json, wait_http

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW = (1400, 1000)
INSTALL = ("no Chromium found: install it with `apt-get install -y chromium` (Debian/Ubuntu), "
           "`brew install --cask chromium` (macOS), or point CHROMIUM at a Chrome/Chromium binary")
# Clicks the DAG page's "Trigger" button, then reads the dialog's own Trigger button.
OPEN_FORM = """(() => {
  const b = [...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Trigger');
  if (!b) return 'no Trigger button on the page';
  b.click(); return 'clicked';
})()"""
FORM_STATE = """(() => {
  // every dialog on the page: the first one in the document is not always the form's
  const b = [...document.querySelectorAll('[role=dialog] button')].filter(b => b.innerText.trim() === 'Trigger').pop();
  const errors = [...document.querySelectorAll('[role=dialog] [aria-invalid=true]')].map(e => e.id || e.name);
  return {submit: b ? (b.disabled ? 'disabled' : 'enabled') : 'missing', invalid_fields: errors};
})()"""
# Scrolls the form's own Trigger button into view (the dialog scrolls, not the page).
SHOW_SUBMIT = """(() => {
  const b = [...document.querySelectorAll('[role=dialog] button')].filter(b => b.innerText.trim() === 'Trigger').pop();
  if (!b) return 'missing';
  b.scrollIntoView({block: 'center'}); return 'shown';
})()"""
# The DAG page's graph instead of its grid, with the Assets its tasks emit and consume (the UI's
# "Dependencies: External conditions", kept in localStorage like the rest of its view settings).
GRAPH_WITH_ASSETS = """localStorage.setItem('default_dag_view', JSON.stringify('graph'));
localStorage.setItem('dependencies-%s', JSON.stringify('immediate'));"""
GRID_VIEW = "localStorage.setItem('default_dag_view', JSON.stringify('grid'));"
# MLflow: close the assistant panel and fold the charts; the page back to Run details (the run
# names above the tables).
SHOW_TABLES = """(() => {
  const close = document.querySelector('button[aria-label=Close]');
  if (close) close.click();
  const header = name => [...document.querySelectorAll('[class*=collapse-header]')].find(e => e.innerText.trim() === name);
  const charts = header('Visualizations');
  if (charts) charts.click();
  const top = header('Run details');
  if (top) top.scrollIntoView({block: 'start'});
  return top ? 'tables' : 'no run details';
})()"""


def chromium_binary() -> str:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit(INSTALL)


class Browser:
    """One headless Chromium tab over the DevTools protocol."""

    def __init__(self, binary: str):
        import websocket  # websocket-client

        self.profile = tempfile.mkdtemp(prefix="imagen-shots-")
        args = [binary, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars", "--no-first-run", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._devtools_port(binary)
        tab = http_json("PUT", f"http://127.0.0.1:{port}/json/new?about:blank")
        # no Origin header: Chromium refuses DevTools websockets from origins it was not told of
        self.ws = websocket.create_connection(tab["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=WINDOW[0], height=WINDOW[1],
                  deviceScaleFactor=1, mobile=False)

    def _devtools_port(self, binary: str) -> str:
        """The port Chromium chose, from the DevToolsActivePort file it writes in its profile."""
        path = os.path.join(self.profile, "DevToolsActivePort")
        for _ in range(300):
            if os.path.exists(path):
                with open(path) as f:
                    text = f.read().split()
                if text:
                    return text[0]
            time.sleep(0.1)
        self.close()
        sys.exit(f"{binary} did not start its DevTools endpoint in 30 s")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive in between: keep the answer to this call
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str) -> Any:
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, settle: float = 6.0) -> None:
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.js("document.readyState") != "complete":
            time.sleep(0.3)
        time.sleep(settle)  # the single-page apps fetch their data after the load event

    def size(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def shot(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def airflow_login(browser: Browser, url: str, home: str) -> None:
    """Set the UI's token cookie from the admin password (skipped when there is no password file:
    services with every user admin need none)."""
    path = os.path.join(home, "simple_auth_manager_passwords.json.generated")
    if not os.path.exists(path):
        return
    with open(path) as f:
        password = json.load(f)["admin"]
    token = http_json("POST", f"{url}/auth/token", {"username": "admin", "password": password})["access_token"]
    browser.send("Network.enable")
    browser.send("Network.setCookie", name="_token", value=token, url=url + "/")


def asset_id(url: str, home: str, name: str) -> int | None:
    """The Assets page id of ``name`` through the REST API (None if the API answers nothing)."""
    path = os.path.join(home, "simple_auth_manager_passwords.json.generated")
    headers = {}
    if os.path.exists(path):
        with open(path) as f:
            password = json.load(f)["admin"]
        token = http_json("POST", f"{url}/auth/token", {"username": "admin", "password": password})["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
    found = http_json("GET", f"{url}/api/v2/assets?name_pattern={name}", headers=headers)["assets"]
    return next((a["id"] for a in found if a["name"] == name), None)


def compare_url(mlflow: str) -> tuple[str, int]:
    """The runs compare view of the experiment with the most stage training runs (tag `stage`: one
    row per stage, evaluation in it), up to 6 of the newest; without any, its newest runs."""
    experiments = http_json("POST", f"{mlflow}/api/2.0/mlflow/experiments/search", {"max_results": 100})
    best, runs = None, []
    for query in ("tags.stage LIKE '%'", ""):
        for exp in experiments.get("experiments", []):
            found = http_json("POST", f"{mlflow}/api/2.0/mlflow/runs/search",
                              {"experiment_ids": [exp["experiment_id"]], "filter": query,
                               "max_results": 6}).get("runs", [])
            if len(found) > len(runs):
                best, runs = exp["experiment_id"], found
        if runs:
            break
    if not runs:
        return f"{mlflow}/#/experiments", 0
    ids = json.dumps([r["info"]["run_id"] for r in runs])
    query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([best])})
    return f"{mlflow}/#/compare-runs?{query}", len(runs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, ".screenshots"))
    p.add_argument("--airflow-url", default="http://127.0.0.1:8080")
    p.add_argument("--airflow-home", default=os.environ.get("AIRFLOW_HOME", os.path.join(REPO, ".airflow")))
    p.add_argument("--mlflow-url", default="http://127.0.0.1:5000")
    p.add_argument("--dag", default="imagen_full")
    args = p.parse_args()
    binary = chromium_binary()
    for name, url in (("Airflow", f"{args.airflow_url}/api/v2/monitor/health"), ("MLflow", f"{args.mlflow_url}/health")):
        try:
            wait_http(url, timeout=10)
        except TimeoutError as e:
            sys.exit(f"{name} does not answer at {url} ({e}): start the services with `make services-up`")
    os.makedirs(args.out, exist_ok=True)
    browser = Browser(binary)
    summary = {}
    try:
        airflow_login(browser, args.airflow_url, args.airflow_home)
        browser.open(f"{args.airflow_url}/dags", settle=2)  # localStorage is per origin
        browser.js(GRID_VIEW)
        browser.open(f"{args.airflow_url}/dags/{args.dag}")
        browser.shot(grid := os.path.join(args.out, "airflow_grid.png"))
        summary[grid] = f"{args.dag}: the DAG page with its grid of runs"
        clicked = browser.js(OPEN_FORM)
        time.sleep(4)
        state = browser.js(FORM_STATE)
        browser.shot(form := os.path.join(args.out, "airflow_trigger_form.png"))
        summary[form] = f"trigger form with its defaults ({clicked}): {state}"
        shown = browser.js(SHOW_SUBMIT)
        time.sleep(1)
        browser.shot(submit := os.path.join(args.out, "airflow_trigger_form_submit.png"))
        summary[submit] = f"the form's foot, its Trigger button {shown}: {browser.js(FORM_STATE)['submit']}"
        browser.js(GRAPH_WITH_ASSETS % args.dag)
        browser.size(2000, 800)  # wide: the graph fits its width, and its labels stay legible
        browser.open(f"{args.airflow_url}/dags/{args.dag}")
        browser.shot(graph := os.path.join(args.out, "airflow_graph_assets.png"))
        summary[graph] = f"{args.dag}'s graph with the Assets its tasks emit (raw -> filtered -> embeddings -> models)"
        browser.js(GRID_VIEW)
        browser.size(*WINDOW)
        emb = asset_id(args.airflow_url, args.airflow_home, "imagen_embeddings")
        browser.open(f"{args.airflow_url}/assets/{emb}" if emb is not None else f"{args.airflow_url}/assets")
        browser.shot(assets := os.path.join(args.out, "airflow_assets_graph.png"))
        summary[assets] = f"the imagen_embeddings asset and its lineage (asset id {emb})"
        url, n = compare_url(args.mlflow_url)
        # tall: the run names above, the metrics below (a table below the fold is never drawn)
        browser.size(WINDOW[0], 1600)
        browser.open(url, settle=10)
        browser.shot(compare := os.path.join(args.out, "mlflow_compare_runs.png"))
        summary[compare] = f"MLflow runs compare view of {n} runs: {url}"
        table = browser.js(SHOW_TABLES)  # the metrics table from its top (its own scroll box: a
        time.sleep(2)                      # virtualized grid of names beside one of values)
        browser.shot(metrics := os.path.join(args.out, "mlflow_compare_metrics.png"))
        summary[metrics] = f"the same runs, charts folded: run details, parameters, metrics ({table})"
    finally:
        browser.close()
    for path, what in summary.items():
        print(f"{path}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
