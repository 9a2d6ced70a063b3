"""Stage weights on disk: safetensors plus the resolved config as JSON. Loading never unpickles.

    save_weights(dir, model.state_dict(), cfg, ema=ema.state_dict(), metadata={...})
    model, cfg, meta = load_model(dir)         # EMA weights when present (what sampling wants)
    cfg, meta = check_weights(dir)             # config and weight headers only, no tensors read

Layout of a weights directory::

    config.json         StageConfig.to_dict() plus "metadata" (encoder id, code version, ...)
    model.safetensors   raw weights
    ema.safetensors     EMA weights (optional)
    sampling.json       sampling defaults chosen after training (optional; :func:`save_sampling`)

``sampling.json`` holds what an evaluation chose for the trained stage (an SR stage's guidance
weight and noise-augmentation level, swept on the validation split by
pipeline/release/sweep.py): ``{"diffusion": {field: value}, "record": {...}}``. :func:`load_config`
applies its values over config.json's ``diffusion`` section (only :data:`SAMPLING_FIELDS`, checked
like config.json's own) and returns the record as ``metadata["sampling"]``, so every consumer of
the stage (the cascade, ``sample``, the registered model) samples with them. config.json itself
stays as training wrote it.

A directory is a local path, or a URI (``s3://bucket/run/checkpoints/base64/x/final``) read and
written through ``storage=``: an object with ``exists``, ``size``, ``open``, ``read_bytes`` and
``write_bytes`` (the :class:`Storage` protocol; ``pipeline.storage`` is one, so every remote read
passes the pipeline's network guard). This module opens no network connection itself: without
``storage=`` a URI is refused. Remote files are read and written as whole byte strings
(``safetensors.torch.load`` / ``save``). Only these four files are read, whatever else lies in
the folder. A weights directory is input like any other: a config.json that is not JSON, holds a
wrong type or a size out of bounds, or weights that do not fit it, is a ``ValueError`` naming the
file and what to do. Loading checks the weight files' headers against the U-Net built on the meta
device before any parameter is allocated: memory is spent only on a model the weights fill.

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
from typing import IO, Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, load_file, save, save_file
from torch import Tensor

from imagen.config import StageConfig
from imagen.unet import UNet

CONFIG_NAME = "config.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
SAMPLING_NAME = "sampling.json"
# The diffusion fields sampling.json may set: how the trained stage samples, never what it learned.
SAMPLING_FIELDS = ("sampler", "sample_steps", "guidance_scale", "lowres_aug_sample")
# Sections of config.json whose every int is a size or a count (>= 1) and every float finite;
# ``train`` only steers training and is checked for types alone.
_SIZED = ("", "unet.", "diffusion.")
_MAY_BE_ZERO = {"unet.num_res_blocks"}
# Upper bounds of the size fields: generous beside the paper's largest stage (Imagen appendix F:
# 512 channels, 8 blocks a level, 1024 px, T5-XXL's 4096-d embeddings), and small enough that a
# tampered config.json cannot make even the meta-device build (modules, no tensors) expensive.
_MAX = {
    "image_size": 4096, "lowres_size": 4096, "crop_size": 4096, "max_text_len": 4096,
    "unet.image_size": 4096, "unet.in_channels": 64, "unet.out_channels": 64, "unet.channels": 4096,
    "unet.channel_mults": 64, "unet.num_res_blocks": 64, "unet.head_dim": 1024,
    "unet.text_embed_dim": 16384, "unet.cond_dim": 16384, "unet.num_groups": 1024,
    "diffusion.sample_steps": 100_000,
}
_MAX_LEVELS = 8  # entries of unet.channel_mults (a 4096 px stage needs 6 to reach 64 px)
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # safetensors dtypes


class Storage(Protocol):
    """Where a remote weights directory is read and written (``pipeline.storage`` is one)."""

    def exists(self, uri: str) -> bool: ...
    def size(self, uri: str) -> int: ...
    def open(self, uri: str, mode: str = "rb") -> IO: ...
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, uri: str, data: bytes) -> None: ...


def _contiguous(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def is_remote(path: str) -> bool:
    """A URI other than a local file (``s3://...``): read and written through ``storage=``."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if is_remote(directory) else os.path.join(directory, name)


def _remote(path: str, storage: Storage | None) -> Storage | None:
    """``storage`` for a URI (refused without one), None for a local path."""
    if not is_remote(path):
        return None
    if storage is None:
        raise ValueError(f"{path} is a URI: imagen.checkpoint reads and writes only local paths by itself; "
                         "pass storage=pipeline.storage (remote reads go through its network guard)")
    return storage


def _exists(path: str, storage: Storage | None) -> bool:
    remote = _remote(path, storage)
    return os.path.exists(path) if remote is None else remote.exists(path)


def _read(path: str, storage: Storage | None) -> bytes:
    remote = _remote(path, storage)
    if remote is not None:
        return remote.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def save_weights(directory: str, state: dict[str, Tensor], cfg: StageConfig,
                 ema: dict[str, Tensor] | None = None, metadata: dict[str, Any] | None = None,
                 storage: Storage | None = None) -> None:
    """Write model.safetensors, (optionally) ema.safetensors and, last, config.json to a local
    dir or (through ``storage``) a URI."""
    doc = {**cfg.to_dict(), "metadata": metadata or {}}
    weights = {MODEL_NAME: state} if ema is None else {MODEL_NAME: state, EMA_NAME: ema}
    remote = _remote(directory, storage)
    if remote is not None:
        for name, tensors in weights.items():
            remote.write_bytes(join(directory, name), save(_contiguous(tensors), metadata={"stage": cfg.stage}))
        remote.write_bytes(join(directory, CONFIG_NAME), json.dumps(doc, indent=2, sort_keys=True).encode())
        return
    os.makedirs(directory, exist_ok=True)
    for name, tensors in weights.items():
        save_file(_contiguous(tensors), os.path.join(directory, name), metadata={"stage": cfg.stage})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)


