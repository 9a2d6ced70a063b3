"""The rows of a raw shard's parquet (img2dataset's record of each URL) that count as URL-list rows.

The retry pass (:mod:`pipeline.data.retry`) adds shards whose rows fetch earlier rows again
(``retry_of``: the key of the failed row) and marks a failed row it recovered ``status ==
"recovered"``. Every URL-list row counts once (:func:`superseded`): the download's summary
(:func:`pipeline.data.download.summarize`), the filter's reject table and ``sample_fates`` all read
shard rows through :func:`read_shard_rows`.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from pipeline import storage

RETRY_OF = "retry_of"  # a retry shard's row: the key of the failed row it fetches again
RECOVERED = "recovered"  # the status of a failed row that a retry shard holds the sample of
RETRY_DIR = "_retry"  # not top-level *.json: img2dataset reads every OUTPUT/*.json as a shard's stats


def superseded(status: str | None, retry_of: str | None) -> bool:
    """Whether a shard row is no URL-list row of its own: a failed row a retry recovered (its
    sample is counted in the retry shard), or a retry's failure (the failed row it retries keeps
    the latest error)."""
    return status == RECOVERED or (retry_of is not None and status != "success")


def read_shard_rows(parquet_uri: str, columns: list[str]) -> list[dict]:
    """The rows of one shard's parquet that are URL-list rows (not :func:`superseded`), ``columns`` of each."""
    with storage.open(parquet_uri, "rb") as f:
        file = pq.ParquetFile(f)
        names = file.schema_arrow.names
        has_retry = RETRY_OF in names
        missing = [c for c in dict.fromkeys([*columns, "status"]) if c not in names]
        if missing:
            raise ValueError(f"{parquet_uri} has no column {', '.join(missing)}: it is not a shard img2dataset "
                             "wrote; delete it and its _stats.json so that the download fetches that shard again")
        table = file.read(columns=list(dict.fromkeys([*columns, "status", *([RETRY_OF] if has_retry else [])])))
    retry_of = table[RETRY_OF].to_pylist() if has_retry else [None] * table.num_rows
    rows = table.select(columns).to_pylist()
    return [r for r, s, o in zip(rows, table["status"].to_pylist(), retry_of, strict=True) if not superseded(s, o)]
