"""Download a URL list into webdataset shards with img2dataset, run as a subprocess.

img2dataset uses spawn multiprocessing, so it runs as its own process (the same command a
Kubernetes job would run); its output streams to our stdout and a non-zero exit becomes a
RuntimeError carrying the last lines it printed. Re-running over the same output resumes:
img2dataset's ``incremental_mode`` skips every shard that has its ``NNNNN_stats.json``.

Before img2dataset sees the list, URLs that point into private networks are refused
(loopback, RFC 1918, link-local, ...; literal IPs and DNS answers alike) and recorded in
``refused.parquet``. This is a pre-screen, not the full SSRF guard: a DNS answer can change
between our check and img2dataset's fetch. Pass ``allow_private_networks=True`` for the
local test server.

Output folder (``output``):
    _urls.parquet          the screened list img2dataset downloads (url, caption, extras)
    refused.parquet        url, caption, reason for every refused row (may be empty)
    NNNNN.tar              successes: KEY.png|jpg|webp, KEY.txt (caption), KEY.json (metadata)
    NNNNN.parquet          every row of the shard with status and error_message
    NNNNN_stats.json       img2dataset's completion marker and per-shard counts

    python -c "from pipeline.download import download; print(download('urls.parquet', 'raw'))"
"""

from __future__ import annotations

import collections
import ipaddress
import json
import math
import os
import socket
import subprocess
import sys
import urllib.parse
from multiprocessing.pool import ThreadPool

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage

INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl", "json", "txt")
# "border" pads to a square with white bars, which teaches the model white bars: never used.
RESIZE_MODES = ("center_crop", "keep_ratio", "keep_ratio_largest", "no")
# PNG's "quality" is a zlib level 0..9 (img2dataset rejects 95); 3 is fast and still lossless.
DEFAULT_QUALITY = {"png": 3, "jpg": 95, "webp": 95}
SCREENED_LIST = "_urls.parquet"
REFUSED_LIST = "refused.parquet"


def infer_input_format(url_list: str) -> str:
    """Input format from the file extension (``.gz`` ignored): parquet, csv, tsv, jsonl, json, txt."""
    name = storage.basename(url_list).lower().removesuffix(".gz")
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext not in INPUT_FORMATS:
        raise ValueError(f"cannot infer the format of URL list {url_list!r} from its extension; "
                         f"pass input_format= one of {INPUT_FORMATS}")
    return ext


def _read_one(uri: str, input_format: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    with storage.open(uri, "rb", compression="infer") as f:
        if input_format == "parquet":
            return pq.read_table(f)
        if input_format == "csv":
            return pacsv.read_csv(f)
        if input_format == "tsv":
            return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter="\t"))
        if input_format == "jsonl":
            return pajson.read_json(f)
        if input_format == "json":
            return pa.Table.from_pylist(json.load(f))
        return pacsv.read_csv(f, read_options=pacsv.ReadOptions(column_names=["url"]))


def read_url_list(url_list: str, input_format: str, url_col: str = "url", caption_col: str | None = "caption",
                  extra_columns: list[str] | None = None) -> pa.Table:
    """Read a URL list (a file, or a folder of files of one format) as a table with columns
    ``url``, ``caption`` (when ``caption_col`` is set) and ``extra_columns``."""
    fs, path = storage.url_to_fs(url_list)
    if fs.isdir(path):
        files = storage.list_files(url_list, rf".*\.{input_format}(\.gz)?")
        if not files:
            raise ValueError(f"no *.{input_format} files in URL list folder {url_list!r}")
    else:
        files = [url_list]
    table = pa.concat_tables([_read_one(f, input_format) for f in files], promote_options="default")
    wanted = {url_col: "url", **({caption_col: "caption"} if caption_col else {})}
    wanted.update({c: c for c in extra_columns or []})
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ValueError(f"URL list {url_list!r} has no column(s) {missing}; it has {table.column_names}. "
                         "Set url_col= / caption_col= to the right names.")
    table = table.select(list(wanted)).rename_columns(list(wanted.values()))
    if "caption" in table.column_names:
        table = table.set_column(table.column_names.index("caption"), "caption",
                                 pc.cast(table["caption"], pa.string()))
    return table


def _is_private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    # is_global is False for loopback, RFC 1918, link-local, CGNAT, reserved and unspecified.
    return not ip.is_global or ip.is_multicast


def _host_reason(host: str | None) -> str | None:
    """None if ``host`` may be fetched, else the refusal reason."""
    if not host:
        return None  # malformed URL: img2dataset reports it as a download error
    try:
        return "private_address" if _is_private(host) else None
    except ValueError:
        pass  # a name, not a literal IP
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return None  # unresolvable: img2dataset reports the DNS error
    # Refuse when any answer is private: a name may resolve to both kinds.
    return "private_address" if any(_is_private(i[4][0]) for i in infos) else None


