"""Evaluate a stage or a whole cascade: fixed prompts and seeds, a sample grid, sampling speed
and metrics, logged to the stage's MLflow run.

    imagen-pipeline evaluate --checkpoint ROOT/checkpoints/base64/run/final \\
        --attributes /tmp/tiny/attributes.json                       # one stage
    imagen-pipeline evaluate --checkpoint BASE/final --checkpoint SR256/final \\
        --attributes /tmp/tiny/attributes.json                       # the cascade, in order
    ... [--references DIR] [--fid-weights inception-2015-12-05.pt] [--clip-model DIR]

What is measured (metric keys are logged under ``eval/``):

- samples of the prompt set from the first stage through the last given, with guidance (each
  stage's configured weight) and without (w = 1): grids ``grid_guided.png`` and
  ``grid_unguided.png``; ``seconds_per_image/<stage>``, ``images_per_s_guided``;
- on the synthetic tiny dataset (``--attributes``): one prompt per colour x shape, and the
  deterministic checker of pipeline/release/metrics.py: ``alignment_color_*``, ``alignment_shape_*``
  and ``alignment_*`` (both right), with ``chance_alignment`` for scale;
- every SR stage given: references (rendered from the attributes, or ``--references``)
  downsampled to its input size and super-resolved: ``<stage>/psnr``, ``<stage>/ssim``, and
  the same for plain bicubic upsampling as the bar to beat;
- ``fid`` and ``clip_score`` of the guided samples, only with user-supplied weights; skipped
  with a message otherwise.

A single stage logs into the MLflow run that trained it (found from the checkpoint), a
cascade into a new ``evaluate-cascade`` run; ``--run-id`` chooses one. The tracking store is
the one the checkpoint's training used (the root its metadata records, pipeline/layout.py).
Checkpoints and the grids' folder may be local paths or fsspec URIs (``s3://...``).

``evaluate_run(trained, attributes)`` is the orchestrators' one call: a finished training
run (launch.py's summary) evaluated once, its result kept in ``eval.json`` beside its checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from imagen.config import check_chain
from pipeline import storage
from pipeline.data.images import IMAGE_EXTS
from pipeline.release.metrics import make_grid

log = logging.getLogger(__name__)

# Prompts for a real-data model when no --prompts file is given: fixed, so runs compare.
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a table", "a red car parked on a city street",
    "a bowl of fruit on a wooden table", "a mountain lake at sunset",
    "a painting of a house near a tree", "a close up of a yellow flower",
    "a dog running on the beach", "a plate of food with a fork",
)
EVAL_KEY_TAG = "imagen_eval_key"  # on the run holding a checkpoint set's eval metrics (registry reads it)


@dataclass
class EvalOptions:
    """What to evaluate against and where to log. Every field has a CLI flag of the same name."""

    attributes: str | None = None  # tiny dataset attributes.json: alignment checker, rendered refs
    prompts: list[str] | None = None  # prompt set when not on tiny data (default: DEFAULT_PROMPTS)
    references: str | None = None  # real images: a folder of images or of WebDataset shards
    num_references: int = 16
    fid_weights: str | None = None  # TorchScript feature extractor (inception-2015-12-05.pt)
    clip_model: str | None = None  # local transformers CLIP directory
    encoder: str | None = None  # text encoder override (default: the checkpoint's)
    seed: int = 0
    steps: int | None = None  # sampling steps for every stage (default: each config's)
    guidance_scale: float | None = None  # the base stage's guided weight (default: its config's)
    output: str | None = None  # folder or URI for grids (default: beside the last checkpoint)
    tracking_uri: str | None = None
    run_id: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # filled in: metric -> why not measured


def eval_key(checkpoints: list[str]) -> str:
    """Identity of an evaluated checkpoint set (ordered absolute paths or URIs), for run lookup."""
    joined = "\n".join(storage.normalize(c) for c in checkpoints)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def evaluate(checkpoints: str | list[str], options: EvalOptions | None = None, **overrides: Any
             ) -> dict[str, Any]:
    """Evaluate one stage or a cascade (stage weight dirs in cascade order); log to MLflow.

    Returns {"metrics": {...}, "grids": {name: png}, "run_id", "skipped": {metric: reason}}.
    """
    from imagen.checkpoint import load_model

    checkpoints = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints)
    if not checkpoints:
        raise ValueError("evaluate needs at least one --checkpoint (a stage weights directory)")
    opts = replace(options or EvalOptions(), **overrides)
    opts.skipped = {}
    loaded = [load_model(c, storage=storage) for c in checkpoints]
    encoder = load_encoder(checkpoints, [m for _, _, m in loaded], opts.encoder)
    prompts, specs, palette = prompt_set(opts)
    metrics: dict[str, float] = {}
    images: dict[str, np.ndarray] = {}
    if loaded[0][1].lowres_size is None:
        from imagen.cascade import Cascade

        cascade = Cascade([(m, c) for m, c, _ in loaded], encoder, metadata=[m for _, _, m in loaded])
        images = sample_and_score(cascade, prompts, specs, palette, opts, metrics)
        quality_metrics(images["guided"], prompts, specs, opts, metrics)
    else:
        check_chain([c.spec for _, c, _ in loaded])  # SR stages without a base must still chain
    for model, cfg, _ in loaded:
        if cfg.lowres_size is not None:
            images[f"sr_{cfg.stage}"] = sr_metrics(model, cfg, encoder, specs, opts, metrics)
    for name, reason in opts.skipped.items():
        log.info("evaluate: %s skipped: %s", name, reason)
    grids = write_grids(images, opts.output or storage.join(storage.parent(storage.normalize(checkpoints[-1])),
                                                            "eval"))
    run_id = log_to_mlflow(checkpoints, [m for _, _, m in loaded], opts, metrics, grids, prompts)
    return {"metrics": metrics, "grids": grids, "run_id": run_id, "skipped": dict(opts.skipped)}


def load_encoder(checkpoints: list[str], metas: list[dict], override: str | None):
    """The text encoder the stages were trained on (``override`` first, else the local
    directory the checkpoint names; a hub name is used only as ``override``), checked against
    every stage's recorded encoder id."""
    from imagen.checkpoint import CONFIG_NAME, load_config
    from pipeline.release.loading import choose_encoder

    cfgs = [load_config(c, storage)[0] for c in checkpoints]
    return choose_encoder(storage.join(checkpoints[0], CONFIG_NAME), metas, cfgs, override=override)