def save_sampling(directory: str, values: dict[str, Any], record: dict[str, Any] | None = None,
                  storage: Storage | None = None) -> None:
    """Write ``sampling.json`` into the weights ``directory``: ``values`` (a subset of
    :data:`SAMPLING_FIELDS`) override config.json's diffusion defaults on every later load;
    ``record`` says how they were chosen (it comes back as ``metadata["sampling"]``)."""
    unknown = sorted(set(values) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"sampling.json may set {', '.join(SAMPLING_FIELDS)}, not {', '.join(unknown)}")
    data = json.dumps({"diffusion": values, "record": record or {}}, indent=2, sort_keys=True).encode()
    remote = _remote(directory, storage)
    if remote is not None:
        remote.write_bytes(join(directory, SAMPLING_NAME), data)
        return
    path = os.path.join(directory, SAMPLING_NAME)
    with open(path + ".tmp", "wb") as f:  # whole or absent: a reader never sees half a file
        f.write(data)
    os.replace(path + ".tmp", path)


def _sampling(directory: str, storage: Storage | None) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(values, record) of the directory's sampling.json, None without one."""
    path = join(directory, SAMPLING_NAME)
    if not _exists(path, storage):
        return None
    try:
        doc = json.loads(_read(path, storage))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}): delete it (the stage then samples with its "
                         "config's defaults) or evaluate the stage again") from None
    values = doc.get("diffusion") if isinstance(doc, dict) else None
    record = doc.get("record", {}) if isinstance(doc, dict) else None
    if not isinstance(values, dict) or not isinstance(record, dict):
        raise ValueError(f"{path} must be an object with a \"diffusion\" object (and a \"record\" object)")
    unknown = sorted(set(values) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"{path} sets {', '.join(unknown)}: it may only set {', '.join(SAMPLING_FIELDS)}")
    return values, record


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
            _check_size(name, value, path)
        out[key] = value
    return out


def _check_size(name: str, value: Any, path: str) -> None:
    """A size field of config.json within its bounds (``_MAX``), else a one-line ValueError."""
    hint = "fix it or restore config.json from the training run"
    if name == "unet.channel_mults" and isinstance(value, list | tuple) and len(value) > _MAX_LEVELS:
        raise ValueError(f"{path}: {name} has {len(value)} levels, at most {_MAX_LEVELS} are allowed: {hint}")
    low, high = (0 if name in _MAY_BE_ZERO else 1), _MAX.get(name)
    for v in value if isinstance(value, list | tuple) else [value]:
        if isinstance(v, int) and not isinstance(v, bool) and v < low:
            raise ValueError(f"{path}: {name} is {value!r}, must be >= {low}: {hint}")
        if isinstance(v, int) and not isinstance(v, bool) and high is not None and v > high:
            raise ValueError(f"{path}: {name} is {value!r}, must be <= {high}: {hint}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{path}: {name} is {value!r}, must be a finite number")


