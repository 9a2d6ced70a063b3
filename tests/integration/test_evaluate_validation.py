"""Evaluation on real held-out data (issue 23, items 3 and 4): a tiny base and a tiny SR stage,
trained a few steps on the tiny data whose filter step held out a validation split, evaluated
as the DAG's ``evaluate`` task does it (``evaluate_runs``, no ``attributes``) into a real
`mlflow server`, then through the CLI with the deployment's evaluator weights set in its
environment (a tiny TorchScript feature extractor and a tiny local CLIP built here).

    .venv/bin/pytest tests/integration/test_evaluate_validation.py -q
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.grids import label_margins
from tests.unit.test_metrics import tiny_clip  # noqa: F401 - a fixture: a tiny local CLIP directory

STEPS = 2  # sampling steps: what is checked is where the figures come from, not how good they are


def train(stage: str, data: str, embeddings: str, out: str, tracking: str) -> dict:
    """``python -m pipeline.train`` for 3 steps; its summary (launch.py's ``trained``)."""
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", stage, "--preset", "tiny", "--data", data,
           "--embeddings", embeddings, "--checkpoint-dir", out, "--max-steps", "3", "--global-batch", "8",
           "--sample-every", "0", "--log-every", "3", "--tracking-uri", tracking]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(filtered_shards, tiny_embeddings, mlflow_uri, tmp_path_factory):
    from pipeline.data.loader import validation_shards_exist

    assert validation_shards_exist(filtered_shards), "the tiny data's filter step held out no validation split"
    root = tmp_path_factory.mktemp("evalval")
    return {s: train(s, filtered_shards, tiny_embeddings, str(root / s / "run1"), mlflow_uri)
            for s in ("base64", "sr256")}


@pytest.fixture(scope="module")
def evaluated(trained, mlflow_uri):
    """What the DAG's evaluate task does, with no evaluator weights in the environment."""
    from pipeline.release.evaluate import CLIP_MODEL_ENV, FID_WEIGHTS_ENV, evaluate_runs

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(FID_WEIGHTS_ENV, raising=False)
        mp.delenv(CLIP_MODEL_ENV, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        return evaluate_runs([trained["base64"], None, trained["sr256"]], steps=STEPS)


def real_validation(trained, stage: str):
    """The stage's first validation samples read here, straight from the loader."""
    from imagen.checkpoint import load_config
    from pipeline.data.loader import make_validation_loader
    from pipeline.train.validation import validation_data

    t = trained[stage]
    cfg = load_config(t["checkpoint"])[0]
    settings = dataclasses.replace(validation_data(cfg, t["data"], t["embeddings"], 64), crop_size=cfg.image_size,
                                   lowres_crop_size=cfg.lowres_size)
    (batch,) = list(make_validation_loader(settings, limit=16))
    return cfg, batch


def tiles(path: str, n: int, size: int, cols: int, pad: int = 2, margins=(0, 0)) -> np.ndarray:
    grid = np.asarray(Image.open(path))[margins[0]:, margins[1]:]
    out = []
    for i in range(n):
        r, c = divmod(i, cols)
        out.append(grid[pad + r * (size + pad): pad + r * (size + pad) + size,
                        pad + c * (size + pad): pad + c * (size + pad) + size])
    return np.stack(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b) ** 2).reshape(len(a), -1).mean(1) / 255.0**2
    return float(np.mean(10 * np.log10(1 / mse)))


