"""MLflow Model Registry: register stages and cascades as pyfunc models, promote them.

    imagen-pipeline register --checkpoint ROOT/checkpoints/base64/run/final          # imagen-base64
    imagen-pipeline register --checkpoint BASE/final --checkpoint SR256/final        # imagen-cascade
    imagen-pipeline register --name imagen-cascade --promote      # challenger -> champion

A registered model is an MLflow pyfunc logged as "models from code": its code file is
``pipeline/release/pyfunc_model.py`` (no pickled Python object is stored)::

    model = mlflow.pyfunc.load_model("models:/imagen-cascade@champion")   # runs the code file
    images = model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"seed": 0})

What a version stores, and what it references (pipeline/release/blobs.py):

- in the model itself: MLmodel, the code file, and each stage's config.json (``stage_N/``), with
  the sampling an evaluation chose for the stage (its ``sampling.json``, imagen/checkpoint.py)
  applied: the version samples as it was tuned, and tuning again makes a new version;
- in the tracking store's one ``imagen-blobs`` run, at ``sha256/<hex>/<name>``: each stage's
  model/ema safetensors and every file of a local text encoder, each distinct file once. A stage
  model and the cascade made of it, a re-registration under another name, and every model on one
  encoder share one copy; nothing already there is uploaded again;
- in MLmodel (``model_config["files"]``): every file of every artifact with its sha256 and size,
  the referenced ones with their ``runs:/`` URI. Loading (the pyfunc's ``load_context``, and
  ``imagen-pipeline sample`` through pipeline/release/loading.py) downloads the references through
  the same tracking server and refuses a file whose hash differs, naming it. A hub encoder is
  stored by name. Versions registered before this layout (files copied inside) still load.

``weights_dtype="bf16"`` (``--weights-dtype bf16``) stores the weights converted to bf16 (half
the bytes; loading upcasts into the fp32 U-Net); the default ``fp32`` stores them as trained. The
text encoder is stored as given: its files are its identity (``encoder_id``). Uploads use MLflow's
multipart and retry settings, set as defaults the operator can override (``blobs.UPLOAD_DEFAULTS``:
presigned multipart for a server proxying S3/GCS/Azure Blob, HTTP retries and timeouts, GCS chunks;
boto3 already uploads to S3 in parts when the client writes to S3 itself), and a failed upload is
retried whole.

``predict`` returns uint8 images [B, H, W, 3]. ``imagen-pipeline sample`` (pipeline/release/sample.py)
never loads the model through pyfunc: it downloads only the weights and builds the cascade with the
installed package (pipeline/release/loading.py), through the same ``predict_images``, so both give
identical images for the same seed. A model that starts with an SR stage (``imagen-sr256``) also takes an ``image``
column: the low-res inputs as PNG/JPEG bytes.

Registering is idempotent: the same checkpoints (path, config and weight files unchanged), the
same encoder, weights dtype and extra tags give back the version made from them before (its alias
is set again) instead of a duplicate; ``--new-version`` forces a new one (its files are not
uploaded again).

Checkpoints may be local paths or fsspec URIs (``s3://...``): remote weights are downloaded to
a temporary folder to be hashed and uploaded. The tracking store is the one the stages'
training used (the root their metadata records, pipeline/layout.py), unless ``--tracking-uri``
or ``$MLFLOW_TRACKING_URI`` says otherwise. ``register_trained`` and ``register_cascade`` are
the orchestrators' one call per task (a stage's model; the cascade of the stages that chain).

New versions get the alias ``challenger``. ``--promote`` moves ``champion`` to the new
version; ``--promote-on METRIC[:max|min]`` does so only when its evaluation metric beats the
current champion's (read from the version's ``eval_run``). Version tags are the facts a user
filters on (``stages``, ``encoder_id``, ``dataset_manifest_sha256``, ``git_commit``,
``training_runs``, ``weights_dtype``, ``eval_run``); each stage's preset, checkpoint, step and
code version are in the version's description (pipeline/release/lineage.py), and the
registered model gets a description of its own.

The pyfunc is a LoggedModel named after the registered model (``imagen-base64``), an output of
the stage's training run, which is never reopened (it keeps its training start and end time);
its signature has typed optional params (None = the stage's own value) and an input example.
The result names the ``tracking_uri`` used (pipeline/tracking.py's one rule).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pipeline import storage
from pipeline.release.blobs import (
    BLOB_EXPERIMENT,
    FILES_KEY,
    BlobStore,
    file_entry,
    upload_settings,
)
from pipeline.release.lineage import describe_model, describe_version, lineage
from pipeline.release.loading import (
    ENCODER_ARTIFACT,
    check_model_uri,
    param_schema,
    stage_artifact,
    tracking_store,
)
from pipeline.tracking import (
    airflow_tags,
    check_store,
    ensure_experiment,
)

STAGE_MODEL_NAMES = {"base64": "imagen-base64", "sr256": "imagen-sr256", "sr1024": "imagen-sr1024"}
CASCADE_MODEL_NAME = "imagen-cascade"
SOURCE_TAG = "imagen.source"  # version tag: registration_key() of what the version was made from
WEIGHTS_DTYPES = ("fp32", "bf16")  # how register stores the weights: as trained, or converted to bf16
PYFUNC_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfunc_model.py")


class ImagenPyfunc(mlflow.pyfunc.PythonModel):
    """Prompts in, images out. Stage artifacts are named ``stage_0``, ``stage_1``, ...; the
    instance is made by ``pipeline/release/pyfunc_model.py``, the model's code file."""

    def load_context(self, context) -> None:
        import weakref

        from pipeline.release.loading import build_cascade, resolve_model_files

        # referenced weights and encoder files are downloaded (and their sha256 checked) into a
        # folder of this instance: the encoder reads its files when it first encodes
        work = tempfile.mkdtemp(prefix="imagen-pyfunc-")
        weakref.finalize(self, shutil.rmtree, work, True)
        files = resolve_model_files("this model", context.artifacts, context.model_config or {}, work)
        # whoever loads a pyfunc trusts the model (its code file runs), so its hub name is used
        self.cascade = build_cascade(files, allow_hub=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        from pipeline.release.loading import predict_images

        return predict_images(self.cascade, model_input, params)


def _signature_and_example(cfgs) -> tuple[Any, pd.DataFrame]:
    """The pyfunc's signature (prompts, and low-res PNGs for a model starting with an SR stage,
    in; uint8 images out; typed optional params, None = the stage's own value) and an input
    example a user can send as is."""
    import io

    from mlflow.models import ModelSignature, infer_signature
    from PIL import Image

    example = pd.DataFrame({"prompt": ["a red circle on a white background"]})
    if cfgs[0].lowres_size is not None:
        png = io.BytesIO()
        Image.new("RGB", (cfgs[0].lowres_size,) * 2, "white").save(png, format="PNG")
        example["image"] = [png.getvalue()]
    out = np.zeros((1, cfgs[-1].image_size, cfgs[-1].image_size, 3), dtype=np.uint8)
    inferred = infer_signature(example, out)
    return ModelSignature(inferred.inputs, inferred.outputs, param_schema()), example


def check_trained_encoder(checkpoint: str, cfg, meta: dict, run) -> None:
    """Refuse a checkpoint whose recorded encoder is not the one its embeddings came from: the
    names in its config.json must agree, and its training run's immutable params (logged from
    the embeddings) and, when they are on this machine, the embeddings themselves must give
    the encoder id the checkpoint records."""
    from imagen.checkpoint import CONFIG_NAME
    from imagen.text import same_recorded_encoder

    where = storage.join(checkpoint, CONFIG_NAME)
    recorded, named = meta.get("encoder_id"), meta.get("encoder_name")
    if named and cfg.text_encoder and named != cfg.text_encoder:
        raise ValueError(f"{where}: metadata.encoder_name {named!r} and text_encoder {cfg.text_encoder!r} "
                         "disagree: restore config.json from the training run")
    if run is None:
        return
    sources = [(f"training run {run.info.run_id}", run.data.params.get("encoder_id"))]
    embeddings = run.data.params.get("embeddings")
    if embeddings and storage.isdir(embeddings):
        from pipeline.data.embed import read_metadata

        with contextlib.suppress(Exception):  # unreadable embeddings: the run's params still decide
            sources.append((f"embeddings {embeddings}", read_metadata(embeddings).get("encoder_id")))
    for what, trained in sources:
        if trained and (not recorded or not same_recorded_encoder(trained, recorded)):
            raise ValueError(f"{where} records text encoder {recorded}, but its {what} was made with "
                             f"{trained}: the checkpoint does not belong to that run's embeddings; "
                             "register the checkpoint that run wrote")


def _encoder_source(checkpoints, cfgs, metas, runs, encoder: str | None) -> tuple[str, str | None]:
    """(encoder name or local dir, common encoder id), checked across stages, against the
    embeddings each stage was trained on, and against ``encoder``. A hub name is taken from a
    checkpoint only when its training run logged the same name; else ``--encoder`` must give it."""
    from imagen.cascade import check_encoders
    from imagen.checkpoint import CONFIG_NAME
    from imagen.text import open_encoder

    for ckpt, cfg, meta, run in zip(checkpoints, cfgs, metas, runs, strict=True):
        check_trained_encoder(ckpt, cfg, meta, run)
    where = storage.join(checkpoints[0], CONFIG_NAME)
    name = encoder or metas[0].get("encoder_name") or cfgs[0].text_encoder
    if not name:
        raise ValueError(f"{where} names no text encoder: pass --encoder")
    if os.path.isabs(name) and not os.path.isdir(name):
        said = f"--encoder {name}" if encoder else f"text encoder {name} (from {where})"
        raise FileNotFoundError(f"{said} not found: pass --encoder with a local copy of it")
    enc = open_encoder(name, trained_on=next((m["encoder_id"] for m in metas if m.get("encoder_id")), None))
    if not encoder and not enc.is_local and any(
            run is None or run.data.params.get("encoder_name") != name for run in runs):
        raise ValueError(f"{where} names the hub text encoder {name!r}, which no training run on this "
                         f"tracking server confirms: pass --encoder {name} if the stages were trained on "
                         "its embeddings, or --encoder DIR with a local copy")
    common = check_encoders([c.stage for c in cfgs], [m.get("encoder_id") for m in metas], enc)
    return name, common or (enc.encoder_id if enc.is_local else name)


def checkpoint_files(checkpoint: str, dst: str) -> dict[str, str]:
    """File name -> local path of a checkpoint's config.json and weight files, nothing else (no
    optimizer state or RNG). A remote checkpoint's files are downloaded into ``dst``."""
    from imagen.checkpoint import CONFIG_NAME, EMA_NAME, MODEL_NAME

    names = (CONFIG_NAME, MODEL_NAME, EMA_NAME)
    if storage.is_local(checkpoint):
        local = storage.normalize(checkpoint)
        return {n: os.path.join(local, n) for n in names if os.path.isfile(os.path.join(local, n))}
    os.makedirs(dst, exist_ok=True)
    out = {}
    for name in names:
        if storage.exists(storage.join(checkpoint, name)):
            storage.copy(storage.join(checkpoint, name), os.path.join(dst, name))
            out[name] = os.path.join(dst, name)
    return out


def to_bf16(src: str, dst: str) -> str:
    """A copy of the safetensors file ``src`` with its fp32 tensors in bf16 (same names, shapes
    and header metadata), converted one tensor at a time. ``imagen.checkpoint.load_model``
    upcasts them into the fp32 U-Net (``load_state_dict`` copies across dtypes)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    with safe_open(src, framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_tensor(key)
            tensors[key] = t.to(torch.bfloat16) if t.dtype == torch.float32 else t
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    save_file(tensors, dst, metadata=metadata)
    return dst


def encoder_files(directory: str) -> dict[str, str]:
    """Relative path -> path of the files that make a local encoder's identity: every file under
    it whose name does not start with "." (the set ``encoder_id`` hashes, imagen/text.py)."""
    from pathlib import Path

    root = Path(directory).resolve()
    return {p.relative_to(root).as_posix(): str(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def store_model_files(checkpoints: list[str], encoder_dir: str | None, store: BlobStore, tmp: str,
                      weights_dtype: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(pyfunc artifacts: ``stage_N`` -> a folder holding its config.json; the ``files`` lists of
    model_config). Weights (in ``weights_dtype``) and the encoder's files go to ``store``, each
    referenced by sha256; nothing already there is uploaded again."""
    from imagen.checkpoint import CONFIG_NAME, SAMPLING_NAME, load_config

    artifacts, files = {}, {}
    for i, ckpt in enumerate(checkpoints):
        name = stage_artifact(i)
        found = checkpoint_files(ckpt, os.path.join(tmp, "remote", name))
        artifacts[name] = os.path.join(tmp, name)  # MLflow names the artifact folder after it
        os.makedirs(artifacts[name])
        config = found.pop(CONFIG_NAME)
        if storage.exists(storage.join(ckpt, SAMPLING_NAME)):
            # the model carries the sampling chosen for it: config.json with sampling.json applied
            cfg, meta = load_config(ckpt, storage)
            with open(os.path.join(artifacts[name], CONFIG_NAME), "w") as f:
                json.dump({**cfg.to_dict(), "metadata": meta}, f, indent=2, sort_keys=True)
        else:
            shutil.copyfile(config, os.path.join(artifacts[name], CONFIG_NAME))
        entries = {CONFIG_NAME: file_entry(os.path.join(artifacts[name], CONFIG_NAME))}
        for fname, path in sorted(found.items()):
            if weights_dtype == "bf16":
                path = to_bf16(path, os.path.join(tmp, "bf16", name, fname))
            entries[fname] = store.put(path)
        files[name] = entries
    if encoder_dir is not None:
        files[ENCODER_ARTIFACT] = {rel: store.put(path) for rel, path in encoder_files(encoder_dir).items()}
    return artifacts, files


def _eval_metrics(checkpoints: list[str]) -> tuple[dict[str, float], Any]:
    """The latest ``eval/`` metrics logged by `evaluate` for exactly these checkpoints."""
    from pipeline.release.evaluate import EVAL_KEY_TAG, eval_key

    client = mlflow.MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return {}, None
    runs = client.search_runs(exps, filter_string=f"tags.{EVAL_KEY_TAG} = '{eval_key(checkpoints)}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return {}, None
    return {k: v for k, v in runs[0].data.metrics.items() if k.startswith("eval/")}, runs[0]


def registration_key(checkpoints: Sequence[str], encoder: str | None, tags: dict[str, str] | None,
                     weights_dtype: str = "fp32") -> str:
    """Identity of what a version is made from: each checkpoint's path, config.json (which holds
    its step and training run) and weight files' size and mtime (a checkpoint rewritten in place
    changes them; weights are not hashed here, a 2B model is 8 GB), the encoder override, the
    tags and a stored dtype other than fp32 (fp32 keys are those of older versions)."""
    from imagen.checkpoint import CONFIG_NAME, SAMPLING_NAME

    h = hashlib.sha256()
    for c in checkpoints:
        c = storage.normalize(c)
        h.update(c.encode() + b"\0")
        h.update(storage.read_bytes(storage.join(c, CONFIG_NAME)))
        if storage.exists(storage.join(c, SAMPLING_NAME)):  # sampling chosen since: another version
            h.update(b"sampling\0" + storage.read_bytes(storage.join(c, SAMPLING_NAME)))
        if not storage.is_local(c):  # an object's size and ETag (changes when rewritten)
            for uri in storage.list_files(c, r".*\.safetensors"):
                info = storage.info(uri)
                h.update(f"{storage.basename(uri)}:{info.get('size')}:{info.get('ETag')}\0".encode())
            continue
        for name in sorted(os.listdir(c)):
            if name.endswith(".safetensors"):
                st = os.stat(os.path.join(c, name))
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    what = {"encoder": encoder, "tags": tags or {}}
    if weights_dtype != "fp32":
        what["weights_dtype"] = weights_dtype
    h.update(json.dumps(what, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _version_from(client, name: str, source: str):
    """The newest version of ``name`` registered from ``source``, or None."""
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get(SOURCE_TAG) == source]
    return max(versions, key=lambda v: int(v.version), default=None)


def register(
    checkpoints: Sequence[str],
    name: str | None = None,
    alias: str = "challenger",
    tracking_uri: str | None = None,
    run_id: str | None = None,
    experiment: str = "imagen",
    tags: dict[str, str] | None = None,
    encoder: str | None = None,
    promote: bool = False,
    promote_on: str | None = None,
    new_version: bool = False,
    weights_dtype: str = "fp32",
) -> dict[str, Any]:
    """Log a pyfunc over the stage weight dirs (in cascade order) and register it.

    ``name`` defaults to imagen-<stage> for one stage, imagen-cascade for several. The model is
    logged into ``run_id``, else the run that trained the stage (one stage) or the run that
    evaluated these checkpoints (a cascade), else a new run. ``alias`` points at the new
    version; ``promote`` moves ``champion`` there too, ``promote_on`` ("METRIC[:max|min]")
    only when the version's eval metric beats the champion's. A version already made from the
    same checkpoints, encoder, tags and ``weights_dtype`` is reused (``reused`` in the result)
    unless ``new_version``. ``weights_dtype``: "fp32" (as trained) or "bf16" (converted, half the
    bytes). The weights and a local encoder's files go to the store's blob run (``blobs`` in the
    result: what was uploaded and what was already there).
    """
    from imagen.checkpoint import check_weights
    from imagen.config import check_chain
    from pipeline.release.evaluate import find_stage_run

    checkpoints = list(checkpoints)
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"--weights-dtype {weights_dtype}: choose one of {', '.join(WEIGHTS_DTYPES)}")
    if not checkpoints:
        raise ValueError("register needs at least one --checkpoint (a stage weights directory)")
    loaded = [check_weights(c, storage) for c in checkpoints]  # config.json and weight headers, as sample reads them
    cfgs, metas = [c for c, _ in loaded], [m for _, m in loaded]
    check_chain([c.spec for c in cfgs])
    name = name or (STAGE_MODEL_NAMES[cfgs[0].stage] if len(cfgs) == 1 else CASCADE_MODEL_NAME)

    from pipeline.layout import checkpoint_tracking

    store, artifact_root = checkpoint_tracking(metas[0], tracking_uri)
    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    source = registration_key(checkpoints, encoder, tags, weights_dtype)
    existing = None if new_version else _version_from(client, name, source)
    if existing is not None:  # checked when it was made: nothing is read or hashed again
        print(f"[register] {name} version {existing.version} was made from these checkpoints; reused "
              "(--new-version registers another)", flush=True)
        return {**_set_aliases(client, name, str(existing.version), alias, existing.run_id, {},
                               promote, promote_on, reused=True), "tracking_uri": store}
    runs = [_get_run(client, find_stage_run(c, m)) for c, m in zip(checkpoints, metas, strict=True)]
    encoder_name, encoder_id = _encoder_source(checkpoints, cfgs, metas, runs, encoder)
    eval_metrics, eval_run = _eval_metrics(checkpoints)
    model_tags, rows = lineage(checkpoints, cfgs, metas, runs, encoder_id)
    model_tags.update({**(tags or {}), SOURCE_TAG: source, "weights_dtype": weights_dtype})
    if eval_run is not None:
        model_tags["eval_run"] = eval_run.info.run_id  # its eval/ metrics: promotion reads them there
    target = run_id
    if target is None and len(runs) == 1 and runs[0] is not None:
        target = runs[0].info.run_id  # the stage's training run: its lineage in one place
    if target is None and eval_run is not None:
        target = eval_run.info.run_id
    version, logged_in, blobs = _log_and_register(
        client, name, checkpoints, cfgs, encoder_name, model_tags, weights_dtype, target,
        ensure_experiment(experiment, artifact_root), artifact_root)
    client.update_model_version(name, version, description=describe_version(
        rows, encoder_name, model_tags, eval_metrics, eval_run))
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=describe_model(name, cfgs))
    return {**_set_aliases(client, name, version, alias, logged_in, eval_metrics, promote, promote_on,
                           reused=False), "blobs": blobs, "tracking_uri": store}


def _log_and_register(client, name: str, checkpoints: list[str], cfgs: list, encoder_name: str,
                      model_tags: dict[str, str], weights_dtype: str, target: str | None, exp_id: str,
                      artifact_root: str | None) -> tuple[str, str, dict[str, Any]]:
    """Store the weights (and a local encoder) as blobs, log the pyfunc as a LoggedModel named
    ``name`` whose source is run ``target`` (or a new ``register-NAME`` run of ``exp_id``) and
    register it with ``model_tags``: (version, run id, blob summary). The run is never reopened:
    a training run keeps its training start and end time."""
    local_encoder = os.path.isdir(encoder_name)
    made = target is None
    if made:
        target = client.create_run(exp_id, run_name=f"register-{name}", tags=airflow_tags()).info.run_id
    with upload_settings(), tempfile.TemporaryDirectory(prefix="imagen-register-") as tmp:
        store = BlobStore.open(client, artifact_root)
        artifacts, files = store_model_files(checkpoints, encoder_name if local_encoder else None, store, tmp,
                                             weights_dtype)
        model_id = _log_pyfunc(client, name, target, artifacts, cfgs, os.path.join(tmp, "model"), {
            "encoder_name": None if local_encoder else encoder_name, "weights_dtype": weights_dtype, FILES_KEY: files})
    if made:
        client.set_terminated(target)
    blobs = store.summary()
    model_tags["blob_run"] = blobs["blob_run"]
    print(f"[register] {name}: {blobs['uploaded_files']} files ({blobs['uploaded_bytes']} bytes) uploaded to "
          f"the {BLOB_EXPERIMENT} run {blobs['blob_run']}, {blobs['reused_files']} ({blobs['reused_bytes']} "
          "bytes) already there", flush=True)
    # The version is created with its tags in one call: a version without the source tag (a
    # crash between two calls) would be registered again by the next run.
    with contextlib.redirect_stderr(sys.stdout):  # its "Successfully registered model ..." lines are information
        version = str(mlflow.register_model(f"models:/{model_id}", name, tags=model_tags).version)
    return version, target, blobs


def _log_pyfunc(client, name: str, run_id: str, artifacts: dict[str, str], cfgs, path: str,
                model_config: dict[str, Any]) -> str:
    """Save the models-from-code pyfunc (MLflow stores PYFUNC_CODE, not a pickled ImagenPyfunc)
    into ``path`` and upload it as a LoggedModel named ``name``, an output of run ``run_id``;
    returns its model id. By hand rather than ``log_model``: that would reopen the run, and
    it loads the model and samples the input example to check it."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                        tags=airflow_tags() or None)
    signature, example = _signature_and_example(cfgs)
    try:
        mlflow.pyfunc.save_model(
            path, python_model=PYFUNC_CODE, artifacts=artifacts, model_config=model_config, signature=signature,
            input_example=example, mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id,
                                                      model_uuid=logged.model_id, model_id=logged.model_id),
            pip_requirements=["torch==2.13.0", "safetensors", "transformers", "sentencepiece", "pandas"])
        client.log_model_artifacts(logged.model_id, path)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def register_trained(trained: dict[str, Any], prefix: str, weights_dtype: str = "fp32") -> dict[str, Any]:
    """Register a finished training run (launch.py's summary: ``checkpoint``, ``stage``) as
    ``<prefix>-<stage>``, into its training run; a rerun gives back the same version."""
    return register([trained["checkpoint"]], f"{prefix}-{trained['stage']}", weights_dtype=weights_dtype)


def chain_checkpoints(checkpoints: list[str]) -> tuple[list[str], dict[str, str]]:
    """The base checkpoint followed by each SR checkpoint whose input size is the previous
    stage's output size; the others are left out with the reason (their own per-stage models
    are registered anyway), so mismatched presets cannot produce an unloadable cascade."""
    from imagen.checkpoint import load_config

    kept, left_out, prev = [checkpoints[0]], {}, load_config(checkpoints[0], storage)[0].spec
    for ckpt in checkpoints[1:]:
        spec = load_config(ckpt, storage)[0].spec
        error = spec.chain_error(prev)
        if error is None:
            kept.append(ckpt)
            prev = spec
        else:
            left_out[spec.stage] = error
    for stage, why in left_out.items():
        print(f"[register] WARNING: {stage} left out of the cascade: {why}", flush=True)
    return kept, left_out


def register_cascade(checkpoints: list[str], name: str, weights_dtype: str = "fp32") -> dict[str, Any]:
    """Register the cascade of ``checkpoints`` (base first) that chain (:func:`chain_checkpoints`)
    as ``name``; the result names the stages ``left_out`` and why. Its weights are those the
    stage models registered from the same checkpoints hold (the same blobs): none is uploaded twice."""
    kept, left_out = chain_checkpoints(checkpoints)
    return {**register(kept, name, weights_dtype=weights_dtype), "left_out": left_out}


def _set_aliases(client, name: str, version: str, alias: str, run_id: str | None, eval_metrics: dict,
                 promote: bool, promote_on: str | None, reused: bool) -> dict[str, Any]:
    client.set_registered_model_alias(name, alias, version)
    result = {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}",
              "run_id": run_id, "eval_metrics": eval_metrics, "promoted": False, "reused": reused}
    if promote or promote_on:
        ok, why = (True, "--promote") if promote else _beats_champion(client, name, version, promote_on)
        if ok:
            client.set_registered_model_alias(name, "champion", version)
        result.update(promoted=ok, promotion=why)
    return result


def _get_run(client, run_id: str | None):
    return client.get_run(run_id) if run_id else None


def _beats_champion(client, name: str, version: str, rule: str) -> tuple[bool, str]:
    """Apply a promotion rule "METRIC[:max|min]" to version vs the current champion."""
    metric, _, mode = rule.partition(":")
    mode = mode or "max"
    if mode not in ("max", "min"):
        raise ValueError(f"--promote-on {rule}: write METRIC, METRIC:max or METRIC:min")
    key = metric if metric.startswith("eval/") else f"eval/{metric}"
    new = _version_metric(client, client.get_model_version(name, version), key)
    if new is None:
        return False, f"version {version} has no {key}: run `imagen-pipeline evaluate` on it first"
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        return True, f"no champion yet; {key} = {new}"
    old = _version_metric(client, champ, key)
    if old is None:
        return True, f"champion v{champ.version} has no {key}"
    better = float(new) > float(old) if mode == "max" else float(new) < float(old)
    verdict = "beats" if better else "does not beat"
    return better, f"{key} {new} {verdict} champion v{champ.version}'s {old} ({mode})"


def _version_metric(client, mv, key: str) -> str | None:
    """A version's ``key``: its own tag (``--tag``, versions registered before), else the
    metric of its evaluation run (tag ``eval_run``)."""
    if key in mv.tags:
        return mv.tags[key]
    eval_run = mv.tags.get("eval_run")
    if not eval_run:
        return None
    value = client.get_run(eval_run).data.metrics.get(key)
    return None if value is None else f"{value:.6g}"


def promote(name: str, version: str | None = None, from_alias: str = "challenger",
            to_alias: str = "champion", tracking_uri: str | None = None, root: str | None = None) -> dict[str, Any]:
    """Point ``to_alias`` at ``version`` (default: the version ``from_alias`` points at), in the
    store of ``tracking_uri`` / ``$MLFLOW_TRACKING_URI`` / ``root`` (pipeline/tracking.py)."""
    store = tracking_store(tracking_uri, root)
    mlflow.set_tracking_uri(check_store(store, f"promote {name}"))
    client = mlflow.MlflowClient()
    if version is None:
        check_model_uri(f"models:/{name}@{from_alias}")
        version = client.get_model_version_by_alias(name, from_alias).version
    else:
        check_model_uri(f"models:/{name}/{version}")
    client.set_registered_model_alias(name, to_alias, str(version))
    return {"name": name, "version": str(version), "alias": to_alias, "uri": f"models:/{name}@{to_alias}",
            "tracking_uri": store}


@contextlib.contextmanager
def mlflow_errors_in_one_line() -> Iterator[None]:
    """Turn MLflow's exceptions into a RuntimeError with its first line, which the CLI prints
    as one error line (a registry that is down, a refused request ...)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise RuntimeError(f"MLflow at {mlflow.get_tracking_uri()}: {e.message.splitlines()[0]}") from None
