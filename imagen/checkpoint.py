"""Stage weights on disk: safetensors plus the resolved config as JSON. Loading never unpickles.

    save_weights(dir, model.state_dict(), cfg, ema=ema.state_dict(), metadata={...})
    model, cfg, meta = load_model(dir)         # EMA weights when present (what sampling wants)
    cfg, meta = check_weights(dir)             # config and weight headers only, no tensors read

Layout of a weights directory::

    config.json         StageConfig.to_dict() plus "metadata" (encoder id, code version, ...)
    model.safetensors   raw weights
    ema.safetensors     EMA weights (optional)

A directory is a local path or an fsspec URI (``s3://bucket/run/checkpoints/base64/x/final``):
remote files are read and written as whole byte strings (``safetensors.torch.load`` /
``save``), local ones as before. Only these three files are read, whatever else lies in the folder. A weights directory is
input like any other: a config.json that is not JSON, holds a wrong type or an impossible
size, or weights that do not fit it, is a ``ValueError`` naming the file and what to do.

Training checkpoints (optimizer, RNG, data position) add files beside these; see
``pipeline/train/checkpointing.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file, save, save_file
from torch import Tensor

from imagen.config import StageConfig
from imagen.unet import UNet

CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
# Sections of config.json whose every int is a size or a count (>= 1) and every float finite;
# ``train`` only steers training and is checked for types alone.
_SIZED = ("", "unet.", "diffusion.")
_MAY_BE_ZERO = {"unet.num_res_blocks"}


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def is_remote(path: str) -> bool:
    """An fsspec URI other than a local file (``s3://...``): read and written as bytes."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if is_remote(directory) else os.path.join(directory, name)


def _exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def _read(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with fsspec.open(path, "wb") as f:
        f.write(data)


def save_weights(directory: str, state: dict[str, Tensor], cfg: StageConfig,
                 ema: dict[str, Tensor] | None = None, metadata: dict[str, Any] | None = None) -> None:
    """Write model.safetensors, (optionally) ema.safetensors and, last, config.json to a local
    dir or an fsspec URI."""
    doc = {**cfg.to_dict(), "metadata": metadata or {}}
    weights = {MODEL_NAME: state} if ema is None else {MODEL_NAME: state, EMA_NAME: ema}
    if is_remote(directory):
        for name, tensors in weights.items():
            _write(join(directory, name), save(_contiguous(tensors), metadata={"stage": cfg.stage}))
        _write(join(directory, CONFIG_NAME), json.dumps(doc, indent=2, sort_keys=True).encode())
        return
    os.makedirs(directory, exist_ok=True)
    for name, tensors in weights.items():
        save_file(_contiguous(tensors), os.path.join(directory, name), metadata={"stage": cfg.stage})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)


def _type_ok(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_type_ok(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _check_section(cls: type, doc: Any, prefix: str, path: str) -> dict[str, Any]:
    """``doc`` with the fields of dataclass ``cls`` type- and range-checked (missing fields
    take their defaults); ValueError naming ``path`` and the key otherwise. Unknown keys of
    ``train`` are dropped (a field of an older version), elsewhere they are an error."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: {where} is {type(doc).__name__}, expected an object: restore "
                         "config.json from the training run (MLflow artifact config.json)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in doc.items():
        name = prefix + key
        if key not in names:
            if prefix == "train.":
                continue
            raise ValueError(f"{path}: unknown field {name!r}: remove it, or load this checkpoint with "
                             "the code version that wrote it")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            out[key] = _check_section(hint, value, name + ".", path)
            continue
        if not _type_ok(value, hint):
            want = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ValueError(f"{path}: {name} is {value!r}, expected {want}: fix it or restore "
                             "config.json from the training run")
        if prefix in _SIZED:
            for v in value if isinstance(value, list | tuple) else [value]:
                low = 0 if name in _MAY_BE_ZERO else 1
                if isinstance(v, int) and not isinstance(v, bool) and v < low:
                    raise ValueError(f"{path}: {name} is {value!r}, must be >= {low}: fix it or "
                                     "restore config.json from the training run")
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{path}: {name} is {value!r}, must be a finite number")
        out[key] = value
    return out


def load_config(directory: str) -> tuple[StageConfig, dict[str, Any]]:
    """The stage config and metadata in ``directory``/config.json, checked field by field."""
    path = join(directory, CONFIG_NAME)
    if not _exists(path):
        raise FileNotFoundError(f"{path} not found: is {directory} a stage weights directory?")
    try:
        doc = json.loads(_read(path))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}): restore it from the training run "
                         "(MLflow artifact config.json) or the step checkpoint it was copied from") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} holds a JSON {type(doc).__name__}, not a stage config object")
    metadata = doc.pop("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: metadata is {type(metadata).__name__}, expected an object")
    for section in ("unet", "diffusion", "train"):
        if section not in doc:
            raise ValueError(f"{path} has no {section!r} section: restore config.json from the training run")
    doc = _check_section(StageConfig, doc, "", path)
    try:
        return StageConfig.from_dict(doc), metadata
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _weights_path(directory: str, use_ema: bool) -> str:
    path = join(directory, EMA_NAME)
    if not (use_ema and _exists(path)):
        path = join(directory, MODEL_NAME)
    if not _exists(path):
        raise FileNotFoundError(f"{path} not found: {directory} has a config.json but no weights")
    return path


def _build(cfg: StageConfig, directory: str, device: str | torch.device = "cpu") -> UNet:
    try:
        with torch.device(device):
            return UNet(cfg.unet)
    except Exception as e:  # a config that passed the type checks but still builds nothing
        raise ValueError(f"{join(directory, CONFIG_NAME)}: its unet section builds no U-Net "
                         f"({type(e).__name__}: {e}): restore config.json from the training run") from None


def _check_fit(path: str, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """ValueError unless the tensors ``found`` (name -> shape) are exactly those ``expected``."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if missing or extra or shapes:
        parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in
                 (("missing", missing), ("unexpected", extra), ("of another shape", shapes)) if v]
        raise ValueError(f"{path} does not fit its config.json: tensors {'; '.join(parts)}: the weights "
                         "and config.json come from different checkpoints")


def check_weights(directory: str) -> tuple[StageConfig, dict[str, Any]]:
    """Check config.json and the headers of the weight files (names, shapes, file length)
    against the U-Net the config describes, without reading a tensor; returns load_config()."""
    cfg, metadata = load_config(directory)
    expected = {k: tuple(v.shape) for k, v in _build(cfg, directory, "meta").state_dict().items()}
    paths = [_weights_path(directory, use_ema=False)]
    if _exists(join(directory, EMA_NAME)):
        paths.append(join(directory, EMA_NAME))
    for path in paths:
        try:
            found = _remote_shapes(path) if is_remote(path) else _local_shapes(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}): copy it again from "
                             "the training run's checkpoint, or retrain") from None
        _check_fit(path, expected, found)
    return cfg, metadata