def prompt_set(opts: EvalOptions) -> tuple[list[str], list[tuple[str, str]] | None, dict | None]:
    """Prompts, their (colour, shape) specs and the palette; specs/palette only on tiny data."""
    if not opts.attributes:
        opts.skipped["alignment"] = "needs --attributes (the tiny dataset's attributes.json)"
        return list(opts.prompts or DEFAULT_PROMPTS), None, None
    with storage.open(opts.attributes, "r") as f:  # an http(s) URL goes through the fetch guard
        attrs = json.load(f)
    palette = {k: tuple(v) for k, v in attrs["colors"].items()}
    specs = [(c, s) for c in palette for s in attrs["shapes"]]
    return [f"a {c} {s} on a white background" for c, s in specs], specs, palette


def sample_and_score(cascade, prompts, specs, palette, opts: EvalOptions,
                     metrics: dict[str, float]) -> dict[str, np.ndarray]:
    """Sample with and without guidance; speed per stage, alignment on tiny data."""
    from imagen.cascade import StageOptions

    n = len(cascade.stages)
    base_w = cascade.stages[0][1].diffusion.guidance_scale
    guided = [StageOptions(steps=opts.steps, guidance_scale=opts.guidance_scale if i == 0 else None)
              for i in range(n)]
    unguided = [StageOptions(steps=opts.steps, guidance_scale=1.0) for _ in range(n)]
    images = {}
    for label, stage_opts in (("guided", guided), ("unguided", unguided)):
        out = cascade.run(prompts, seed=opts.seed, options=stage_opts)
        images[label] = out.images
        total = sum(out.seconds)
        metrics[f"seconds_per_image_{label}"] = total / len(prompts)
        metrics[f"images_per_s_{label}"] = len(prompts) / total
        if label == "guided":
            for (_, cfg), sec in zip(cascade.stages, out.seconds, strict=True):
                metrics[f"seconds_per_image/{cfg.stage}"] = sec / len(prompts)
        if specs is not None:
            from pipeline.release.metrics import alignment

            score = alignment(out.images, specs, palette)
            metrics[f"alignment_{label}"] = score["both"]
            metrics[f"alignment_color_{label}"] = score["color"]
            metrics[f"alignment_shape_{label}"] = score["shape"]
    metrics["guidance_scale"] = float(base_w if opts.guidance_scale is None else opts.guidance_scale)
    if specs is not None:
        metrics["chance_alignment"] = 1.0 / len(specs)
        metrics["chance_alignment_color"] = 1.0 / len(palette)
    return images


