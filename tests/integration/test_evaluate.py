"""pipeline/release/evaluate.py logging into a real `mlflow server` on untrained tiny stages, without
a validation split (on one: tests/integration/test_evaluate_validation.py): a stage's metrics land
in its training run, a cascade's SR scores on renders of the tiny data against bicubic (random
weights: what gets logged where, bicubic PSNR against its closed form, alignment recomputed from
the grid)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.grids import label_margins
from pipeline.release import metrics
from tests.unit.test_evaluate import SPECS, make_stage  # shared with the unit tier


def test_evaluate_stage_logs_to_its_training_run(setup, mlflow_uri, tmp_path):
    import mlflow

    from pipeline.release.evaluate import evaluate

    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("eval-test") or client.get_experiment(client.create_experiment("eval-test"))
    train_run = client.create_run(exp.experiment_id, tags={"checkpoint": os.path.abspath(setup["base"])})
    client.set_terminated(train_run.info.run_id)  # training ended; evaluation comes later
    trained = client.get_run(train_run.info.run_id).info
    out = evaluate(setup["base"], attributes=setup["attributes"], steps=2, tracking_uri=mlflow_uri,
                   output=str(tmp_path / "eval"))
    assert out["run_id"] == train_run.info.run_id and out["tracking_uri"] == mlflow_uri
    # issue 28 item 8: the run keeps its training times, it is not reopened
    after = client.get_run(train_run.info.run_id).info
    assert (after.status, after.start_time, after.end_time) == ("FINISHED", trained.start_time, trained.end_time)
    m = out["metrics"]
    assert m["chance_alignment"] == 0.25 and m["chance_alignment_color"] == 0.5
    assert m["seconds_per_image/base64"] == pytest.approx(m["seconds_per_image_guided"])
    assert m["images_per_s_guided"] == pytest.approx(1 / m["seconds_per_image_guided"])
    # no validation split given: no grid of its captions, and FID/CLIP without weights
    assert set(out["skipped"]) == {"fid", "clip_score", "validation_grid"}
    assert "--data ROOT/filtered" in out["skipped"]["validation_grid"]
    # the logged alignment is the checker's verdict on the images in the logged grid
    palette = {"red": (220, 30, 30), "blue": (40, 70, 220)}
    for label in ("guided", "unguided"):
        # rows: colours, columns: shapes, labelled
        tiles = grid_tiles(out["grids"][label], 4, 32, cols=2,
                           margins=label_margins(32, 2, ["circle", "square"], ["red", "blue"]))
        score = metrics.alignment(tiles, SPECS, palette)
        assert m[f"alignment_{label}"] == score["both"] and m[f"alignment_color_{label}"] == score["color"]
    run = client.get_run(train_run.info.run_id)
    assert run.data.metrics["eval/alignment_guided"] == m["alignment_guided"]
    # settings are tags, not metrics: the tiny base preset's weight
    assert run.data.tags["eval.guidance_scale"] == "3" and "eval/guidance_scale" not in run.data.metrics
    assert run.data.tags["eval.chance_alignment"] == "0.25" and run.data.tags["eval.prompts"] == "4"
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/grid_guided.png", "eval/grid_unguided.png", "eval/summary.json"} <= logged


def test_evaluate_cascade_scores_super_resolution(setup, mlflow_uri, tmp_path):
    import mlflow

    from pipeline.release.evaluate import EVAL_KEY_TAG, eval_key, evaluate

    fid_weights = str(tmp_path / "features.pt")

    class MeanColour(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    torch.jit.script(MeanColour()).save(fid_weights)
    ckpts = [setup["base"], setup["sr"]]
    out = evaluate(ckpts, attributes=setup["attributes"], steps=2, tracking_uri=mlflow_uri,
                   fid_weights=fid_weights, output=str(tmp_path / "eval"))
    m = out["metrics"]
    # bicubic baseline: the rendered references, down to 32 by area averaging (as the loader makes
    # an SR stage's input) and back up to 64 with bicubic, by hand
    refs = metrics.render_references(SPECS, 64, seed=0)
    up = np.stack([np.asarray(Image.fromarray(np.asarray(Image.fromarray(r).resize(
        (32, 32), Image.Resampling.BOX))).resize((64, 64), Image.Resampling.BICUBIC)) for r in refs])
    mse = ((up.astype(np.float64) - refs) ** 2).reshape(4, -1).mean(1) / 255.0**2
    assert m["sr256/psnr_bicubic"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), abs=1e-3)
    assert 0 < m["sr256/ssim_bicubic"] <= 1 and np.isfinite(m["sr256/psnr"])
    assert m["fid"] >= 0 and "fid" not in out["skipped"]
    assert set(m) >= {"seconds_per_image/base64", "seconds_per_image/sr256", "alignment_guided"}
    sr_grid = np.asarray(Image.open(out["grids"]["sr_sr256"]))
    top, left = label_margins(64, 2, ["bicubic", "sr256", "real"], ["x"])  # captions label the rows
    assert sr_grid.shape == (top + 4 * 66 + 2, left + 3 * 66 + 2, 3)  # rows of bicubic | SR | reference
    np.testing.assert_array_equal(grid_tiles(out["grids"]["sr_sr256"], 12, 64, cols=3, margins=(top, left))[2::3],
                                  refs)
    run = mlflow.MlflowClient(mlflow_uri).get_run(out["run_id"])
    assert run.info.run_name == "evaluate-cascade"
    assert run.data.tags[EVAL_KEY_TAG] == eval_key(ckpts)
    assert run.data.metrics["eval/sr256/psnr_bicubic"] == pytest.approx(m["sr256/psnr_bicubic"])




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.dev.tinymodels import build_tiny_t5

    root = tmp_path_factory.mktemp("evalroot")
    enc = build_tiny_t5(str(root / "t5"))
    attrs = root / "attributes.json"
    attrs.write_text(json.dumps({"colors": {"red": [220, 30, 30], "blue": [40, 70, 220]},
                                 "shapes": ["circle", "square"]}))
    return {"root": str(root), "encoder": enc, "attributes": str(attrs),
            "base": make_stage(str(root), "base64", enc), "sr": make_stage(str(root), "sr256", enc, seed=1)}


def grid_tiles(path: str, n: int, size: int, cols: int, pad: int = 2, margins=(0, 0)) -> np.ndarray:
    grid = np.asarray(Image.open(path))[margins[0]:, margins[1]:]
    tiles = []
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (size + pad), pad + c * (size + pad)
        tiles.append(grid[top: top + size, left: left + size])
    return np.stack(tiles)