def _split_url(url: str | None) -> urllib.parse.SplitResult | None:
    try:
        parts = urllib.parse.urlsplit(url or "")
        parts.hostname  # noqa: B018 - raises ValueError for a malformed IPv6 host
        return parts
    except ValueError:
        return None


def screen_urls(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Split a URL table into (allowed, refused); refused gains a ``reason`` column.

    Refuses non-HTTP(S) schemes (urllib would read ``file://`` from this machine) and hosts
    that are, or resolve to, private/loopback/link-local addresses.
    """
    parts = [_split_url(u) for u in table["url"].to_pylist()]
    hosts = sorted({p.hostname for p in parts if p and p.scheme in ("http", "https") and p.hostname})
    with ThreadPool(min(32, max(1, len(hosts)))) as pool:  # DNS lookups are slow one by one
        host_reason = dict(zip(hosts, pool.map(_host_reason, hosts), strict=True))
    reasons = []
    for p in parts:
        if p is None:
            reasons.append("invalid_url")
        elif p.scheme not in ("http", "https"):
            reasons.append("unsupported_scheme")
        else:
            reasons.append(host_reason.get(p.hostname))
    refused_mask = pa.array([r is not None for r in reasons])
    refused = table.filter(refused_mask)
    refused = refused.append_column("reason", pa.array([r for r in reasons if r is not None], pa.string()))
    return table.filter(pc.invert(refused_mask)), refused


def _prepare_list(table: pa.Table, output: str, settings: dict) -> str:
    """Write the list img2dataset will see; refuse to mix it into shards made from another list."""
    uri = storage.join(output, SCREENED_LIST)
    meta = {b"pipeline.download": json.dumps(settings, sort_keys=True).encode()}
    table = table.replace_schema_metadata(meta)
    done = storage.list_files(output, r"\d+_stats\.json")
    if done and storage.exists(uri):
        with storage.open(uri) as f:
            old = pq.read_table(f)
        if not (old.equals(table) and old.schema.metadata == table.schema.metadata):
            raise RuntimeError(f"{output} already holds {len(done)} finished shards downloaded from a different "
                               "URL list or with different settings; use a new output folder or delete it")
    with storage.atomic_write(uri) as f:
        pq.write_table(table, f)
    return uri


def _img2dataset_command() -> list[str]:
    # The img2dataset of this very venv; the package has no __main__, so fall back to -c.
    script = os.path.join(os.path.dirname(sys.executable), "img2dataset")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "import sys, img2dataset; sys.exit(img2dataset.main())"]


def run_streaming(cmd: list[str], env: dict | None = None, tail: int = 30) -> None:
    """Run ``cmd``, copying its stdout+stderr to ours line by line; RuntimeError on failure."""
    last = collections.deque(maxlen=tail)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          text=True, errors="replace", bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            last.append(line.rstrip("\n"))
        sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{os.path.basename(cmd[1] if len(cmd) > 1 else cmd[0])} exited with code {rc}; "
                           "last output:\n" + "\n".join(last))


def _child_env() -> dict:
    env = dict(os.environ)
    env.update(NO_ALBUMENTATIONS_UPDATE="1",  # albumentations checks PyPI for updates at import
               WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


def summarize(output: str) -> dict:
    """Totals over a download folder, from img2dataset's ``*_stats.json`` and ``refused.parquet``.

    Prints one line per finished shard.
    """
    stats_files = storage.list_files(output, r"\d+_stats\.json")
    totals = {"output": output, "shards": len(stats_files), "total": 0, "successes": 0, "failed": 0}
    errors: collections.Counter = collections.Counter()
    for uri in stats_files:
        stats = storage.read_json(uri)
        failed = stats["failed_to_download"] + stats["failed_to_resize"]
        totals["total"] += stats["count"]
        totals["successes"] += stats["successes"]
        totals["failed"] += failed
        errors.update({k: v for k, v in stats["status_dict"].items() if k != "success"})
        shard = storage.basename(uri).split("_")[0]
        print(f"shard {shard}: {stats['successes']}/{stats['count']} downloaded, {failed} failed", flush=True)
    refused_uri = storage.join(output, REFUSED_LIST)
    rejected: collections.Counter = collections.Counter()
    if storage.exists(refused_uri):
        with storage.open(refused_uri) as f:
            rejected.update(pq.read_table(f, columns=["reason"])["reason"].to_pylist())
    totals["errors"] = dict(errors.most_common())
    totals["rejected"] = dict(sorted(rejected.items()))
    return totals


def _img2dataset_args(list_uri: str, output: str, opts: dict) -> list[str]:
    args = {
        "url_list": list_uri, "output_folder": output, "input_format": "parquet", "url_col": "url",
        "output_format": "webdataset", "incremental_mode": "incremental", "enable_wandb": False,
        "compute_hash": "sha256", **opts,
    }
    # fire parses values as Python literals; repr() keeps strings strings and lists lists.
    return [f"--{k}={v!r}" if isinstance(v, str | list) else f"--{k}={v}" for k, v in args.items()]


def _missing_shards(output: str, n_rows: int, per_shard: int) -> list[str]:
    expected = {f"{i:05d}" for i in range(math.ceil(n_rows / per_shard))}
    done = {storage.basename(u).split("_")[0] for u in storage.list_files(output, r"\d+_stats\.json")}
    return sorted(expected - done)


def _check_finished(output: str, n_rows: int, per_shard: int) -> None:
    missing = _missing_shards(output, n_rows, per_shard)
    if missing:
        raise RuntimeError(f"img2dataset exited but shard(s) {missing} in {output} have no _stats.json "
                           "(see the errors above); run the same download again to retry only those shards")


def download(
    url_list: str,
    output: str,
    *,
    image_size: int = 64,
    resize_mode: str = "center_crop",
    input_format: str | None = None,
    url_col: str = "url",
    caption_col: str | None = "caption",
    processes: int = 1,
    threads: int = 8,
    timeout: int = 10,
    retries: int = 0,
    number_sample_per_shard: int = 10000,
    allow_private_networks: bool = False,
    encode_format: str = "png",
    encode_quality: int | None = None,
    save_additional_columns: list[str] | None = None,
) -> dict:
    """Download ``url_list`` into webdataset shards under ``output``; returns totals.

    Resize per stage on purpose: ``center_crop`` to 64 for the base model, ``keep_ratio`` or
    ``no`` for super-resolution stages. ``encode_format`` png (lossless, default) or jpg/webp;
    ``encode_quality`` defaults to a valid value for the format. ``save_additional_columns``
    copies extra URL-list columns into each sample's ``KEY.json``.

    Returns ``{"output", "shards", "total", "successes", "failed", "errors": {message: count},
    "rejected": {reason: count}}``; refused rows are not part of ``total``.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={resize_mode!r}: use one of {RESIZE_MODES} ('border' pads with white bars)")
    if encode_format not in DEFAULT_QUALITY:
        raise ValueError(f"encode_format={encode_format!r}: use one of {sorted(DEFAULT_QUALITY)}")
    quality = DEFAULT_QUALITY[encode_format] if encode_quality is None else encode_quality
    if encode_format == "png" and not 0 <= quality <= 9:
        raise ValueError(f"encode_quality={quality} for png is a zlib level: use 0..9")
    fmt = input_format or infer_input_format(url_list)
    if fmt == "txt":
        caption_col = None  # a .txt list is one URL per line, nothing else
    extras = list(save_additional_columns or [])
    table = read_url_list(url_list, fmt, url_col, caption_col, extras)
    if allow_private_networks:
        allowed, refused = table, table.slice(0, 0).append_column("reason", pa.array([], pa.string()))
    else:
        allowed, refused = screen_urls(table)
    # What decides the shards' content: a finished shard made with other values must not be mixed in.
    layout = {"image_size": image_size, "resize_mode": resize_mode, "encode_format": encode_format,
              "encode_quality": quality, "number_sample_per_shard": number_sample_per_shard}
    if caption_col:
        layout["caption_col"] = "caption"
    if extras:
        layout["save_additional_columns"] = extras
    storage.makedirs(output)
    list_uri = _prepare_list(allowed, output, layout)
    with storage.atomic_write(storage.join(output, REFUSED_LIST)) as f:
        pq.write_table(refused, f)
    if refused.num_rows:
        print(f"refused {refused.num_rows} of {table.num_rows} URLs (private network or non-HTTP); "
              f"see {storage.join(output, REFUSED_LIST)}", flush=True)
    # Every shard already has its completion marker: skip img2dataset's ~5 s start-up.
    if allowed.num_rows and _missing_shards(output, allowed.num_rows, number_sample_per_shard):
        runtime = {"processes_count": processes, "thread_count": threads, "timeout": timeout, "retries": retries}
        args = _img2dataset_args(list_uri, output, {**layout, **runtime})
        run_streaming(_img2dataset_command() + args, env=_child_env())
        _check_finished(output, allowed.num_rows, number_sample_per_shard)
    return summarize(output)
