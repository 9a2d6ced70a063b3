"""Issue 24 item 6: an embeddings Parquet whose ``num_tokens`` disagrees with its rows is refused.

A row's vectors are found by summing the counts before it, so counts that still add up to the
stored total (rows stored as 5 and 3 tokens, ``num_tokens`` 3 and 5) handed caption b two of
caption a's vectors. The reader now checks each count against the row's stored length and names
the file and the key.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.embeddings import load_embeddings, read_embeddings

DIM = 4


def write(path, stored: list[int], num_tokens: list[int | None], dim: int = DIM, meta_dim: int = DIM) -> str:
    """An embeddings parquet in the embed step's layout: row i holds ``stored[i]`` vectors whose
    values are i + 1, under the given ``num_tokens`` column."""
    flat = np.concatenate([np.full((n, dim), i + 1, np.float16) for i, n in enumerate(stored)])
    offsets = np.concatenate([[0], np.cumsum(stored)]).astype(np.int32)
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), dim)
    table = pa.table({
        "__key__": pa.array([chr(ord("a") + i) for i in range(len(stored))]),
        "num_tokens": pa.array(num_tokens, pa.int32()),
        "embedding": pa.ListArray.from_arrays(pa.array(offsets), tokens),
    }).replace_schema_metadata({"dim": str(meta_dim), "encoder_id": "t5@sha256:0"})
    pq.write_table(table, str(path))
    return str(path)


def test_matching_counts_load_each_row_its_own_vectors(tmp_path):
    rows, meta = read_embeddings(write(tmp_path / "000000.parquet", [5, 3], [5, 3]))
    assert meta["dim"] == DIM and {k: v.shape for k, v in rows.items()} == {"a": (5, DIM), "b": (3, DIM)}
    assert (rows["a"] == 1).all() and (rows["b"] == 2).all()


def test_swapped_counts_are_refused_naming_file_and_key(tmp_path):
    path = write(tmp_path / "000000.parquet", [5, 3], [3, 5])  # same total: the old check passed
    with pytest.raises(ValueError) as err:
        load_embeddings(path)
    assert str(err.value) == (f"{path}: key 'a' has num_tokens 3 but 5 stored token vectors (2 rows disagree). "
                              "Delete it and re-run the embed step to regenerate it.")


@pytest.mark.parametrize(("stored", "num_tokens", "key"), [
    ([5, 3, 2], [5, 3, 3], "'c' has num_tokens 3 but 2"),  # totals differ too
    ([5, 3], [5, None], "'b' has num_tokens -1 but 3"),  # a missing count
    ([5, 0], [5, 0], "'b' has num_tokens 0 but 0"),  # every caption has at least </s>
])
def test_any_count_that_is_not_the_rows_length_is_refused(tmp_path, stored, num_tokens, key):
    with pytest.raises(ValueError, match=f"000000.parquet: key {key} stored token vectors"):
        load_embeddings(write(tmp_path / "000000.parquet", stored, num_tokens))


def test_vectors_of_another_width_than_the_metadata_are_refused(tmp_path):
    path = write(tmp_path / "000000.parquet", [4, 4], [4, 4], dim=2, meta_dim=4)  # 16 values either way
    with pytest.raises(ValueError, match=r"000000\.parquet: column embedding is .*expected lists of 4-d vectors"):
        load_embeddings(path)
