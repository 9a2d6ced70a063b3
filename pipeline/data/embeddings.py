"""The one owner of the embeddings Parquet format: the file the embed step writes per shard, and
every reader of it (the training loader, evaluation, the CLI's metadata checks).

    OUTPUT/<encoder-slug>/NNNNNN.parquet     (val-NNNNNN.parquet for val-NNNNNN.tar)
        __key__       string                                  sample key, shard order
        num_tokens    int32                                   real tokens, </s> included
        embedding     list<fixed_size_list<float16, D>>       [num_tokens, D]; no padding
        image_ext     string                                  the sample's image member:
        image_offset  int64                                   extension, data offset and
        image_size    int64                                   size in the tar (-1: none)
        image_side    int32                                   the image's short side in
                                                              pixels (-1: unknown)
        image_sha256  fixed_size_binary[32]                   the image bytes' sha256

The image columns make the parquet an index of its tar: the training loader seeks straight to
an image (:func:`pipeline.data.shards.read_at` checks the member name there) and checks the
bytes' sha256 before trusting them; it leaves out of a stage, before reading any pixel, the
samples whose ``image_side`` is below that stage's size. The schema metadata (``encoder_id``,
``max_length``, ``dtype``, ``dim``, source shard name, size and sha256, ``code_version``...) is
what :mod:`pipeline.data.embed` matches to skip a shard on a re-run.

    from pipeline.data.embeddings import load_embeddings, read_embeddings, read_footer
    shard = load_embeddings("emb/000000.parquet"); shard.get(0)     # float16 [T, D]
    vectors, meta = read_embeddings("emb/000000.parquet")           # {key: [T, D]}, metadata
    rows, meta = read_footer("emb/000000.parquet")                  # the footer alone
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import storage

STORAGE_DTYPE = "float16"
_META_KEYS_INT = ("max_length", "dim", "num_samples", "source_size", "tar_samples")
_HINT = "Delete it and re-run the embed step to regenerate it."


def build_table(keys: list[str], lengths: np.ndarray, flat: np.ndarray, where: list[tuple[str, int, int, int]],
                image_sha256: list[bytes | None], metadata: dict):
    """The table of one shard: row ``i`` is ``keys[i]`` with ``lengths[i]`` token vectors of
    ``flat`` (float16 ``[sum T, D]``, rows in key order), its image at ``where[i]`` (ext, data
    offset, size, short side; ``("", -1, -1, -1)``: none) with ``image_sha256[i]``; ``metadata``
    becomes the schema metadata (values as strings)."""
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = pa.array(flat.reshape(-1), pa.float16())
    tokens = pa.FixedSizeListArray.from_arrays(values, flat.shape[1])
    embedding = pa.ListArray.from_arrays(pa.array(offsets), tokens)
    table = pa.table(
        {
            "__key__": pa.array(keys, pa.string()),
            "num_tokens": pa.array(lengths.astype(np.int32), pa.int32()),
            "embedding": embedding,
            # Where the image sits in the source tar: the loader seeks there directly.
            "image_ext": pa.array([w[0] for w in where], pa.string()),
            "image_offset": pa.array([w[1] for w in where], pa.int64()),
            "image_size": pa.array([w[2] for w in where], pa.int64()),
            "image_side": pa.array([w[3] for w in where], pa.int32()),
            # The loader checks each image it reads against this: the pixels it trains on are
            # the ones that were here when the caption was embedded.
            "image_sha256": pa.array(image_sha256, pa.binary(32)),
        }
    )
    return table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})


def write_table(table, uri: str) -> None:
    """Write a :func:`build_table` table to ``uri`` atomically: it is the shard's completion marker."""
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


@dataclass
class EmbeddingShard:
    """One embeddings parquet in memory: row ``i`` is ``keys[i]`` with ``get(i)`` [T, D]."""

    path: str
    keys: list[str]
    offsets: np.ndarray  # int64 [rows + 1] into values
    values: np.ndarray  # float16 [sum T, D]
    meta: dict
    # Image member per row in the source tar (ext, data offset, size; offset -1: no image).
    # None for files without these columns: the reader then indexes the tar itself.
    image_ext: list[str] | None = None
    image_offset: np.ndarray | None = None
    image_size: np.ndarray | None = None
    image_side: np.ndarray | None = None  # short side in pixels per row (-1: unknown)
    image_sha256: list[bytes | None] | None = None  # sha256 of each row's image bytes

    def get(self, row: int) -> np.ndarray:
        return self.values[self.offsets[row] : self.offsets[row + 1]]


def load_embeddings(path: str) -> EmbeddingShard:
    """Read one embeddings parquet whole (a shard's vectors stay in memory while it is read).

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
    embedding = table.column("embedding").combine_chunks()
    lengths = _checked_lengths(path, keys, table.column("num_tokens"), embedding, meta["dim"])
    flat = embedding.flatten().flatten()
    values = flat.to_numpy(zero_copy_only=False).reshape(-1, meta["dim"])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    shard = EmbeddingShard(path, keys, offsets, values, meta)
    if {"image_ext", "image_offset", "image_size"} <= set(table.column_names):
        shard.image_ext = table.column("image_ext").to_pylist()
        shard.image_offset = table.column("image_offset").to_numpy()
        shard.image_size = table.column("image_size").to_numpy()
    if "image_side" in table.column_names:
        shard.image_side = table.column("image_side").to_numpy()
    if "image_sha256" in table.column_names:
        shard.image_sha256 = table.column("image_sha256").to_pylist()
    return shard


def _checked_lengths(path: str, keys: list, num_tokens, embedding, dim: int) -> np.ndarray:
    """Each row's token count (int64), after checking that ``num_tokens`` says what the row
    stores: a row's vectors are found by summing the counts before it, so one wrong count
    would hand a caption another caption's vectors."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = embedding.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not (
            pa.types.is_fixed_size_list(kind.value_type) and kind.value_type.list_size == dim):
        raise ValueError(f"{path}: column embedding is {kind}, expected lists of {dim}-d vectors "
                         f"(metadata 'dim'). {_HINT}")
    stored = pc.fill_null(pc.list_value_length(embedding), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = pc.fill_null(num_tokens, -1).to_numpy().astype(np.int64)
    bad = np.flatnonzero((lengths != stored) | (lengths < 1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{path}: key {keys[i]!r} has num_tokens {lengths[i]} but {stored[i]} stored token "
                         f"vectors ({bad.size} rows disagree). {_HINT}")
    return lengths


def read_embeddings(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Load one embeddings parquet: ``({key: float16 [T, D]}, metadata)`` (views, no copies)."""
    shard = load_embeddings(path)
    return {key: shard.get(i) for i, key in enumerate(shard.keys)}, shard.meta


def read_footer(path: str) -> tuple[int, dict]:
    """(rows, metadata) of an embeddings parquet from its footer alone."""
    import pyarrow.parquet as pq

    try:
        with storage.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            return pf.metadata.num_rows, _decode_metadata(pf.schema_arrow.metadata)
    except Exception as err:
        raise ValueError(f"{path}: not a readable embeddings parquet ({err}). {_HINT}") from err
