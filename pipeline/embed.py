"""Precompute frozen T5 caption embeddings for filtered WebDataset shards.

Imagen trains against a frozen text encoder (sec. 2.1), so captions are encoded once,
ahead of training, instead of running T5-XXL in every training step. For each filtered
shard ``INPUT/NNNNNN.tar`` (members ``KEY.png``, ``KEY.txt``, ``KEY.json``) this writes::

    OUTPUT/<encoder-slug>/NNNNNN.parquet
        __key__     string                                  sample key, shard order
        num_tokens  int32                                   real tokens, </s> included
        embedding   list<fixed_size_list<float16, D>>       [num_tokens, D]; no padding

The parquet file is the shard's completion marker: it is written to a temporary name and
renamed, and its schema metadata (``encoder_id``, ``max_length``, ``dtype``, ``dim``, source
shard name and size, ``code_version``...) decides whether a re-run may skip the shard.
Paths are fsspec URIs. Run it through the CLI, or directly::

    python -m pipeline.embed INPUT OUTPUT google/t5-v1_1-xxl [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import re
import tarfile
import time

import numpy as np

from pipeline import storage

log = logging.getLogger(__name__)

# Bump when the stored values or layout change: shards written by older code are redone.
CODE_VERSION = "embed-v1"
STORAGE_DTYPE = "float16"
_META_KEYS_INT = ("max_length", "dim", "num_samples", "source_size")
_HINT = "Delete it and re-run the embed step to regenerate it."
# Keys that must match for an existing parquet to count as done.
_MATCH_KEYS = ("encoder_id", "max_length", "dtype", "code_version", "source_shard", "source_size")
_SHARD = r"\d+\.tar"
_PARQUET = r"\d+\.parquet"


def encoder_slug(encoder_id: str) -> str:
    """Directory-safe name for an encoder id (``google/t5@abc`` -> ``google-t5-abc``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", encoder_id).strip("-.")


def split_key(member_name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: ``dir/000001.png`` -> (``dir/000001``, ``png``)."""
    directory, base = posixpath.split(member_name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def shard_stem(uri: str) -> str:
    """``.../000003.tar`` or ``000003.parquet`` -> ``000003``."""
    return storage.basename(uri).split(".", 1)[0]


def read_captions(uri: str) -> tuple[list[str], list[str], int]:
    """(keys, captions, samples without caption) of one shard, in tar order."""
    keys: list[str] = []
    captions: list[str] = []
    all_keys: set[str] = set()
    with storage.open(uri, "rb") as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_key(member.name)
            all_keys.add(key)
            if ext == "txt":
                keys.append(key)
                captions.append(tar.extractfile(member).read().decode("utf-8").strip())
    return keys, captions, len(all_keys) - len(set(keys))


def encode_sorted(encoder, captions: list[str], batch_size: int) -> list[np.ndarray]:
    """Per caption a float16 ``[T, D]`` array of its real tokens, in input order.

    Batches are formed from captions sorted by token length so each batch pads only to
    near its own length; the longest batch goes first so an out-of-memory shows at once.
    """
    lengths = encoder.token_lengths(captions)
    order = sorted(range(len(captions)), key=lambda i: (-lengths[i], i))
    out: list[np.ndarray | None] = [None] * len(captions)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        emb, mask = encoder.encode([captions[i] for i in idx])
        emb = emb.float().cpu().numpy()
        counts = mask.sum(dim=1).tolist()  # one device sync per batch, not per row
        for row, i in enumerate(idx):
            out[i] = emb[row, : counts[row]].astype(np.float16)
    return out  # type: ignore[return-value]


def _check_finite(arrays: list[np.ndarray], keys: list[str], shard: str) -> None:
    for key, arr in zip(keys, arrays, strict=True):
        if not np.isfinite(arr).all():
            raise ValueError(
                f"{shard}: embedding of key {key!r} is not finite in float16 (overflow). "
                "Encode in float32 or bfloat16 (--dtype) and check the encoder weights."
            )


def _build_table(keys: list[str], arrays: list[np.ndarray], dim: int, metadata: dict):
    import pyarrow as pa

    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(arrays).reshape(-1) if arrays else np.zeros(0, np.float16)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), dim)
    embedding = pa.ListArray.from_arrays(pa.array(offsets), tokens)
    table = pa.table(
        {
            "__key__": pa.array(keys, pa.string()),
            "num_tokens": pa.array(lengths, pa.int32()),
            "embedding": embedding,
        }
    )
    return table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})


def _write_parquet(table, uri: str) -> None:
    import pyarrow.parquet as pq

    # Temp name then rename, so readers (and re-runs) never take half a file for done.
    with storage.atomic_write(uri) as fh:
        # Dictionary encoding buys nothing on unique keys and random float16 values.
        # Row groups of 1024 samples keep a T5-XXL shard's groups near 100-200 MB.
        pq.write_table(table, fh, use_dictionary=False, compression="zstd", row_group_size=1024)


def _decode_metadata(raw: dict | None) -> dict:
    meta = {k.decode(): v.decode() for k, v in (raw or {}).items()}
    for key in _META_KEYS_INT:
        if key in meta:
            meta[key] = int(meta[key])
    return meta


def embedding_files(path: str) -> list[str]:
    """Sorted ``NNNNNN.parquet`` URIs directly under ``path``."""
    return storage.list_files(path, _PARQUET)


def resolve_embeddings_dir(path: str) -> str:
    """``path`` itself if it holds embeddings, else its single encoder subfolder.

    Lets callers pass either ``embed_shards``'s ``output`` or the root given to it.
    """
    if embedding_files(path):
        return path
    fs, root = storage.url_to_fs(path)
    subdirs = [p for p in fs.ls(root, detail=False) if fs.isdir(p)] if fs.isdir(root) else []
    found = [
        storage.basename(d)
        for d in subdirs
        if embedding_files(storage.join(path, storage.basename(d)))
    ]
    if len(found) == 1:
        return storage.join(path, found[0])
    raise ValueError(
        f"no embeddings parquet in {path}"
        + (f"; pick one encoder folder of {found}" if found else "; run the embed step first")
    )


def read_metadata(path: str) -> dict:
    """Schema metadata of an embeddings parquet (reads the footer only).

    ``path`` may also be an embeddings directory (or its parent with one encoder folder):
    then the metadata of its first parquet is returned, shard-specific keys included.
    """
    import pyarrow.parquet as pq

    fs, fpath = storage.url_to_fs(path)
    if fs.isdir(fpath):
        path = embedding_files(resolve_embeddings_dir(path))[0]
    try:
        with storage.open(path, "rb") as fh:
            raw = pq.read_schema(fh).metadata
    except Exception as err:
        raise ValueError(f"{path}: not a readable embeddings parquet ({err}). {_HINT}") from err
    return _decode_metadata(raw)


def _is_done(uri: str, expected: dict) -> bool:
    if not storage.exists(uri):
        return False
    try:
        meta = read_metadata(uri)
    except ValueError:
        return False  # a corrupt leftover is simply redone
    return all(str(meta.get(k)) == str(expected[k]) for k in _MATCH_KEYS)


def _select(shard_uris: list[str], shards: list[str] | None) -> list[str]:
    if shards is None:
        return shard_uris
    wanted = {shard_stem(s) for s in shards}
    chosen = [u for u in shard_uris if shard_stem(u) in wanted]
    missing = wanted - {shard_stem(u) for u in chosen}
    if missing:
        raise ValueError(f"shards not found in input: {sorted(missing)}")
    return chosen


def embed_shards(
    input: str,
    output: str,
    encoder: str,
    *,
    max_length: int = 128,
    batch_size: int = 64,
    shards: list[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> dict:
    """Embed the captions of every (or the selected) filtered shard; see the module doc.

    Args:
        input: directory (fsspec URI) of filtered ``NNNNNN.tar`` shards.
        output: root directory; results go to ``output/<encoder-slug>/``.
        encoder: hub id or local directory of a T5 encoder (``t5:`` prefix optional).
        max_length: token limit per caption (``</s>`` included).
        batch_size: captions per forward pass.
        shards: subset of shard names (``000003``, ``000003.tar`` or paths), so parallel
            workers can each take a slice; default every shard in ``input``.
        device, dtype: passed to :class:`imagen.text.T5TextEncoder`.

    Returns:
        ``{"output", "encoder_id", "shards", "samples", "skipped"}``: the embeddings
        directory, the encoder identity, shards embedded now, samples embedded now, and
        shards skipped because an up-to-date parquet was already there.
    """
    from imagen.text import make_text_encoder

    shard_uris = _select(storage.list_shards(input, _SHARD), shards)
    if not shard_uris and shards is None:
        raise ValueError(f"no NNNNNN.tar shards in {input}; run the filter step first")
    enc = make_text_encoder(encoder, max_length=max_length, device=device, dtype=dtype)
    out_dir = storage.join(output, encoder_slug(enc.encoder_id))
    storage.makedirs(out_dir)
    base_meta = {
        "encoder_id": enc.encoder_id,
        "encoder_name": encoder,
        "max_length": max_length,
        "dtype": str(enc.dtype).removeprefix("torch."),
        "storage_dtype": STORAGE_DTYPE,
        "code_version": CODE_VERSION,
    }
    done = skipped = samples = 0
    for uri in shard_uris:
        name = shard_stem(uri)
        out_uri = storage.join(out_dir, f"{name}.parquet")
        meta = {**base_meta, "source_shard": f"{name}.tar", "source_size": storage.size(uri)}
        if _is_done(out_uri, meta):
            skipped += 1
            continue
        samples += _embed_one(uri, out_uri, enc, batch_size, meta)
        done += 1
    print(
        f"[embed] {done} shard(s) embedded, {skipped} skipped, {samples} samples -> {out_dir}",
        flush=True,
    )
    return {
        "output": out_dir,
        "encoder_id": enc.encoder_id,
        "shards": done,
        "samples": samples,
        "skipped": skipped,
    }


def _embed_one(uri: str, out_uri: str, enc, batch_size: int, meta: dict) -> int:
    """Embed one shard and write its parquet; returns the number of samples."""
    start = time.perf_counter()
    keys, captions, no_caption = read_captions(uri)
    if no_caption:
        log.warning("%s: %d sample(s) have no .txt caption and get no embedding", uri, no_caption)
    arrays = encode_sorted(enc, captions, batch_size) if captions else []
    _check_finite(arrays, keys, uri)
    table = _build_table(keys, arrays, enc.dim, {**meta, "dim": enc.dim, "num_samples": len(keys)})
    _write_parquet(table, out_uri)
    seconds = time.perf_counter() - start
    print(
        f"[embed] {meta['source_shard']}: {len(keys)} samples in {seconds:.1f}s "
        f"({len(keys) / max(seconds, 1e-9):.1f} samples/s)",
        flush=True,
    )
    return len(keys)


def read_embeddings(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Load one embeddings parquet: ``({key: float16 [T, D]}, metadata)``.

    Raises ``ValueError`` naming the file if it is truncated, corrupt or not in the
    format above.
    """
    import pyarrow.parquet as pq

    try:
        with storage.open(path, "rb") as fh:
            table = pq.read_table(fh)
    except Exception as err:
        raise ValueError(f"{path}: not a readable embeddings parquet ({err}). {_HINT}") from err
    meta = _decode_metadata(table.schema.metadata)
    missing = {"__key__", "num_tokens", "embedding"} - set(table.column_names)
    if missing or "dim" not in meta:
        raise ValueError(f"{path}: missing columns {sorted(missing)} or metadata 'dim'. {_HINT}")
    keys = table.column("__key__").to_pylist()
    lengths = table.column("num_tokens").to_numpy().astype(np.int64)
    flat = table.column("embedding").combine_chunks().flatten().flatten()
    values = flat.to_numpy(zero_copy_only=False).reshape(-1, meta["dim"])
    if values.shape[0] != lengths.sum():
        raise ValueError(f"{path}: num_tokens does not match the stored embeddings. {_HINT}")
    # Views into one buffer: no per-sample copies of possibly gigabytes of vectors.
    parts = np.split(values, np.cumsum(lengths)[:-1]) if len(keys) else []
    return dict(zip(keys, parts, strict=True)), meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("encoder")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shards", nargs="*", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)
    result = embed_shards(
        args.input,
        args.output,
        args.encoder,
        max_length=args.max_length,
        batch_size=args.batch_size,
        shards=args.shards,
        device=args.device,
        dtype=args.dtype,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
