"""Frozen T5 text encoder: captions -> per-token embeddings + mask (Imagen sec. 2.1).

Imagen conditions every cascade stage on the frozen T5-XXL encoder's per-token outputs.
This module wraps a Hugging Face T5 encoder behind a tiny interface (``encode``, ``dim``,
``encoder_id``, ``max_length``) so the embedding step, the trainer and the sampler agree
on one identity for "which text encoder produced these vectors"::

    from imagen.text import open_encoder
    enc = open_encoder("google/t5-v1_1-xxl")         # a T5TextEncoder; nothing loaded yet
    emb, mask = enc.encode(["a red circle"])        # loads on first use
    emb.shape, mask.shape, enc.dim, enc.encoder_id  # [1, L, 4096], [1, L], 4096, "google/..."

A local directory (e.g. from ``pipeline.dev.tinymodels.build_tiny_t5``) loads through the same
``from_pretrained`` path as the hub name; it is kept as its absolute path, and a string that
can only be a path but names no folder is "encoder folder not found" (:func:`resolve_name_or_path`). :func:`open_encoder` is the one way to open an
encoder from a string (through the ``TEXT_ENCODERS`` registry), and :func:`same_encoder` the
one rule for whether two ``encoder_id`` values name the same weights. Plain single-device PyTorch: no pipeline, Airflow
or MLflow imports, and transformers is imported only when the model is first needed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

# Weight files above this size are fingerprinted by sampling (see _fingerprint_dir):
# hashing all of T5-XXL's ~19 GB on every run would cost minutes for no safety gained.
_FULL_HASH_LIMIT = 256 << 20
_SAMPLE_BYTES = 1 << 20
_NUM_SAMPLES = 16
# A model folder holds a config, a tokenizer and some weight shards: a folder past these bounds
# (an encoder given as "/" or a home directory) is refused before anything in it is read.
_MAX_ENTRIES = 10_000  # files and folders under it
_MAX_HASHED_BYTES = 16 << 30  # bytes read in full (files of up to _FULL_HASH_LIMIT each)


@runtime_checkable
class TextEncoder(Protocol):
    """What the embedding step and the trainer need from a text encoder."""

    @property
    def dim(self) -> int: ...

    @property
    def encoder_id(self) -> str: ...

    @property
    def max_length(self) -> int: ...

    def token_lengths(self, captions: list[str]) -> list[int]: ...

    def token_ids(self, captions: list[str]) -> list[list[int]]: ...

    def encode_ids(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def _resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        # bf16 keeps T5's activation range (fp16 overflows in T5 v1.1 feed-forward layers)
        # and halves memory on GPU; CPUs are slow at bf16 matmuls, so fp32 there.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    resolved = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def _fingerprint_dir(path: Path) -> str:
    """Content hash of a model directory that changes whenever its config or weights do.

    Small files (config, tokenizer, tiny weights) are hashed in full. Large weight files
    are hashed by size plus evenly spaced 1 MiB windows: any retrained or re-quantised
    checkpoint differs in all of them, and reading 16 MiB instead of gigabytes keeps
    ``encoder_id`` cheap enough to compute at every launch.
    """
    digest = hashlib.sha256()
    for file in _model_files(path):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix()}\0{size}\0".encode())
        with open(file, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                while block := fh.read(1 << 20):
                    digest.update(block)
                continue
            step = (size - _SAMPLE_BYTES) // (_NUM_SAMPLES - 1)
            for i in range(_NUM_SAMPLES):
                fh.seek(i * step)
                digest.update(fh.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def _model_files(path: Path) -> list[Path]:
    """The files a model folder's identity hashes (sorted; hidden names left out), after checking
    that ``path`` is a model folder: a config.json at its top, and within the bounds above."""
    hint = "pass the folder save_pretrained wrote (config.json, tokenizer and weights)"
    if not (path / "config.json").is_file():
        raise ValueError(f"text encoder {path}: no config.json in this folder, so not a model folder: {hint}")
    entries = []
    for entry in path.rglob("*"):  # lazily: a huge tree is refused after _MAX_ENTRIES, not walked
        entries.append(entry)
        if len(entries) > _MAX_ENTRIES:
            raise ValueError(f"text encoder {path}: more than {_MAX_ENTRIES} files and folders, not a "
                             f"model folder: {hint}")
    files = sorted(p for p in entries if p.is_file() and not p.name.startswith("."))
    full = sum(size for size in (f.stat().st_size for f in files) if size <= _FULL_HASH_LIMIT)
    if full > _MAX_HASHED_BYTES:
        raise ValueError(f"text encoder {path}: {full} bytes in files under {_FULL_HASH_LIMIT} bytes each, "
                         f"more than a model folder holds ({_MAX_HASHED_BYTES}): {hint}")
    return files


def _hub_commit(name: str, revision: str | None) -> str | None:
    """Commit hash of a cached hub snapshot (None when it is not in the local cache)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # an unusual cache layout must not stop encoding
        return None
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    return None