def load_config(directory: str, storage: Storage | None = None) -> tuple[StageConfig, dict[str, Any]]:
    """The stage config and metadata in ``directory``/config.json, checked field by field
    (types, and every size within its bounds). ``storage`` reads a URI."""
    path = join(directory, CONFIG_NAME)
    if not _exists(path, storage):
        raise FileNotFoundError(f"{path} not found: is {directory} a stage weights directory?")
    try:
        doc = json.loads(_read(path, storage))
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
    chosen = _sampling(directory, storage)
    if chosen is not None and isinstance(doc["diffusion"], dict):
        values, record = chosen
        doc["diffusion"] = {**doc["diffusion"], **values}  # checked below like config.json's own
        metadata = {**metadata, "sampling": {**record, **values}}
    doc = _check_section(StageConfig, doc, "", path)
    try:
        return StageConfig.from_dict(doc), metadata
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _weights_path(directory: str, use_ema: bool, storage: Storage | None) -> str:
    path = join(directory, EMA_NAME)
    if not (use_ema and _exists(path, storage)):
        path = join(directory, MODEL_NAME)
    if not _exists(path, storage):
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


def _meta_shapes(cfg: StageConfig, directory: str) -> dict[str, tuple]:
    """Tensor name -> shape of the U-Net ``cfg`` describes, built on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in _build(cfg, directory, "meta").state_dict().items()}


def _header_shapes(path: str, storage: Storage | None) -> dict[str, tuple]:
    """Tensor name -> shape from a weight file's safetensors header, no tensor read."""
    try:
        remote = _remote(path, storage)
        return _local_shapes(path) if remote is None else _remote_shapes(path, remote)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}): copy it "
                         "again from the training run's checkpoint, or retrain") from None


def check_weights(directory: str, storage: Storage | None = None) -> tuple[StageConfig, dict[str, Any]]:
    """Check config.json and the headers of the weight files (names, shapes, file length)
    against the U-Net the config describes, without reading a tensor; returns load_config()."""
    cfg, metadata = load_config(directory, storage)
    expected = _meta_shapes(cfg, directory)
    paths = [_weights_path(directory, False, storage)]
    if _exists(join(directory, EMA_NAME), storage):
        paths.append(join(directory, EMA_NAME))
    for path in paths:
        _check_fit(path, expected, _header_shapes(path, storage))
    return cfg, metadata


def _local_shapes(path: str) -> dict[str, tuple]:
    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _remote_shapes(path: str, storage: Storage) -> dict[str, tuple]:
    """Tensor shapes from a remote file's safetensors header (8-byte length, then JSON), its
    data length checked against the header, without reading the tensors."""
    total = int(storage.size(path))
    with storage.open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(total - 8, 100_000_000):  # safetensors' own cap on a header
            raise ValueError("header length out of range")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if end != total - 8 - n:
        raise ValueError(f"{total - 8 - n} data bytes, the header describes {end}")
    # Each tensor's bytes are its shape's: once the shapes fit the config, so does the file's size.
    for name, v in header.items():
        begin, stop = (int(x) for x in v["data_offsets"])
        if stop - begin != math.prod(int(d) for d in v["shape"]) * _DTYPE_BYTES[v["dtype"]]:
            raise ValueError(f"tensor {name}: {stop - begin} bytes for shape {v['shape']} of {v['dtype']}")
    return {k: tuple(v["shape"]) for k, v in header.items()}


def load_model(directory: str, use_ema: bool = True, device: str | torch.device = "cpu",
               storage: Storage | None = None) -> tuple[UNet, StageConfig, dict[str, Any]]:
    """Build the U-Net from config.json and load its (EMA, if present and asked) weights.

    The weight file's header is checked against the U-Net built on the meta device first, so a
    config.json that describes another (a larger) model is refused before any parameter is
    allocated; the real build then takes about what the weight file holds. ``storage`` reads a URI.
    """
    cfg, metadata = load_config(directory, storage)
    path = _weights_path(directory, use_ema, storage)
    _check_fit(path, _meta_shapes(cfg, directory), _header_shapes(path, storage))
    model = _build(cfg, directory)
    try:
        remote = _remote(path, storage)
        state = ({k: v.to(device) for k, v in load(remote.read_bytes(path)).items()} if remote is not None
                 else load_file(path, device=str(device)))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): copy it again from "
                         "the training run's checkpoint, or retrain") from None
    _check_fit(path, {k: tuple(v.shape) for k, v in model.state_dict().items()},
               {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict(state)
    # channels-last convolutions: oneDNN samples the tiny stages 12-17% faster in it on a CPU,
    # and it is the layout CUDA's tensor cores want
    return model.to(device, memory_format=torch.channels_last).eval(), cfg, metadata
