"""Sampling: prompts -> PNG files from a registered model or a stage's weights (``imagen-pipeline sample``).

    imagen-pipeline sample "a red circle" --model models:/imagen-cascade@champion --output out/ \\
        --seed 0 1 2 --guidance-scale 5 1 --steps 32 16 --stages 1

The model is built from its safetensors and config.json with the installed package
(pipeline/release/loading.py), never through ``mlflow.pyfunc.load_model``: nothing from it is
unpickled or run, and the images equal what the registered pyfunc's ``predict`` gives for the
same seed (both go through ``loading.predict_images``). Weights and encoder files the model
references (pipeline/release/blobs.py) are fetched from the same tracking server, and every file
the model lists is checked against its sha256 first: a mismatch is an error naming the file.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.tracking import TRACKING_ENV, check_store


def sample_images(prompts: Sequence[str], model_uri: str, output: str, seeds: Sequence[int] = (0,),
                  tracking_uri: str | None = None, images: Sequence[str] | None = None,
                  progress: bool = True, encoder: str | None = None, root: str | None = None,
                  **params: Any) -> dict[str, Any]:
    """Build ``model_uri`` from its weights and write one PNG per (prompt, seed), plus a grid.

    ``model_uri``: models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow model folder or a stage
    weights directory; nothing from it is unpickled or run (pipeline/release/loading.py). ``encoder``:
    the text encoder to use (a hub name is downloaded only when given here).

    ``params`` are predict() params (steps, guidance_scale, stage_guidance, stage_steps,
    stages, sampler). ``output`` is a local path or an fsspec URI (``s3://bucket/x.png``), written
    through ``pipeline.storage``. One prompt, one seed and an ``output`` ending in .png writes that
    file (and its .json); otherwise ``output`` is a folder of NNN-seedS.png, grid.png (a row per
    seed) and prompts.json. ``images``: low-res input files, one per prompt, for a model starting
    with an SR stage. The tracking store (a registered model's): ``tracking_uri``, else
    ``$MLFLOW_TRACKING_URI``, else ``ROOT/mlflow.db`` of ``root`` (pipeline/tracking.py); it must
    exist (no empty store is made), and a stage weights directory needs none.
    """
    from pipeline.release.loading import (
        build_cascade,
        model_files,
        names_a_folder,
        predict_images,
        tracking_store,
    )

    store = None
    if names_a_folder(model_uri) and not os.path.exists(model_uri):  # before any store is looked for
        raise FileNotFoundError(f"sample --model {model_uri}: no such folder (a stage weights directory, an "
                                "MLflow model folder, or models:/NAME@ALIAS)")
    if tracking_uri or os.environ.get(TRACKING_ENV) or root or not os.path.isdir(model_uri):
        store = tracking_store(tracking_uri, root)
        mlflow.set_tracking_uri(check_store(store, f"sample --model {model_uri}"))
    frame = pd.DataFrame({"prompt": list(prompts)})
    if images:
        if len(images) != len(prompts):
            raise ValueError(f"give one --image per prompt: {len(images)} images, {len(prompts)} prompts")
        frame["image"] = [pathlib.Path(path).read_bytes() for path in images]
    p = {k: v for k, v in params.items() if v is not None}
    with model_files(model_uri, progress) as files:  # a downloaded model lives until its images are made
        cascade = build_cascade(files, encoder)
        batches = {s: predict_images(cascade, frame, {**p, "seed": int(s), "progress": progress})
                   for s in seeds}
    # Every file goes through pipeline.storage: a local path, or an s3:// / gs:// URI (never a
    # local folder named "s3:"), each written atomically.
    single = len(prompts) == 1 and len(seeds) == 1 and output.lower().endswith(".png")
    if single:
        _write_png(output, batches[seeds[0]][0])
        paths, grid, meta = [output], None, output[: -len(".png")] + ".json"
    else:
        paths = []
        for s, batch in batches.items():
            for i, img in enumerate(batch):
                paths.append(storage.join(output, f"{i:03d}-seed{s}.png"))
                _write_png(paths[-1], img)
        from pipeline.grids import make_grid

        grid = storage.join(output, "grid.png")
        # a row per seed, a column per prompt, labelled so the grid reads without prompts.json
        _write_png(grid, make_grid(np.concatenate(list(batches.values())), cols=len(prompts),
                                   col_labels=list(prompts), row_labels=[f"seed {s}" for s in batches]))
        meta = storage.join(output, "prompts.json")
    storage.write_json(meta, {"model": model_uri, "prompts": list(prompts), "seeds": list(seeds), "params": p})
    return {"images": paths, "grid": grid, "model": model_uri, "tracking_uri": store}



def _write_png(uri: str, image: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())
