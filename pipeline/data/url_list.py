"""A URL list's row count and a sample of its captions, for the planner; read through storage only.

``imagen-pipeline plan --url-list`` needs two facts of a URL list (a file, or a folder of
``.parquet``/``.csv``/``.tsv``/``.txt``/``.jsonl``/``.json`` files, each maybe ``.gz``): how many
rows it has, and a sample of its captions to measure token lengths on. Both come from one pass:
parquet row counts from the footer, text lists streamed line by line. Every listing and read goes
through ``storage`` (an http(s) list passes the fetch guard, a ``.gz`` list is inflated under
storage's size limit). The download step reads the full table with
:func:`pipeline.data.download.read_url_list` instead::

    from pipeline.data.url_list import read_url_list
    rows, captions = read_url_list("s3://bucket/urls/", caption_col="caption", sample=10_000)

Not a script; imported by pipeline.plan.
"""

from __future__ import annotations

import json

from pipeline import storage

_EXTS = (".parquet", ".csv", ".tsv", ".txt", ".jsonl", ".json")


def _list_files(url_list: str) -> list[str]:
    """The list's files: itself, or every list file under the folder (names starting with "_",
    such as img2dataset's ``_urls.parquet``, left out)."""
    if storage.is_http(url_list):  # one file, read through the fetch guard
        return [url_list]
    if storage.isdir(url_list):
        files = storage.find(url_list, lambda name: name.removesuffix(".gz").endswith(_EXTS)
                             and not name.startswith("_"))
        if not files:
            raise ValueError(f"{url_list}: no {'/'.join(_EXTS)} files in this folder")
        return files
    if not storage.exists(url_list):
        raise ValueError(f"--url-list {url_list}: no such file or folder")
    return [url_list]


def _real(captions: list) -> list[str]:
    """Captions the filter step would keep at all (not empty or blank)."""
    return [c for c in captions if isinstance(c, str) and c.strip()]


def _rows_and_captions(uri: str, caption_col: str, want: int) -> tuple[int, list[str]]:
    """(row count, up to ``want`` captions) of one URL-list file; parquet counts from metadata.
    Read through :func:`pipeline.storage.open`: an http(s) list passes the fetch guard, and a
    ``.gz`` list is inflated under storage's size limit."""
    import pyarrow.parquet as pq

    name = uri.removesuffix(".gz")
    with storage.open(uri, "rb", compression="infer") as f:
        if name.endswith(".parquet"):
            pf = pq.ParquetFile(f)
            captions: list[str] = []
            if caption_col in pf.schema_arrow.names:
                for i in range(pf.num_row_groups):
                    if len(captions) >= want:
                        break
                    captions += pf.read_row_group(i, columns=[caption_col]).column(0).to_pylist()
            return pf.metadata.num_rows, _real(captions[:want])
        rows, captions, header = 0, [], None
        sep = "\t" if name.endswith(".tsv") else ","
        for raw in f:  # text lists are streamed: a count of a big CSV reads it once
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if name.endswith((".csv", ".tsv")) and header is None:
                header = line.split(sep)
                continue
            rows += 1
            if len(captions) < want:
                if name.endswith((".jsonl", ".json")):
                    captions.append(json.loads(line).get(caption_col) or "")
                elif header and caption_col in header:
                    import csv

                    cells = next(csv.reader([line], delimiter=sep))
                    idx = header.index(caption_col)
                    captions.append(cells[idx] if idx < len(cells) else "")
        return rows, _real(captions)


def read_url_list(url_list: str, caption_col: str = "caption", sample: int = 10_000) -> tuple[int, list[str]]:
    """(number of rows, a sample of captions from the first files) of a URL list file or folder."""
    rows, captions = 0, []
    for uri in _list_files(url_list):
        n, caps = _rows_and_captions(uri, caption_col, sample - len(captions))
        rows, captions = rows + n, captions + caps
    return rows, captions