def test_sr_stage_is_scored_against_real_held_out_images_in_its_own_run(trained, evaluated, mlflow_uri):
    import mlflow

    from pipeline.data.images import open_rgb

    client = mlflow.MlflowClient(mlflow_uri)
    sr = evaluated["sr256"]
    assert sr["reused"] is False and sr["run_id"] == trained["sr256"]["run_id"]
    cfg, batch = real_validation(trained, "sr256")
    n = len(batch["keys"])
    assert n >= 2
    # the grid's rows: bicubic | SR | real; the real column is the loader's whole validation image
    got = tiles(sr["grids"]["sr_sr256"], 3 * n, 64, cols=3,
                margins=label_margins(64, 2, ["bicubic", "sr256", "real"], batch["captions"]))
    bicubic, out, real = got[0::3], got[1::3], got[2::3]
    np.testing.assert_array_equal(real, batch["image"].permute(0, 2, 3, 1).numpy())
    # ... which is the held-out image itself: its stored bytes, short side to 64, centre crop
    key = batch["keys"][0]
    img = open_rgb(shard_member(trained["sr256"]["data"], key))
    scale = 64 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    left, top = (img.width - 64) // 2, (img.height - 64) // 2
    by_hand = np.asarray(img.crop((left, top, left + 64, top + 64)), dtype=np.int32)
    assert np.abs(by_hand - real[0]).mean() < 3  # PIL's resampling paths differ by rounding only
    # PSNR by hand against the real images, for the SR output and for bicubic upsampling of
    # the loader's own low-res input
    m = sr["metrics"]
    assert m["sr256/psnr"] == pytest.approx(psnr(out, real), abs=1e-3)
    low = batch["lowres"].permute(0, 2, 3, 1).numpy()
    up = np.stack([np.asarray(Image.fromarray(x).resize((64, 64), Image.Resampling.BICUBIC)) for x in low])
    np.testing.assert_array_equal(bicubic, up)
    assert m["sr256/psnr_bicubic"] == pytest.approx(psnr(up, real), abs=1e-3)
    assert 0 < m["sr256/ssim"] <= 1 and 0 < m["sr256/ssim_bicubic"] <= 1
    logged = client.get_run(trained["sr256"]["run_id"]).data.metrics
    # one naming scheme in every stage's run: eval/<metric>, the stage is the run's
    for name in ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic"):
        assert logged[f"eval/{name}"] == pytest.approx(m[f"sr256/{name}"])
    assert logged["eval/seconds_per_image"] == pytest.approx(m["sr256/seconds_per_image_sr"])
    base_logged = client.get_run(trained["base64"]["run_id"]).data.metrics
    assert "eval/seconds_per_image" in base_logged and "eval/psnr" not in base_logged
    assert not any(k.startswith("eval/sr256/") for k in logged)
    # no evaluator weights in the environment: skipped, saying which setting to give
    assert "IMAGEN_FID_WEIGHTS" in sr["skipped"]["sr256/fid"]
    assert "IMAGEN_CLIP_MODEL" in sr["skipped"]["sr256/clip_score"]
    summary = client.download_artifacts(trained["sr256"]["run_id"], "eval/summary.json")
    with open(summary) as f:
        logged_summary = json.load(f)
    assert logged_summary["validation"]["samples"]["sr256"]["keys"] == batch["keys"]
    assert set(logged_summary["skipped"]) >= {"sr256/fid", "sr256/clip_score"}


def test_base_stage_samples_validation_captions_beside_the_prompt_set(trained, evaluated, mlflow_uri):
    import mlflow

    base = evaluated["base64"]
    assert base["run_id"] == trained["base64"]["run_id"]
    from pipeline.release.evaluate import GRID_CAPTIONS

    cfg, batch = real_validation(trained, "base64")
    n = min(len(batch["keys"]), GRID_CAPTIONS)  # the grid alone samples at most GRID_CAPTIONS
    grid = np.asarray(Image.open(base["grids"]["validation"]))
    # one caption per row, its text to the left
    assert grid.shape == (n * 34 + 2, label_margins(32, 2, None, ["x"])[1] + 34 + 2, 3)
    assert {"guided", "unguided", "validation"} <= set(base["grids"])
    client = mlflow.MlflowClient(mlflow_uri)
    logged = {a.path for a in client.list_artifacts(trained["base64"]["run_id"], "eval")}
    assert {"eval/grid_validation.png", "eval/grid_guided.png", "eval/summary.json"} <= logged
    with open(client.download_artifacts(trained["base64"]["run_id"], "eval/summary.json")) as f:
        summary = json.load(f)
    assert summary["validation"]["samples"]["base64"] == {"keys": batch["keys"], "captions": batch["captions"]}
    assert set(base["skipped"]) == {"alignment", "fid", "clip_score"}
    assert "IMAGEN_FID_WEIGHTS" in base["skipped"]["fid"]
    assert base["metrics"]["seconds_per_image/base64"] > 0


def test_a_rerun_reuses_each_stages_result(trained, evaluated):
    from pipeline.release.evaluate import evaluate_runs

    again = evaluate_runs([trained["base64"], trained["sr256"]], steps=STEPS)
    assert all(r["reused"] for r in again.values())
    assert again["sr256"]["metrics"] == evaluated["sr256"]["metrics"]