def _local_shapes(path: str) -> dict[str, tuple]:
    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _remote_shapes(path: str) -> dict[str, tuple]:
    """Tensor shapes from a remote file's safetensors header (8-byte length, then JSON), its
    data length checked against the header, without reading the tensors."""
    fs, p = fsspec.core.url_to_fs(path)
    total = int(fs.size(p))
    with fs.open(p, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= total - 8:
            raise ValueError("header length out of range")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if end != total - 8 - n:
        raise ValueError(f"{total - 8 - n} data bytes, the header describes {end}")
    return {k: tuple(v["shape"]) for k, v in header.items()}


def load_model(directory: str, use_ema: bool = True, device: str | torch.device = "cpu"
               ) -> tuple[UNet, StageConfig, dict[str, Any]]:
    """Build the U-Net from config.json and load its (EMA, if present and asked) weights."""
    cfg, metadata = load_config(directory)
    path = _weights_path(directory, use_ema)
    model = _build(cfg, directory)
    try:
        state = ({k: v.to(device) for k, v in load(_read(path)).items()} if is_remote(path)
                 else load_file(path, device=str(device)))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): copy it again from "
                         "the training run's checkpoint, or retrain") from None
    _check_fit(path, {k: tuple(v.shape) for k, v in model.state_dict().items()},
               {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, metadata
