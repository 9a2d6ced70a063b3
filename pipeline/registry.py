"""MLflow Model Registry: register trained stages (and cascades) as pyfunc models; sample from them.

    imagen-pipeline register --checkpoint ROOT/checkpoints/base64/run/final --name imagen-base64
    imagen-pipeline sample "a red circle" --model models:/imagen-base64@challenger --output x.png

A registered model is an MLflow pyfunc (``ImagenPyfunc``) whose artifacts are the stage
weights directories (safetensors + config.json, never pickled weights) and, when the text
encoder is a local directory, the encoder itself; a hub encoder is stored by name. So
``mlflow.pyfunc.load_model("models:/imagen-base64@challenger").predict(pd.DataFrame(
{"prompt": [...]}), params={"seed": 0})`` returns uint8 images [B, H, W, 3].
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pipeline.tracking import ensure_experiment, resolve_tracking_uri

DEFAULT_PARAMS = {"seed": 0, "steps": 0, "guidance_scale": -1.0}


class ImagenPyfunc(mlflow.pyfunc.PythonModel):
    """Prompts in, images out. Stage artifacts are named ``stage_0``, ``stage_1``, ..."""

    def load_context(self, context) -> None:
        from imagen.cascade import Cascade
        from imagen.text import T5TextEncoder

        arts = context.artifacts
        dirs = [arts[f"stage_{i}"] for i in range(len([k for k in arts if k.startswith("stage_")]))]
        info = context.model_config or {}
        encoder = arts.get("text_encoder") or info.get("encoder_name")
        if not encoder:
            raise ValueError("this model records no text encoder; register it again with --encoder")
        self.cascade = Cascade.from_dirs(dirs)
        self.cascade.encoder = T5TextEncoder(encoder, max_length=self.cascade.stages[0][1].max_text_len)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        from imagen.cascade import StageOptions

        p = {**DEFAULT_PARAMS, **(params or {})}
        prompts = [str(x) for x in model_input["prompt"]]
        opts = StageOptions(steps=int(p["steps"]) or None,
                            guidance_scale=None if float(p["guidance_scale"]) < 0 else float(p["guidance_scale"]))
        return self.cascade.generate(prompts, seed=int(p["seed"]),
                                     options=[opts] * len(self.cascade.stages))


def _signature():
    from mlflow.models import infer_signature

    example_out = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    return infer_signature(pd.DataFrame({"prompt": ["a red circle"]}), example_out, params=DEFAULT_PARAMS)


def register(
    checkpoints: list[str],
    name: str,
    alias: str = "challenger",
    tracking_uri: str | None = None,
    run_id: str | None = None,
    experiment: str = "imagen",
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log a pyfunc over the stage weight dirs (in cascade order) and register it as ``name``,
    pointing ``alias`` at the new version. Logged into ``run_id`` when given (lineage)."""
    from imagen.checkpoint import load_config

    if not checkpoints:
        raise ValueError("register needs at least one stage weights directory")
    cfgs = [load_config(c) for c in checkpoints]
    encoder_name = cfgs[0][1].get("encoder_name") or cfgs[0][0].text_encoder
    encoder_ids = {m.get("encoder_id") for _, m in cfgs}
    if len(encoder_ids) > 1:
        raise ValueError(f"stages were trained on different text encoders: {sorted(map(str, encoder_ids))}")
    artifacts = {f"stage_{i}": os.path.abspath(c) for i, c in enumerate(checkpoints)}
    if encoder_name and os.path.isdir(encoder_name):
        artifacts["text_encoder"] = os.path.abspath(encoder_name)
    model_tags = {"stages": ",".join(c.stage for c, _ in cfgs), "encoder_id": str(encoder_ids.pop()),
                  "encoder_name": str(encoder_name), **(tags or {})}

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri, _root_of(checkpoints[0])))
    exp_id = None if run_id else ensure_experiment(experiment, os.path.join(_root_of(checkpoints[0]), "mlartifacts"))
    with mlflow.start_run(run_id=run_id, experiment_id=exp_id,
                          run_name=None if run_id else f"register-{name}") as run:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=ImagenPyfunc(), artifacts=artifacts,
            model_config={"encoder_name": None if "text_encoder" in artifacts else encoder_name},
            signature=_signature(), registered_model_name=name,
            pip_requirements=["torch==2.13.0", "safetensors", "transformers", "sentencepiece", "pandas"],
        )
        version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for k, v in model_tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}",
            "run_id": run.info.run_id}


def _root_of(checkpoint: str) -> str:
    """ROOT for ROOT/checkpoints/<stage>/<run>/final, else the checkpoint's parent."""
    parts = os.path.abspath(checkpoint).split(os.sep)
    if "checkpoints" in parts:
        return os.sep.join(parts[: len(parts) - parts[::-1].index("checkpoints") - 1])
    return os.path.dirname(os.path.abspath(checkpoint))


def sample_images(prompts: list[str], model_uri: str, output: str, seed: int = 0,
                  steps: int | None = None, guidance_scale: float | None = None,
                  tracking_uri: str | None = None) -> list[str]:
    """Load ``model_uri`` through pyfunc, generate one image per prompt and write PNGs.
    One prompt and an ``output`` ending in .png writes that file; otherwise a directory."""
    from PIL import Image

    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    model = load_pyfunc(model_uri)
    params = {"seed": seed, "steps": steps or 0,
              "guidance_scale": -1.0 if guidance_scale is None else guidance_scale}
    images = model.predict(pd.DataFrame({"prompt": prompts}), params=params)
    if len(prompts) == 1 and output.lower().endswith(".png"):
        paths = [output]
    else:
        os.makedirs(output, exist_ok=True)
        paths = [os.path.join(output, f"{i:03d}.png") for i in range(len(prompts))]
    for path, img in zip(paths, images, strict=True):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        Image.fromarray(img).save(path)
    with open(os.path.splitext(paths[0])[0] + ".json" if len(paths) == 1 else os.path.join(output, "prompts.json"), "w") as f:
        json.dump({"model": model_uri, "prompts": prompts, "params": params}, f, indent=2)
    return paths


def load_pyfunc(model_uri: str):
    """``mlflow.pyfunc.load_model`` with errors a user can act on."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise LookupError(f"cannot load {model_uri} from the registry at {mlflow.get_tracking_uri()}: "
                          f"{e.message.splitlines()[0]}") from None