def test_cli_measures_fid_and_clip_with_the_deployments_weights(trained, evaluated, mlflow_uri, tiny_clip,  # noqa: F811
                                                                 tmp_path):
    features = str(tmp_path / "features.pt")

    class MeanColour(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    torch.jit.script(MeanColour()).save(features)
    base, sr = trained["base64"], trained["sr256"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "imagen-pipeline"), "evaluate",
           "--checkpoint", base["checkpoint"], "--checkpoint", sr["checkpoint"], "--data", base["data"],
           "--embeddings", base["embeddings"], "--steps", str(STEPS), "--tracking-uri", mlflow_uri,
           "--output", str(tmp_path / "eval")]
    env = {**os.environ, "IMAGEN_FID_WEIGHTS": features, "IMAGEN_CLIP_MODEL": tiny_clip, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    m = out["metrics"]
    assert m["fid"] >= 0 and m["sr256/fid"] >= 0
    assert 0 <= m["clip_score"] <= 100 and 0 <= m["sr256/clip_score"] <= 100
    assert not {"fid", "clip_score", "sr256/fid", "sr256/clip_score"} & set(out["skipped"])
    assert "[evaluate base64+sr256] validation captions, guided:" in proc.stdout  # progress lines


def test_dag_task_evaluates_without_attributes_with_the_workers_weights(trained, evaluated, mlflow_uri, tiny_clip,  # noqa: F811
                                                                        tmp_path, monkeypatch):
    """imagen_full's ``evaluate`` task as a worker runs it: no ``attributes`` Param, the
    evaluator weights in the worker's environment (on a copy of the SR run, so it is evaluated
    again rather than reused)."""
    import importlib
    import shutil

    from tests.unit.test_dags import DAGS

    features = str(tmp_path / "features.pt")

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    torch.jit.script(Mean()).save(features)
    run = os.path.dirname(trained["sr256"]["checkpoint"])
    shutil.copytree(run, tmp_path / "copy", ignore=shutil.ignore_patterns("eval.json"))
    copy = {**trained["sr256"], "checkpoint": str(tmp_path / "copy" / "final")}
    monkeypatch.setenv("IMAGEN_FID_WEIGHTS", features)
    monkeypatch.setenv("IMAGEN_CLIP_MODEL", tiny_clip)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.syspath_prepend(DAGS)
    dag = importlib.import_module("imagen_full").imagen_full()
    task = dag.task_dict["evaluate"].python_callable
    out = task(trained=[None, copy, None], params={"attributes": None, "encoder": "unused: no T5 is loaded"})
    m = out["sr256"]["metrics"]
    assert m["sr256/fid"] >= 0 and 0 <= m["sr256/clip_score"] <= 100 and "sr256/psnr" in m
    assert out["sr256"]["skipped"] == {"alignment": "needs --attributes (the tiny dataset's attributes.json)"}
    assert (tmp_path / "copy" / "eval.json").exists()


def shard_member(data: str, key: str) -> bytes:
    """The stored image bytes of ``key`` from the validation shards of ``data``, read by hand."""
    import glob
    import tarfile

    for shard in sorted(glob.glob(os.path.join(data, "val-*.tar"))):
        with tarfile.open(shard) as tar:
            for member in tar:
                stem, ext = os.path.splitext(member.name)
                if stem == key and ext in (".png", ".jpg", ".jpeg", ".webp"):
                    return tar.extractfile(member).read()
    raise AssertionError(f"{key} is in no val-*.tar of {data}")


def test_the_sweep_picks_the_best_pair_and_the_stage_and_its_model_sample_with_it(trained, evaluated, mlflow_uri):
    """Issue 26, item 1: evaluation sweeps (aug level, guidance weight) of the SR stage on its
    held-out images, logs the sweep, and stores the best pair with the stage: the checkpoint
    (sampling.json) and the model `register` makes from it sample with that pair."""
    import mlflow

    from imagen.checkpoint import SAMPLING_NAME, load_config
    from pipeline.release import sweep
    from pipeline.release.loading import download_model_files
    from pipeline.release.registry import register

    sr = evaluated["sr256"]
    m, ckpt = sr["metrics"], trained["sr256"]["checkpoint"]
    pairs = sweep.grid(load_config(ckpt)[0])
    assert len(pairs) >= 6 and (0.0, 1.0) in pairs
    table = {p: m[f"sr256/sweep/{sweep.metric_name(*p)}"] for p in pairs}
    best = max(table.values())
    chosen = (m["sr256/lowres_aug"], m["sr256/guidance_scale"])
    assert table[chosen] == best
    assert m["sr256/psnr"] == pytest.approx(best, abs=1e-9)  # the stage's figure is the chosen pair's
    assert sr["sampling"]["sr256"] == {"guidance_scale": chosen[1], "lowres_aug_sample": chosen[0]}
    # stored with the stage: config.json untouched, sampling.json beside it, applied on load
    with open(os.path.join(ckpt, "config.json")) as f:
        written = json.load(f)["diffusion"]
    assert (written["lowres_aug_sample"], written["guidance_scale"]) == (0.0, 1.0)  # the tiny anchors
    assert os.path.isfile(os.path.join(ckpt, SAMPLING_NAME))
    cfg, meta = load_config(ckpt)
    assert (cfg.diffusion.lowres_aug_sample, cfg.diffusion.guidance_scale) == chosen
    assert meta["sampling"]["metric"] == "psnr" and meta["sampling"]["source"] == "validation"
    assert len(meta["sampling"]["table"]) == len(pairs)
    # logged: the table as an artifact of the stage's own run
    client = mlflow.MlflowClient(mlflow_uri)
    names = [a.path for a in client.list_artifacts(sr["run_id"], "eval")]
    assert "eval/sweep_sr256.json" in names
    # the registered model's config carries the pair (what sample, the pyfunc and the cascade read)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
        reg = register([ckpt], "sweep-sr256")
        files = download_model_files(reg["uri"], os.path.join(os.path.dirname(ckpt), "registered"))
    got = load_config(files.stage_dirs[0])[0].diffusion
    assert (got.lowres_aug_sample, got.guidance_scale) == chosen