def references(opts: EvalOptions, size: int, specs) -> tuple[np.ndarray, list[str]] | None:
    """Reference images [N, size, size, 3] and captions: ``--references`` when given, else
    renders of the tiny dataset's distribution; None when there is neither."""
    from pipeline.release.metrics import render_references, resize

    if opts.references:
        imgs, caps = load_references(opts.references, opts.num_references)
        return resize(imgs, size), caps
    if specs is None:
        return None
    return (render_references(specs, size, seed=opts.seed),
            [f"a {c} {s} on a white background" for c, s in specs])


def load_references(path: str, limit: int) -> tuple[np.ndarray, list[str]]:
    """Up to ``limit`` images (center-cropped squares at the smallest side found) with captions
    from a folder of images (caption from NAME.txt beside each, else "") or of WebDataset
    shards (the filter step's output)."""
    import webdataset

    from pipeline.data.images import open_rgb
    from pipeline.release.metrics import resize

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--references {path}: not a folder of images or of .tar shards")
    items: list[tuple[bytes, str]] = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith(".tar"):
            for parts in webdataset.WebDataset(full, shardshuffle=False, empty_check=False):
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                if img is not None:
                    items.append((img, parts.get("txt", b"").decode()))
                if len(items) >= limit:
                    break
        elif name.lower().endswith(tuple(f".{e}" for e in IMAGE_EXTS)):
            txt = os.path.splitext(full)[0] + ".txt"
            caption = ""
            if os.path.exists(txt):
                with open(txt) as f:
                    caption = f.read().strip()
            with open(full, "rb") as f:
                items.append((f.read(), caption))
        if len(items) >= limit:
            break
    if not items:
        raise ValueError(f"--references {path} holds no images (.png/.jpg/.webp or .tar shards)")
    crops = []
    for data, _ in items[:limit]:
        img = open_rgb(data)
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        crops.append(np.asarray(img.crop((left, top, left + side, top + side))))
    side = min(x.shape[0] for x in crops)
    return np.concatenate([resize(x[None], side) for x in crops]), [c for _, c in items[:limit]]


