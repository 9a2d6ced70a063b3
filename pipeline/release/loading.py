"""Build a cascade from a model's stored weights with this installed code: nothing from a model
folder is ever unpickled or executed.

    with model_files("models:/imagen-cascade@champion") as files:   # or a folder, see below
        cascade = build_cascade(files, encoder=None)                # safetensors + config.json
        images = predict_images(cascade, pd.DataFrame({"prompt": ["a red circle"]}), {"seed": 0})

``model_files`` takes a registered model URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``NAME@ALIAS``, ``runs:/...``), a downloaded MLflow model folder (one with ``MLmodel``) or a
stage weights directory (``config.json`` + ``*.safetensors``). From a registered model it
downloads only ``MLmodel`` (parsed as plain YAML, to find the artifacts), each stage's
config.json and safetensors, and its text encoder's files: never the model's code file, never a
``python_model.pkl``. Weights and encoder files a model references by sha256 (its MLmodel's
``files``, pipeline/release/blobs.py) are downloaded through the same tracking server, and every
file listed there is checked against its sha256 before anything is built: a mismatch is refused
naming the file. A model registered before files were listed (everything copied inside it) loads
as it is. ``mlflow.pyfunc.load_model`` is the other way in: it runs the code file stored with the
model (see README, "What loading a model trusts"); its ``load_context`` calls
``resolve_model_files`` too.

The text encoder (``choose_encoder``) is the one the user names (``--encoder``), else the copy
stored with the model, else the one the model names if that is a local directory. A hub name
that only the model gives is refused, so nothing is downloaded on a model's say-so; every
choice is checked against the encoder id each stage recorded.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

MLMODEL = "MLmodel"
ENCODER_ARTIFACT = "text_encoder"


@dataclass
class ModelFiles:
    """A model's stage weight directories and text encoder on local disk."""

    source: str  # what the user gave, for messages
    stage_dirs: list[str]
    encoder_dir: str | None = None  # the model's own copy of its text encoder
    encoder_name: str | None = None  # the encoder it names (hub id or path) when it holds no copy
    references: bool = False  # some of its files are elsewhere (blobs): resolve_model_files fetches them


def stage_artifact(i: int) -> str:
    return f"stage_{i}"