class T5TextEncoder:
    """A frozen T5 encoder. Loads lazily; every call to ``encode`` runs in inference mode.

    Args:
        name_or_path: hub id (``google/t5-v1_1-xxl``, the Imagen paper's encoder) or a
            local directory saved with ``save_pretrained``.
        max_length: captions are truncated to this many tokens, ``</s>`` included
            (Imagen uses 128, appendix F).
        dtype: compute dtype; default float32 on CPU, bfloat16 on CUDA.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        revision: hub revision (branch, tag or commit) to pin; part of ``encoder_id``.
    """

    def __init__(
        self,
        name_or_path: str = "google/t5-v1_1-xxl",
        max_length: int = 128,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        revision: str | None = None,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.name_or_path = resolve_name_or_path(str(name_or_path))  # a folder: its absolute path
        self.revision = revision
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _resolve_dtype(dtype, self.device)
        self._max_length = max_length
        self._tokenizer = None
        self._model = None
        self._config = None
        self._encoder_id: str | None = None

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.name_or_path)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def dim(self) -> int:
        """Width D of each token embedding (T5-XXL: 4096). Reads only the config."""
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.name_or_path, revision=self.revision)
        return int(self._config.d_model)

    @property
    def encoder_id(self) -> str:
        """Stable identity of the weights: ``NAME@sha256:HASH`` or ``HUB_ID@COMMIT``.

        Stored beside every embedding and in every checkpoint, and compared by
        :func:`same_encoder`, so vectors from different encoders (or different weights under
        the same name) never get mixed.
        """
        if self._encoder_id is None:
            if self.is_local:
                path = Path(self.name_or_path).resolve()
                self._encoder_id = f"{path.name}@sha256:{_fingerprint_dir(path)}"
            else:
                ref = _hub_commit(self.name_or_path, self.revision) or self.revision or "main"
                self._encoder_id = f"{self.name_or_path}@{ref}"
        return self._encoder_id

    def load(self) -> T5TextEncoder:
        """Load tokenizer and encoder weights (once); returns self for chaining."""
        if self._model is not None:
            return self
        from transformers import AutoTokenizer, T5EncoderModel

        self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, revision=self.revision)
        model = T5EncoderModel.from_pretrained(
            self.name_or_path, revision=self.revision, dtype=self.dtype
        )
        model.to(self.device).eval().requires_grad_(False)
        self._model = model
        self._config = model.config
        return self

    def token_ids(self, captions: list[str]) -> list[list[int]]:
        """Unpadded token ids per caption (``</s>`` included, truncated to max_length).

        The embedding step tokenizes a shard once, sorts by these lengths, and hands
        length-bucketed batches to :meth:`encode_ids`.
        """
        self.load()
        return self._tokenizer(list(captions), truncation=True, max_length=self._max_length)[
            "input_ids"
        ]

    def token_lengths(self, captions: list[str]) -> list[int]:
        """Number of tokens each caption encodes to (``</s>`` included, truncated)."""
        return [len(x) for x in self.token_ids(captions)]

    def encode_ids(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward already tokenized captions, right-padded to the longest one.

        Returns ``(hidden [B, L, D], mask [B, L])`` on ``device``; hidden states at padded
        positions are whatever T5 computes there (callers keep ``hidden[mask]``). Created
        in inference mode: use :meth:`encode` for tensors that enter autograd.
        """
        if not ids or not all(ids):
            raise ValueError("encode_ids() needs at least one caption, each with >= 1 token")
        self.load()
        longest = max(len(x) for x in ids)
        pad = self._tokenizer.pad_token_id or 0
        batch = torch.full((len(ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.bool)
        for row, seq in enumerate(ids):
            batch[row, : len(seq)] = torch.as_tensor(seq)
            mask[row, : len(seq)] = True
        batch, mask = batch.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = self._model(input_ids=batch, attention_mask=mask).last_hidden_state
        return hidden, mask

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of captions.

        Returns:
            embeddings: ``[B, L, D]`` in the compute dtype on ``device``; ``L`` is the
                longest caption in the batch (<= max_length); padded positions are zero.
            mask: bool ``[B, L]``, True at real tokens.
        """
        if not captions:
            raise ValueError("encode() needs at least one caption")
        hidden, mask = self.encode_ids(self.token_ids(captions))
        # Outside inference mode on purpose: the result is an ordinary tensor the trainer
        # may feed to modules that save inputs for backward (inference tensors cannot be).
        embeddings = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return embeddings, mask


_COMMIT = re.compile(r"[0-9a-f]{7,40}")
# A hub id is NAME or NAMESPACE/NAME of these characters (huggingface_hub's repo-id rule).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_like_path(name: str) -> bool:
    """``name`` can only be a folder, never a hub id: it starts with ``./``, ``../``, ``/`` or
    ``~``, or holds a second ``/`` or a backslash (a hub id has at most one ``/``)."""
    return name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", "..") or \
        not _HUB_ID.fullmatch(name)


def resolve_name_or_path(name: str) -> str:
    """The one rule for an encoder given as a string: an existing folder becomes its absolute
    path (so a relative ``--encoder`` means the same from any working directory, wherever it
    is recorded); a string that can only be a path (:func:`looks_like_path`) and is no folder
    is FileNotFoundError "encoder folder not found: PATH"; anything else is a hub id, as given."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if looks_like_path(name):
        where = os.path.abspath(expanded)
        shown = name if where == name else f"{name} ({where})"
        raise FileNotFoundError(f"encoder folder not found: {shown}: pass a folder save_pretrained wrote, "
                                "or a hub name such as google/t5-v1_1-xxl")
    return name


def _pins_commit(ref: str) -> bool:
    """A hub ref that names one commit (full, or abbreviated to >= 7 hex digits); a branch or
    tag such as ``main`` does not (it is what ``encoder_id`` says when the hub cache was empty)."""
    return bool(_COMMIT.fullmatch(ref))


def pins_weights(encoder_id: str | None) -> bool:
    """Whether ``encoder_id`` names exact weights: a local folder's content hash or a hub commit.
    ``NAME@main`` (the hub cache was empty) does not: main may move to other weights, so nothing
    keyed by that id (the embed step's caption cache) may be reused under it."""
    ref = (encoder_id or "").rpartition("@")[2]
    return bool(encoder_id) and "@" in encoder_id and (ref.startswith("sha256:") or _pins_commit(ref))


def same_encoder(recorded: str | None, used: str | None) -> bool:
    """The one identity rule: may embeddings recorded as made by ``recorded`` meet the encoder
    ``used`` (both ``encoder_id`` values)? Embeddings were made by one exact encoder, so:

    - Local ids (``DIRNAME@sha256:HASH``) match when the content hashes do: the same files in
      a folder with another name (a registered model's copy) are the same encoder.
    - Hub ids (``NAME@REF``) need the same NAME. When ``recorded`` pins a commit, ``used``
      must pin that same commit (an abbreviation of >= 7 hex digits counts): an unpinned
      ``t5@main`` does not match ``t5@<commit>``, since ``main`` may load other weights
      (:func:`open_encoder` with ``trained_on=`` opens a hub name at the recorded commit).
      When ``recorded`` pins none (``t5@main``: the hub cache was empty where it was
      computed), the name is all that was recorded, and any ``used`` of that name matches.
    - A local id never matches a hub id: their weights cannot be compared.
    - ``None`` (unknown) matches only ``None``; callers decide whether an unknown id is checked.

    Two recorded ids (two stages, a checkpoint and new embeddings) are compared with
    :func:`same_recorded_encoder`: this rule both ways, no unpinned ref trusted. Every check
    goes through these two functions: the embed step's resume, the training loader, resume of
    a training run, registration, evaluation and sampling.
    """
    if recorded is None or used is None or "@" not in recorded or "@" not in used:
        return recorded == used  # unknown, or not an encoder_id: only the identical string
    name_r, _, ref_r = recorded.rpartition("@")
    name_u, _, ref_u = used.rpartition("@")
    local_r, local_u = ref_r.startswith("sha256:"), ref_u.startswith("sha256:")
    if local_r or local_u:
        return local_r and local_u and ref_r == ref_u
    if name_r != name_u:
        return False
    if not _pins_commit(ref_r):
        return True
    return _pins_commit(ref_u) and (ref_r.startswith(ref_u) or ref_u.startswith(ref_r))


def same_recorded_encoder(a: str | None, b: str | None) -> bool:
    """Two recorded ids (two stages, a checkpoint and the embeddings it resumes on, the shards
    of one run): :func:`same_encoder` both ways, and two unpinned refs must be the same ref.
    So ``t5@main`` and ``t5@<commit>`` are not the same encoder here, in either order."""
    if not (same_encoder(a, b) and same_encoder(b, a)):
        return False
    if a is None or b is None or "@" not in a:
        return True  # equal by the rule's own terms
    ref_a, ref_b = a.rpartition("@")[2], b.rpartition("@")[2]
    return ref_a == ref_b or (_pins_commit(ref_a) and _pins_commit(ref_b))


TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {"t5": T5TextEncoder}


def pinned_revision(name: str, trained_on: str | None) -> str | None:
    """The commit ``trained_on`` (an ``encoder_id``) pins for the hub encoder ``name``, if any."""
    rec_name, _, ref = (trained_on or "").rpartition("@")
    return ref if rec_name == name and _pins_commit(ref) else None


def open_encoder(spec: str, *, trained_on: str | None = None, revision: str | None = None,
                 **kwargs) -> TextEncoder:
    """The one way to open a text encoder from a string: ``KIND:NAME`` (``t5:google/t5-v1_1-xxl``),
    a bare hub name or a local directory. Nothing is loaded until the encoder is used.

    A bare name or path means T5, the only kind Imagen uses; new kinds register in
    ``TEXT_ENCODERS`` and share the ``TextEncoder`` protocol. ``trained_on``: the
    ``encoder_id`` the embeddings or stages record; a hub name given without ``revision`` is
    opened at the commit that id pins, so it loads those exact weights (see
    :func:`same_encoder`). ``kwargs`` (``max_length``, ``dtype``, ``device``) go to the encoder.
    """
    kind, sep, name = spec.partition(":")
    if not (sep and kind in TEXT_ENCODERS):
        kind, name = "t5", spec
    name = resolve_name_or_path(name)  # a folder's absolute path, or a hub id as given
    if revision is None and not os.path.isdir(name):
        revision = pinned_revision(name, trained_on)
    if revision is not None:
        kwargs["revision"] = revision
    return TEXT_ENCODERS[kind](name, **kwargs)