def sr_metrics(model, cfg, encoder, specs, opts: EvalOptions, metrics: dict[str, float]) -> np.ndarray | None:
    """PSNR/SSIM of one SR stage on downsampled references, and of bicubic upsampling."""
    import torch

    from imagen.cascade import StageOptions, run_stage, to_uint8
    from pipeline.release.metrics import psnr_ssim, resize

    refs = references(opts, cfg.image_size, specs)
    if refs is None:
        opts.skipped[f"{cfg.stage}/psnr"] = "needs --attributes (tiny data) or --references DIR"
        return None
    target, captions = refs
    low = resize(target, cfg.lowres_size, "area")  # as pipeline/data/loader.py makes the training input
    lowres = torch.from_numpy(low).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    text, mask = encoder.encode(captions)
    gen = torch.Generator().manual_seed(opts.seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        x = run_stage(model, cfg, StageOptions(steps=opts.steps), text.float(), mask.bool(), lowres, gen)
    metrics[f"{cfg.stage}/seconds_per_image_sr"] = (time.perf_counter() - t0) / len(captions)
    sr = to_uint8(x)
    bicubic = resize(low, cfg.image_size)
    for suffix, images in (("", sr), ("_bicubic", bicubic)):
        for k, v in psnr_ssim(images, target).items():
            metrics[f"{cfg.stage}/{k}{suffix}"] = v
    # rows of (bicubic input, super-resolved, reference)
    return np.stack([img for trio in zip(bicubic, sr, target, strict=True) for img in trio])


def quality_metrics(images: np.ndarray, prompts: list[str], specs, opts: EvalOptions,
                    metrics: dict[str, float]) -> None:
    """FID against references and CLIP score against the prompts, when weights are given."""
    from pipeline.release import metrics as m

    if not opts.fid_weights:
        opts.skipped["fid"] = ("pass --fid-weights PATH (a TorchScript Inception feature extractor, "
                               "e.g. inception-2015-12-05.pt) and --references or --attributes")
    else:
        refs = references(opts, images.shape[1], specs)
        if refs is None:
            opts.skipped["fid"] = "needs reference images: --references DIR or --attributes"
        else:
            metrics["fid"] = m.fid(refs[0], images, opts.fid_weights)
    if not opts.clip_model:
        opts.skipped["clip_score"] = ("pass --clip-model DIR (a local transformers CLIP model, "
                                      "e.g. a saved openai/clip-vit-base-patch16)")
    else:
        metrics["clip_score"] = m.clip_score(images, prompts, opts.clip_model)


def write_grids(images: dict[str, np.ndarray | None], out_dir: str) -> dict[str, str]:
    """One PNG per image set in ``out_dir`` (a folder or URI); returns {name: its URI}."""
    import io

    from PIL import Image

    paths = {}
    for name, imgs in images.items():
        if imgs is None:
            continue
        paths[name] = storage.join(out_dir, f"grid_{name}.png")
        cols = 3 if name.startswith("sr_") else None  # SR grids: rows of input | output | reference
        png = io.BytesIO()
        Image.fromarray(make_grid(imgs, cols=cols)).save(png, format="PNG")
        storage.write_bytes(paths[name], png.getvalue())
    return paths


def find_stage_run(checkpoint: str, meta: dict) -> str | None:
    """The MLflow run that trained ``checkpoint``: its metadata's run id, else the run tagged
    with its path (pipeline/train/trainer.py tags ``checkpoint``); None when neither exists here."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    if meta.get("mlflow_run_id"):
        try:
            return client.get_run(meta["mlflow_run_id"]).info.run_id
        except MlflowException:
            pass  # trained against another tracking server: fall back to the tag
    path = storage.normalize(checkpoint).replace("'", "\\'")
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"tags.checkpoint = '{path}'", max_results=1) if exps else []
    return runs[0].info.run_id if runs else None


def log_to_mlflow(checkpoints, metas, opts: EvalOptions, metrics, grids, prompts) -> str:
    import mlflow

    from pipeline.layout import checkpoint_tracking
    from pipeline.tracking import ensure_experiment

    tracking_uri, artifacts = checkpoint_tracking(metas[0], opts.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    run_id = opts.run_id or (find_stage_run(checkpoints[0], metas[0]) if len(checkpoints) == 1 else None)
    exp_id = None if run_id else ensure_experiment("imagen", artifacts)
    name = "evaluate-" + ("cascade" if len(checkpoints) > 1 else storage.basename(
        storage.parent(storage.normalize(checkpoints[0]))))
    with mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=None if run_id else name) as run:
        mlflow.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        for uri in grids.values():
            with storage.local_file(uri) as path:
                mlflow.log_artifact(path, artifact_path="eval")
        mlflow.log_dict({"checkpoints": [storage.normalize(c) for c in checkpoints], "prompts": prompts,
                         "seed": opts.seed, "steps": opts.steps, "metrics": metrics,
                         "skipped": opts.skipped}, "eval/summary.json")
        mlflow.set_tag(EVAL_KEY_TAG, eval_key(checkpoints))
    return run.info.run_id


def evaluate_run(trained: dict[str, Any], attributes: str, encoder: str | None = None) -> dict[str, Any]:
    """Evaluate a finished training run (launch.py's summary: ``checkpoint``, ``stage``) once,
    into the run that trained it: the result is kept in ``eval.json`` beside its checkpoints,
    and a rerun gives it back with ``"reused": True``."""
    from pipeline.layout import RunLayout

    marker = RunLayout.eval_marker(storage.parent(trained["checkpoint"]))
    if storage.exists(marker):
        return {**storage.read_json(marker), "reused": True}
    result = evaluate(trained["checkpoint"], attributes=attributes, encoder=encoder)
    storage.write_json(marker, result)
    return {**result, "reused": False}