def read_mlmodel(path: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(artifact name -> path relative to the model folder, model_config) from an MLmodel file,
    read as plain YAML. Paths that leave the model folder are refused."""
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
        flavor = doc["flavors"]["python_function"]
        arts = flavor.get("artifacts") or {}
        rel = {str(k): v["path"] for k, v in arts.items()}
    except (OSError, yaml.YAMLError, TypeError, KeyError) as e:
        raise ValueError(f"{path} is not an MLflow pyfunc MLmodel file ({type(e).__name__}: {e}): "
                         "give a model registered by `imagen-pipeline register`") from None
    for name, p in rel.items():
        norm = os.path.normpath(p) if isinstance(p, str) else ""
        if not norm or os.path.isabs(norm) or norm.split(os.sep)[0] == "..":
            raise ValueError(f"{path}: artifact {name!r} has path {p!r}, outside the model folder")
        rel[name] = norm
    if stage_artifact(0) not in rel:
        raise ValueError(f"{path} lists no {stage_artifact(0)} artifact: not a model registered by "
                         "`imagen-pipeline register`")
    config = flavor.get("config") or {}  # where MLflow keeps log_model(model_config=...)
    return rel, config if isinstance(config, dict) else {}


def resolve_model_files(source: str, stored: dict[str, str], config: dict[str, Any],
                        work: str | None) -> ModelFiles:
    """The model's files on local disk, each listed one checked against its sha256 (ValueError
    naming the file otherwise). ``stored`` maps each artifact (``stage_N``, ``text_encoder``) to
    the local folder of what the model holds itself, ``config`` is its model_config. An artifact
    with referenced files is rebuilt in ``work`` (stored files linked, the others downloaded);
    one whose files are all stored is used in place."""
    from pipeline.release.blobs import assemble, read_manifest, verify

    manifest = read_manifest(config, source)
    dirs = {k: v for k, v in stored.items() if k.startswith("stage_") or k == ENCODER_ARTIFACT}
    for name, entries in manifest.items():
        what = f"{source}: {name}"
        if not (name.startswith("stage_") or name == ENCODER_ARTIFACT):
            raise ValueError(f"{what}: MLmodel lists files of an artifact it has no use for: register the "
                             "model again")
        if work is not None and any(e.get("uri") for e in entries.values()):
            dirs[name] = assemble(entries, dirs.get(name), os.path.join(work, name), what)
            continue
        for rel, entry in entries.items():
            if entry.get("uri") or name not in dirs:
                raise ValueError(f"{what}/{rel} is not stored in the model and cannot be fetched here")
            verify(os.path.join(dirs[name], *rel.split("/")), entry, f"{what}/{rel}")
    n = sum(1 for k in dirs if k.startswith("stage_"))
    missing = [stage_artifact(i) for i in range(n) if stage_artifact(i) not in dirs]
    if n == 0 or missing:
        raise ValueError(f"{source}: the model has stages up to {n - 1} but not "
                         f"{', '.join(missing) or stage_artifact(0)}: not a model registered by "
                         "`imagen-pipeline register`")
    name = config.get("encoder_name")
    return ModelFiles(source, [dirs[stage_artifact(i)] for i in range(n)], dirs.get(ENCODER_ARTIFACT),
                      name if isinstance(name, str) and name else None)


def _references(config: dict[str, Any], source: str) -> bool:
    from pipeline.release.blobs import read_manifest

    return any(e.get("uri") for entries in read_manifest(config, source).values() for e in entries.values())


def local_model_files(path: str) -> ModelFiles:
    """An MLflow model folder (MLmodel) or a stage weights directory (config.json). A model
    folder whose files are all inside it is checked in place; one that references files has
    ``references`` set and nothing resolved (``model_files`` downloads them)."""
    from imagen.checkpoint import CONFIG_NAME

    if os.path.isfile(os.path.join(path, MLMODEL)):
        rel, config = read_mlmodel(os.path.join(path, MLMODEL))
        if _references(config, path):
            return ModelFiles(path, [], references=True)
        return resolve_model_files(path, {name: os.path.join(path, p) for name, p in rel.items()}, config, None)
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return ModelFiles(path, [path])
    raise FileNotFoundError(f"{path} is neither an MLflow model folder (no {MLMODEL}) nor a stage "
                            f"weights directory (no {CONFIG_NAME}): give the folder `register` logged, "
                            "a checkpoint's final/ directory, or models:/NAME@ALIAS")


def download_model_files(model_uri: str, dst: str) -> ModelFiles:
    """Download what building the model needs from ``model_uri`` (a model URI or a local model
    folder) into ``dst``: MLmodel, each stage's config.json and safetensors, the text encoder's
    files, those it references included, every listed file checked. Nothing else."""
    from mlflow.artifacts import download_artifacts, list_artifacts

    from imagen.checkpoint import CONFIG_NAME, EMA_NAME, MODEL_NAME

    uri = model_uri.rstrip("/")
    rel, config = read_mlmodel(download_artifacts(artifact_uri=f"{uri}/{MLMODEL}", dst_path=dst))
    local = {}
    for name, path in rel.items():
        # one folder each: a local folder's files arrive without their relative path
        into = os.path.join(dst, "stored", name)
        if name == ENCODER_ARTIFACT:
            # whole: the encoder id is a hash of the folder, and transformers reads only its
            # config, tokenizer and weights from it (no remote code; torch.load weights_only)
            local[name] = download_artifacts(artifact_uri=f"{uri}/{path}", dst_path=into)
        elif name.startswith("stage_"):
            present = {os.path.basename(f.path) for f in list_artifacts(artifact_uri=f"{uri}/{path}")
                       if not f.is_dir}
            local[name] = into
            for fname in (CONFIG_NAME, MODEL_NAME, EMA_NAME):
                if fname in present:
                    got = download_artifacts(artifact_uri=f"{uri}/{path}/{fname}", dst_path=into)
                    local[name] = os.path.dirname(got)
    return resolve_model_files(model_uri, local, config, os.path.join(dst, "resolved"))


def names_a_folder(model: str) -> bool:
    """Whether ``--model`` can only be a local folder: no URI scheme and no ``@ALIAS``."""
    return "://" not in model and ":/" not in model and "@" not in model


@contextlib.contextmanager
def model_files(model: str, progress: bool = True) -> Iterator[ModelFiles]:
    """Local paths of ``model``'s weights (downloaded into a temporary folder for a URI, with
    MLflow's download bars when ``progress``)."""
    if os.path.isdir(model):
        files = local_model_files(model)
        if not files.references:
            yield files
            return
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

        if not is_tracking_uri_set():  # MLflow would open ./mlflow.db, where the files are not
            raise ValueError(f"{model} references weights stored in the tracking store it was registered in: "
                             "pass --tracking-uri (or set MLFLOW_TRACKING_URI) to that store")
        uri = os.path.abspath(model)  # its referenced files are downloaded like a model URI's
    elif names_a_folder(model):
        raise FileNotFoundError(f"--model {model}: no such directory; give models:/NAME@ALIAS, "
                                "models:/NAME/VERSION, an MLflow model folder or a stage weights directory")
    else:
        uri = check_model_uri(model)
    with tempfile.TemporaryDirectory(prefix="imagen-model-") as tmp:
        with _environ(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=None if progress else "false"):
            files = download_model_files(uri, tmp)
        yield files


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set the environment variables given a value (None: leave as is), restore them after."""
    saved = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def choose_encoder(where: str, metas: Sequence[dict], cfgs: Sequence, override: str | None = None,
                   bundled: str | None = None, named: str | None = None, allow_hub: bool = False,
                   flag: str = "--encoder"):
    """The text encoder for prompts, checked against every stage's recorded encoder id.

    ``override`` (the user named it: hub name or directory) comes first, then ``bundled`` (the
    model's own copy), then ``named`` or the stages' recorded encoder when it is a local
    directory. A hub name from the model itself is refused unless ``allow_hub`` (the pyfunc
    path, which trusts the model anyway): ``flag`` is what the message tells the user to pass.
    """
    from imagen.cascade import check_encoders
    from imagen.text import open_encoder
    from pipeline.netguard import refuse_model_url

    name = override or bundled or named or metas[0].get("encoder_name") or cfgs[0].text_encoder
    if not name:
        raise ValueError(f"{where} names no text encoder: pass {flag} with the encoder the stages "
                         "were trained on (a local directory, or its hub name to download it)")
    refuse_model_url(name)  # a URL never reaches transformers: hub names and local dirs only
    if not os.path.isdir(name):
        if os.path.isabs(name) or name.startswith((".", "~")):  # a path, not a hub name
            said = f"{flag} {name}" if override else f"{where} names text encoder {name}, which"
            raise FileNotFoundError(f"{said} is not a directory here: pass {flag} with a local copy of it")
        if not override and not allow_hub:
            raise ValueError(f"{where} names the hub text encoder {name} and holds no local copy: pass "
                             f"{flag} {name} to download it from the hub, or {flag} DIR with a local copy")
    recorded = next((m["encoder_id"] for m in metas if m.get("encoder_id")), None)
    encoder = open_encoder(name, trained_on=recorded, max_length=cfgs[0].max_text_len)
    check_encoders([c.stage for c in cfgs], [m.get("encoder_id") for m in metas], encoder)
    return encoder


def build_cascade(files: ModelFiles, encoder: str | None = None, allow_hub: bool = False,
                  device: str = "cpu"):
    """The cascade from ``files``' safetensors and config.json, with its text encoder set."""
    from imagen.cascade import Cascade

    cascade = Cascade.from_dirs(files.stage_dirs, device=device)
    cfgs = [cfg for _, cfg in cascade.stages]
    cascade.set_encoder(choose_encoder(files.source, cascade.metadata, cfgs, override=encoder,
                                       bundled=files.encoder_dir, named=files.encoder_name,
                                       allow_hub=allow_hub))
    return cascade


def decode_images(column) -> Any:
    """A column of PNG/JPEG bytes -> float [B, 3, s, s] in [-1, 1] (an SR model's input)."""
    import numpy as np
    import torch

    from pipeline.data.images import open_rgb

    arrays = [np.asarray(open_rgb(b)) for b in column]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def predict_images(cascade, model_input, params: dict[str, Any] | None = None):
    """uint8 images [B, H, W, 3] for the prompts (and, for a model starting with an SR stage,
    the ``image`` column) of ``model_input``: what the pyfunc's predict and `sample` both run."""

    p = {**DEFAULT_PARAMS, **(params or {})}
    prompts = [str(x) for x in model_input["prompt"]]
    n = int(p["stages"] or 0) or len(cascade.stages)
    first = cascade.stages[0][1]
    lowres = None
    if first.lowres_size is not None:
        if "image" not in model_input:
            raise ValueError(f"this model starts with SR stage {first.stage}: give an 'image' column "
                             "of low-res PNG/JPEG bytes (--image with `sample`)")
        lowres = decode_images(model_input["image"])
    bars = StageBars() if p["progress"] else None
    try:
        return cascade.generate(prompts, seed=int(p["seed"]), options=stage_options(p, n),
                                progress=bars, num_stages=n, lowres=lowres)
    finally:
        if bars is not None:
            bars.close()


# Sampling params of predict(), with their types for the model signature: None (or an empty
# list) = each stage config's own value. In a per-stage list a negative weight or a step count
# of 0 keeps that stage's own (so does -1.0 / 0 / "" from versions registered before None).
PARAM_TYPES: dict[str, tuple[str, Any]] = {
    "seed": ("long", 0), "steps": ("long", None), "guidance_scale": ("double", None), "stages": ("long", None),
    "sampler": ("string", None), "stage_guidance": ("double", []), "stage_steps": ("long", []),
    "progress": ("boolean", False),
}
DEFAULT_PARAMS: dict[str, Any] = {k: default for k, (_, default) in PARAM_TYPES.items()}


def param_schema():
    """The pyfunc signature's params (MLflow ``ParamSchema``): typed, optional ones None."""
    from mlflow.types import DataType
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ParamSchema([ParamSpec(k, getattr(DataType, t), d, shape=(-1,) if isinstance(d, list) else None)
                        for k, (t, d) in PARAM_TYPES.items()])


class StageBars:
    """One tqdm progress bar per cascade stage, on stderr (a ``Cascade`` progress callback)."""

    def __init__(self) -> None:
        self.stage, self.bar = None, None

    def __call__(self, stage: str, step: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=f"sampling {stage}", unit="step", file=sys.stderr)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.stage, self.bar = None, None


def stage_options(params: dict[str, Any], n: int) -> list:
    """Per-stage StageOptions from predict params: stage_guidance[i] / stage_steps[i] when set
    (>= 0 / > 0), else the scalar guidance_scale / steps when set, else the config's default."""
    from imagen.cascade import StageOptions

    per_w = [float(x) for x in params.get("stage_guidance") or []]
    per_s = [int(x) for x in params.get("stage_steps") or []]
    scalar_w = params.get("guidance_scale")
    scalar_s = int(params.get("steps") or 0)
    out = []
    for i in range(n):
        w = per_w[i] if i < len(per_w) and per_w[i] >= 0 else (-1.0 if scalar_w is None else float(scalar_w))
        steps = per_s[i] if i < len(per_s) and per_s[i] > 0 else scalar_s
        out.append(StageOptions(steps=steps if steps > 0 else None, guidance_scale=w if w >= 0 else None,
                                sampler=params.get("sampler") or None))
    return out


def tracking_store(tracking_uri: str | None, root: str | None) -> str:
    """The registry's store for a verb given an optional ``--root``: pipeline/tracking.py's rule
    (``tracking_uri``, ``$MLFLOW_TRACKING_URI``, the root's ``mlflow.db``; an error without any)."""
    from pipeline.layout import checkpoint_tracking
    from pipeline.tracking import resolve_tracking_uri

    return checkpoint_tracking({"root": root}, tracking_uri)[0] if root else resolve_tracking_uri(tracking_uri)


def check_model_uri(model_uri: str) -> str:
    """Check that a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI names something in
    the registry; LookupError in one line saying what exists instead. Returns the URI
    (``NAME@ALIAS`` without the scheme is accepted)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/") and "://" not in model_uri and "@" in model_uri:
        model_uri = "models:/" + model_uri
    if not model_uri.startswith("models:/"):
        return model_uri  # a run or artifact URI: load_model reports on it
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", model_uri)
    if not m:
        raise LookupError(f"{model_uri}: write models:/NAME@ALIAS (e.g. models:/imagen-cascade@champion) "
                          "or models:/NAME/VERSION")
    name, alias, version = m.groups()
    where = mlflow.get_tracking_uri()
    client = mlflow.MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise LookupError(f"cannot read the registry at {where}: {e.message.splitlines()[0]}") from None
        names = sorted(r.name for r in client.search_registered_models(max_results=50))
        raise LookupError(f"no registered model {name!r} at {where}; registered models: "
                          f"{', '.join(names) or 'none'}") from None
    aliases = dict(model.aliases or {})
    if alias is not None and alias not in aliases:
        have = ", ".join(f"@{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
        raise LookupError(f"model {name!r} has no alias @{alias}; its aliases: {have}")
    if version is not None:
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise LookupError(f"model {name!r} has no version {version}") from None
    return model_uri
