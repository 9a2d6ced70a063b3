"""End-to-end smoke test on the embedded default: tiny data -> `airflow dags test imagen_full`
(every stage, the tiny presets) -> MLflow registry -> `imagen-pipeline sample`. Everything
local, loopback only.

    make smoke-test                       # or: python infra/smoke_test.py [--workdir DIR] [--no-rerun]

It renders the tiny dataset and serves it on 127.0.0.1, starts a real `mlflow server`
(SQLite backend, local artifacts) on 127.0.0.1, migrates a temporary Airflow metadata DB
(SQLite) with a `gpu` pool, runs the DAG in process with `airflow dags test`, checks that the
registry has every stage and the cascade under their alias, checks that each stage's loader
yielded only images at least as large as that stage (``IMAGEN_DATA_AUDIT``), no training
loader yielded a held-out sample, each stage's run counts the rendered images too small for it
and logs a validation-loss series, samples a PNG from the base model
and the cascade, then runs the DAG again with the same conf and checks that it reused everything
(no new shard, checkpoint or model version), and stops every process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

from imagen.config import STAGES, preset
from pipeline.data.split import TRAIN, split_of
from pipeline.dev.services import background, free_port, mlflow_server, wait_http
from pipeline.dev.tinydata import OWN_SERVER_POLITENESS
from pipeline.layout import RunLayout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
PREFIX = "imagen"
MODEL_NAME = f"{PREFIX}-base64"


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def check_png(path: str, size: int) -> None:
    from PIL import Image

    with Image.open(path) as im:
        if im.format != "PNG" or im.size != (size, size):
            raise RuntimeError(f"{path} is not a sampled {size}px PNG ({im.format}, {im.size})")
    print(f"sampled {path} ({im.size[0]}x{im.size[1]})")


def registered_versions(client) -> dict[str, list[str]]:
    """{model name: [versions]} of every stage and the cascade; fails if one is missing."""
    names = [f"{PREFIX}-{s}" for s in STAGES] + [f"{PREFIX}-cascade"]
    found = {n: sorted(v.version for v in client.search_model_versions(f"name='{n}'")) for n in names}
    missing = [n for n, v in found.items() if not v]
    if missing:
        raise RuntimeError(f"not registered: {missing}; see the register_* task logs above")
    for n in names:
        client.get_model_version_by_alias(n, "challenger")
    return found


def snapshot(root: str) -> dict[str, float]:
    """{relative path: mtime} of the outputs: raw shards and their stats, filtered shards,
    embeddings, checkpoints (not the download's bookkeeping of the URL list)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            top = rel.split(os.sep)[0]
            if top in ("filtered", "embeddings", "checkpoints") or (
                    top == "raw" and re.fullmatch(r"\d+(\.tar|\.parquet|_stats\.json)", f)):
                out[rel] = os.path.getmtime(os.path.join(root, rel))
    return out


def check_stage_data(tiny: str, root: str, audit_dir: str, client) -> dict[str, int]:
    """Each stage trained on real pixels at its own size: every image its loader yielded (the
    audit lines the loader writes) comes from a rendered source at least that large, and its
    MLflow run's ``data_excluded_too_small`` is the number of kept sources smaller than it."""
    import glob

    import pyarrow.parquet as pq

    from pipeline.data.shards import iter_samples

    native = {r["url"]: min(r["source_width"], r["source_height"])
              for r in pq.read_table(os.path.join(tiny, "urls.parquet")).to_pylist()}
    key_side, train_keys = {}, set()
    for shard in glob.glob(os.path.join(RunLayout(root).filtered, "*.tar")):  # both splits
        for key, members in iter_samples(shard):
            if "json" in members:
                key_side[key] = native[json.loads(members["json"])["url"]]
                if split_of(shard) == TRAIN:
                    train_keys.add(key)
    lines = []
    for path in glob.glob(os.path.join(audit_dir, "*.jsonl")):
        with open(path) as f:
            lines += [json.loads(x) for x in f]
    seen: dict[int, int] = {}
    for x in lines:
        if x.get("split", TRAIN) == TRAIN and x["key"] not in train_keys:
            raise RuntimeError(f"a training loader yielded {x['key']}, a held-out validation sample")
        if key_side[x["key"]] < x["image_size"] or min(x["stored"]) < x["image_size"]:
            raise RuntimeError(f"a {x['image_size']} px stage trained on {x['key']}, a "
                               f"{key_side[x['key']]} px source: it was upscaled")
        seen[x["image_size"]] = seen.get(x["image_size"], 0) + 1
    excluded = {}
    for stage in STAGES:
        size = preset("tiny", stage).image_size
        want = sum(key_side[k] < size for k in train_keys)  # the run counts its training samples
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.stage = '{stage}'")
        got = {int(r.data.params["data_excluded_too_small"]) for r in runs
               if "data_excluded_too_small" in r.data.params}
        if size not in seen or got != {want}:
            raise RuntimeError(f"{stage}: the loader yielded {seen.get(size, 0)} images; its run logged "
                               f"data_excluded_too_small={got}, but {want} kept sources are under {size} px")
        excluded[stage] = want
    if not excluded[STAGES[-1]]:
        raise RuntimeError(f"no source is too small for {STAGES[-1]}: the tiny data must exercise the rule")
    print(f"stage data: {len(lines)} yielded images, each from a source at least its stage's size; "
          f"left out as too small: {excluded}")
    return excluded


def check_sr_evaluated(client) -> dict[str, float]:
    """Each SR stage's training run holds its PSNR and that of bicubic upsampling (the evaluate
    task scores every trained stage)."""
    gains = {}
    experiments = [e.experiment_id for e in client.search_experiments()]
    for stage in STAGES[1:]:
        psnr, bicubic = "eval/psnr", "eval/psnr_bicubic"  # a stage run's names (evaluate.run_metrics)
        runs = [r for r in client.search_runs(experiments, filter_string=f"tags.stage = '{stage}'")
                if psnr in r.data.metrics]
        if not runs or bicubic not in runs[0].data.metrics:
            raise RuntimeError(f"{stage}: no PSNR against bicubic in its training run: was it evaluated?")
        m = runs[0].data.metrics
        gains[stage] = round(m[psnr] - m[bicubic], 2)
    print(f"SR stages evaluated: PSNR gain over bicubic (dB) {gains}")
    return gains


def check_validated(client) -> dict[str, float]:
    """Each stage's training run holds a ``val/loss`` series on the held-out split (at least
    three points: the trainer validates at least four times in a run) and its final value."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    final = {}
    for stage in STAGES:
        runs = [r for r in client.search_runs(experiments, filter_string=f"tags.stage = '{stage}'")
                if "val/loss" in r.data.metrics]
        if not runs:
            raise RuntimeError(f"{stage}: its training run logged no val/loss")
        history = client.get_metric_history(runs[0].info.run_id, "val/loss")
        if len(history) < 3:
            raise RuntimeError(f"{stage}: val/loss logged at {len(history)} step(s), expected at least 3")
        final[stage] = round(runs[0].data.metrics["val/loss"], 4)
    print(f"validation loss on the held-out split, final: {final}")
    return final


def check_reused(before: dict[str, float], after: dict[str, float], versions: dict, versions_after: dict
                 ) -> None:
    """A rerun with the same conf rewrites no shard, embedding or checkpoint and registers nothing."""
    new = sorted(set(after) - set(before))
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    if new or changed or versions_after != versions:
        raise RuntimeError(f"the second run was not a no-op: new files {new[:10]}, rewritten {changed[:10]}, "
                           f"model versions {versions} -> {versions_after}")
    print(f"reused: {len(before)} files untouched, model versions unchanged {versions_after}")


def main() -> int:
    # One function, top to bottom: it is the smoke test's script (services up, the DAG, the checks, the
    # rerun), read as one story; each step is announced by step() and checked where it happens.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", help="where outputs go (default: a new temp dir)")
    p.add_argument("--max-steps", type=int, default=20, help="training steps per stage (default 20)")
    p.add_argument("--no-rerun", action="store_true", help="skip the second run that checks reuse")
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
    audit = os.path.join(work, "data-audit")  # every loader writes what it yields (pipeline.data.loader)
    shutil.rmtree(audit, ignore_errors=True)
    env["IMAGEN_DATA_AUDIT"] = audit
    # The fetch guard's one exemption, set by the deployment (the trigger form has no such Param):
    # the tiny image server on loopback.
    env["IMAGEN_ALLOW_HOSTS"] = f"127.0.0.1:{img_port}"
    env.pop("IMAGEN_ALLOW_PRIVATE_NETWORKS", None)
    with ExitStack() as stack:
        step(f"tiny dataset + loopback image server on 127.0.0.1:{img_port}")
        server = stack.enter_context(background(
            [os.path.join(BIN, "imagen-pipeline"), "tiny-data", "--output", tiny, "--port", str(img_port),
             "--serve"], os.path.join(work, "tiny-server.log"), env))
        wait_http(f"http://127.0.0.1:{img_port}/urls.parquet", timeout=120, proc=server)

        step(f"mlflow server on {tracking}")
        stack.enter_context(mlflow_server(work, mlflow_port))

        step("airflow db migrate (SQLite) + the gpu pool")
        run([os.path.join(BIN, "airflow"), "db", "migrate"], env)
        run([os.path.join(BIN, "airflow"), "pools", "set", "gpu", "3", "training tasks"], env)

        # Small shards and embed batches, so the mapped embed task runs more than once.
        conf = {"root": root, "url_list": os.path.join(tiny, "urls.parquet"),
                "encoder": os.path.join(tiny, "t5-tiny"),
                "presets": dict.fromkeys(STAGES, "tiny"), "max_steps": args.max_steps, "model_prefix": PREFIX, "filtered_shard_size": 50,
                "embed_shards_per_task": 2, "attributes": os.path.join(tiny, "attributes.json"),
                # a tenth held out: the 128 px stage gets validation samples in every session
                # (the tiny URLs carry the server's random port, so the split differs each time)
                "val_fraction": 0.1, **OWN_SERVER_POLITENESS}
        step("airflow dags test imagen_full")
        run([os.path.join(BIN, "airflow"), "dags", "test", "imagen_full", "-c", json.dumps(conf)], env)

        step("registry check")
        import mlflow

        mlflow.set_tracking_uri(tracking)
        versions = registered_versions(mlflow.MlflowClient())
        mv = mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, "challenger")
        print(f"registered: {versions}")

        step("each stage trained only on images at least its size")
        check_stage_data(tiny, root, audit, mlflow.MlflowClient())
        check_validated(mlflow.MlflowClient())
        check_sr_evaluated(mlflow.MlflowClient())

        if not args.no_rerun:
            step("airflow dags test imagen_full again, same conf: everything is reused")
            before = snapshot(root)
            run([os.path.join(BIN, "airflow"), "dags", "test", "imagen_full", "-c", json.dumps(conf)], env)
            check_reused(before, snapshot(root), versions, registered_versions(mlflow.MlflowClient()))

        step("sample from the registry: the base model and the cascade")
        pngs = {MODEL_NAME: os.path.join(work, "sample.png"),
                f"{PREFIX}-cascade": os.path.join(work, "sample-cascade.png")}
        # tiny presets: base 32 px -> sr256 64 px -> sr1024 128 px; the cascade holds all three
        sizes = {MODEL_NAME: preset("tiny", "base64").image_size,
                 f"{PREFIX}-cascade": preset("tiny", STAGES[-1]).image_size}
        for model in pngs:
            run([os.path.join(BIN, "imagen-pipeline"), "sample", "a red circle on a white background",
                 "--model", f"models:/{model}@challenger", "--output", pngs[model], "--steps", "16"], env)
            check_png(pngs[model], sizes[model])
        png = pngs[MODEL_NAME]

    elapsed = time.monotonic() - t_start
    print(f"""
Smoke test passed in {elapsed:.0f}s.
  registered models: models:/{PREFIX}-<base64|sr256|sr1024|cascade>@challenger
                     (base64 version {mv.version})
  sample images    : {png} and {pngs[PREFIX + "-cascade"]}
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
