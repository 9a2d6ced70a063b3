"""Evaluate a stage: sample a fixed prompt set with fixed seeds, log a grid and metrics to MLflow.

    imagen-pipeline evaluate --checkpoint ROOT/checkpoints/base64/run/final \\
        --attributes /tmp/tiny/attributes.json [--run-id RUN]

On the synthetic tiny dataset a deterministic checker scores prompt alignment: the
dominant non-background colour of each sample is matched to the nearest named colour of the
dataset palette. The score is reported with guidance (the stage's guidance weight) and
without (w = 1), so a user sees guidance working. Sampling speed is logged too.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

BACKGROUND_TOL = 60  # max channel distance from the background colour still called background


def dominant_color(image: np.ndarray, palette: dict[str, tuple[int, int, int]],
                   background: tuple[int, int, int] = (255, 255, 255)) -> str | None:
    """Name of the palette colour nearest to the median of the non-background pixels of a
    uint8 [H, W, 3] image; None when the image is all background."""
    px = image.reshape(-1, 3).astype(np.int32)
    fg = px[np.abs(px - np.array(background)).max(axis=1) > BACKGROUND_TOL]
    if len(fg) < max(4, px.shape[0] // 100):
        return None
    centre = np.median(fg, axis=0)
    names = list(palette)
    dists = [np.abs(centre - np.array(palette[n])).sum() for n in names]
    return names[int(np.argmin(dists))]


def alignment_score(images: np.ndarray, colors: list[str], palette: dict[str, tuple[int, int, int]]) -> float:
    """Fraction of images whose dominant colour is the prompted one."""
    hits = [dominant_color(img, palette) == c for img, c in zip(images, colors, strict=True)]
    return float(np.mean(hits))


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [B, H, W, 3] -> one uint8 grid image (written by hand: torchvision is not
    available beside this torch build, and this is ten lines)."""
    b, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def load_palette(attributes: str) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    with open(attributes) as f:
        attrs = json.load(f)
    return {k: tuple(v) for k, v in attrs["colors"].items()}, list(attrs["shapes"])


def evaluate(checkpoint: str, attributes: str | None = None, output: str | None = None,
             seed: int = 0, tracking_uri: str | None = None, run_id: str | None = None,
             steps: int | None = None, per_color: int = 2) -> dict[str, Any]:
    """Sample the prompt set with and without guidance; log grid + metrics; return metrics."""
    import mlflow
    from PIL import Image

    from imagen.cascade import Cascade, StageOptions
    from imagen.checkpoint import load_config
    from imagen.text import T5TextEncoder
    from pipeline.registry import _root_of
    from pipeline.tracking import ensure_experiment, resolve_tracking_uri

    cfg, meta = load_config(checkpoint)
    if cfg.lowres_size is not None:
        raise ValueError(f"{checkpoint} is an SR stage; evaluating SR stages comes with the cascade")
    if not attributes:
        raise ValueError("evaluate needs --attributes (the tiny dataset's attributes.json) for the "
                         "alignment checker; FID/CLIP on real data need metric weights (not yet supported)")
    palette, shapes = load_palette(attributes)
    colors = [c for c in palette for _ in range(per_color)]
    prompts = [f"a {c} {shapes[i % len(shapes)]} on a white background" for i, c in enumerate(colors)]
    cascade = Cascade.from_dirs([checkpoint])
    cascade.encoder = T5TextEncoder(meta.get("encoder_name") or cfg.text_encoder, max_length=cfg.max_text_len)

    metrics: dict[str, float] = {}
    grids = {}
    for label, w in (("guided", cfg.diffusion.guidance_scale), ("unguided", 1.0)):
        t0 = time.perf_counter()
        imgs = cascade.generate(prompts, seed=seed, options=[StageOptions(steps=steps, guidance_scale=w)])
        dt = time.perf_counter() - t0
        metrics[f"alignment_{label}"] = alignment_score(imgs, colors, palette)
        metrics[f"seconds_per_image_{label}"] = dt / len(prompts)
        grids[label] = make_grid(imgs)
    metrics["guidance_scale"] = float(cfg.diffusion.guidance_scale)
    metrics["chance_alignment"] = 1.0 / len(palette)

    out_dir = output or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "eval")
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for label, grid in grids.items():
        paths[label] = os.path.join(out_dir, f"grid_{label}.png")
        Image.fromarray(grid).save(paths[label])
    root = _root_of(checkpoint)
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri, root))
    exp_id = None if run_id else ensure_experiment("imagen", os.path.join(root, "mlartifacts"))
    with mlflow.start_run(run_id=run_id, experiment_id=exp_id,
                          run_name=None if run_id else f"evaluate-{cfg.stage}") as run:
        mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        for path in paths.values():
            mlflow.log_artifact(path, artifact_path="eval")
        mlflow.log_dict({"prompts": prompts, "seed": seed}, "eval/prompts.json")
    return {"metrics": metrics, "grids": paths, "run_id": run.info.run_id}
