"""Download a URL list into webdataset shards with img2dataset, through our fetch guard.

img2dataset runs as its own process (``python -m pipeline.data.fetch_guard``: it uses spawn
multiprocessing, and it is the same command a Kubernetes job would run) with its downloads
routed through the network guard (:mod:`pipeline.netguard`): private, loopback and link-local
addresses are refused on every request and redirect, bodies are size- and pixel-limited. Its output streams to
our stdout (a progress line every ``progress_every`` seconds while a shard is in flight, a line per
finished shard) and a non-zero exit becomes a RuntimeError with its last lines. A download that got
not one image is an error (:class:`NothingDownloaded`, naming ``IMAGEN_ALLOW_PRIVATE_NETWORKS`` when
private addresses were refused), so the next step never runs on nothing. A re-run resumes: img2dataset's ``incremental_mode`` skips every shard that has its
``NNNNN_stats.json`` (written last), and redoes the others from scratch.

``distributor="pyspark"`` (CLI ``--distributor pyspark --spark-master URL``) runs the same download
with img2dataset's Spark distributor, one task per shard, the guard installed in every executor's
Python worker (:mod:`pipeline.data.spark`); the list screening, resume, stats and reject
accounting below are the same for both.

Before img2dataset sees the list, rows that the URL alone condemns (not HTTP(S), malformed,
a literal private IP) are refused and recorded in ``refused.parquet``, never fetched. The list
itself, when it is an http(s) URL, is read through the same guard (``pipeline.storage.open``).
Which private networks may be fetched is deployment configuration: ``IMAGEN_ALLOW_PRIVATE_NETWORKS``
and ``IMAGEN_ALLOW_HOSTS`` in the environment (:func:`pipeline.netguard.deployment_policy`),
widened by ``allow_private_networks=`` / ``allow_hosts=`` (the CLI's flags).

Output folder (``output``, any fsspec URI):
    _urls.parquet          the screened list img2dataset downloads (url, caption, extras)
    refused.parquet        url, caption, reason for every row refused before fetching
    NNNNN.tar              successes: KEY.png|jpg|webp, KEY.txt (caption), KEY.json (metadata)
    NNNNN.parquet          every row of the shard with status and error_message
    NNNNN_stats.json       img2dataset's completion marker and per-shard counts
    NNNNN_source.jsonl     each fetched body's format as served (dedup ranks copies by it: pipeline.data.copies)
    NNNNN_facts.arrow      each stored PNG's size, pHash, thumbnail and extremes, from the pixels img2dataset
                           encoded: the filter skips decoding it (pipeline.data.facts)
    _retry/                the retry pass (:mod:`pipeline.data.retry`): download.json (the child spec
                           the download ran), stats.json (failures per reason before and after),
                           attempt-NNNNN/ (one attempt's list; its shards are NNNNN.tar onward)

Transient failures (timeouts, resets, 429, 5xx: :func:`~pipeline.data.fetch_guard.is_transient`)
are fetched again by a bounded retry pass after the download (``retry_attempts``, with exponential
backoff and jitter; 0: none, the DAG's ``retry_failed`` task runs it). Recovered samples land in
shards numbered after the download's, each row naming the key it retries (``retry_of``), and the
failed row becomes ``status == "recovered"``: every URL-list row is counted once
(:func:`pipeline.data.raw_rows.superseded`), and no key is in two shards.

Downloaded once for every cascade stage (``stages=``, ``presets=``; :func:`stage_policy`):
originals at the largest stage's side, ratio kept, never upscaled, so each stage trains on
real pixels at its own resolution. The filter step rejects sources below the smallest stage
and counts, per stage, the samples too small for it. ``border`` (white bars) is never offered.

    python -c "from pipeline.data.download import download; print(download('urls.parquet', 'raw'))"
    imagen-pipeline download --url-list urls.csv --url-col link --caption-col text --output raw
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from imagen.config import STAGES, StageSpec, stage_specs
from pipeline import storage
from pipeline.data import retry, spark
from pipeline.data.fetch_guard import (  # re-exported: the reject table's reasons
    is_transient,
    normalize_error,
    reason_stage,
    spec_policy,
)
from pipeline.data.politeness import PolitenessConfig
from pipeline.data.raw_rows import RETRY_DIR, RETRY_OF, read_shard_rows
from pipeline.data.retry_config import RetryConfig
from pipeline.netguard import (
    ENV_ALLOW_HOSTS,
    ENV_ALLOW_PRIVATE,
    REFUSAL_REASONS,
    FetchPolicy,
    decoder_env,
    deployment_policy,
    literal_reason,
)
from pipeline.options import option
from pipeline.proc import run_streaming

log = logging.getLogger(__name__)

INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl", "json", "txt")
# "border" pads to a square with white bars, which teaches the model white bars: never used.
RESIZE_MODES = ("center_crop", "keep_ratio", "keep_ratio_largest", "no")

def stage_policy(specs: dict[str, StageSpec]) -> dict:
    """How to download once for every stage in ``specs`` (Imagen trains all stages on the same
    pairs, each at its own resolution): originals at the largest stage's side, ratio kept,
    never upscaled, so each stage crops real pixels; ``min_side`` is the smallest stage's
    minimum native side (the filter's size floor); ``stage_sides`` lets the filter count, per
    stage, the samples too small for it."""
    if not specs:
        raise ValueError("no cascade stages given: the download size comes from the stages' specs")
    return {"image_size": max(s.image_size for s in specs.values()), "resize_mode": "keep_ratio",
            "resize_only_if_bigger": True, "min_side": min(s.min_native_side for s in specs.values()),
            "stage_sides": {name: s.min_native_side for name, s in specs.items()}}

# PNG's "quality" is a zlib level 0..9 (img2dataset rejects 95); 3 is fast and still lossless.
DEFAULT_QUALITY = {"png": 3, "jpg": 95, "webp": 95}
ENCODE_FORMATS = tuple(DEFAULT_QUALITY)  # png (lossless), jpg, webp: img2dataset's encoders we offer
# X-Robots-Tag directives that opt an image out of AI training or indexing (img2dataset's list).
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
SCREENED_LIST = "_urls.parquet"
REFUSED_LIST = "refused.parquet"
# Columns img2dataset writes itself into every shard's parquet and sample json
# (img2dataset/downloader.py, Downloader.download_shard; "sha256" is our compute_hash): an extra
# column of one of these names collides with them and fails every shard. url and caption are
# the list's own columns, renamed, and always saved.
# retry_of and the retry pass's own columns (pipeline.data.retry) are ours.
RESERVED_COLUMNS = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                    "original_height", "exif", "sha256", "md5", "sha512", RETRY_OF, "first_error",
                    "retry_attempts", "retried_in", "recovered_as")


@dataclasses.dataclass
class DownloadConfig:
    """Every download option and its default (the single source of them). The fields declared
    with :func:`~pipeline.options.option` generate ``imagen-pipeline download``'s flags; the
    others are set from Python, or by the CLI's hand-written flags (stages, presets, the fetch
    guard's allowances and Spark settings, which need parsing or are shared with other verbs)."""

    # The stages the data serves, each at its preset's sizes (stage -> preset; a missing stage:
    # its paper preset): image_size / resize_mode / resize_only_if_bigger default to stage_policy.
    stages: tuple[str, ...] = STAGES
    presets: dict[str, str] = dataclasses.field(default_factory=dict)
    image_size: int | None = option(None, "override the size the stages' specs give")
    resize_mode: str | None = option(None, "override keep_ratio ('border' is never offered)", choices=RESIZE_MODES)
    resize_only_if_bigger: bool | None = None
    input_format: str | None = option(None, "default: from the file extension", choices=INPUT_FORMATS)
    url_col: str = option("url", "the URL list's URL column (default %(default)s)")
    caption_col: str | None = option("caption", "the URL list's caption column (default %(default)s); "
                                                "empty for a list without captions")
    save_additional_columns: list[str] | None = option(
        None, "URL-list columns to copy into each sample's json", cli_name="--extra-columns", nargs="*")
    processes: int = option(1, "download processes (default %(default)s)")
    threads: int = option(8, "download threads per process (default %(default)s)")
    timeout: float = option(10, "seconds per request, body included (default %(default)s)")
    retries: int = option(0, "retries per failed URL (default %(default)s)")
    number_sample_per_shard: int = option(10000, "samples per raw shard (default %(default)s)",
                                          cli_name="--samples-per-shard")
    encode_format: str = option("png", "how images are stored: png (lossless), jpg or webp (default %(default)s)",
                                choices=ENCODE_FORMATS)
    encode_quality: int | None = None  # None: a valid default for the format
    disallowed_header_directives: tuple[str, ...] = OPT_OUT_DIRECTIVES
    user_agent_token: str | None = "img2dataset"  # so "X-Robots-Tag: img2dataset: noai" applies too
    # Fetch loopback/private/link-local (the local tiny dataset); adds to IMAGEN_ALLOW_PRIVATE_NETWORKS.
    allow_private_networks: bool = False
    allow_hosts: tuple[str, ...] = ()  # exact "host:port" exempt from the address check (+ IMAGEN_ALLOW_HOSTS)
    max_bytes: int = option(32 * 1024 * 1024, "refuse responses larger than this (default %(default)s)")
    max_pixels: int = option(64_000_000, "refuse images declaring more pixels, before decoding "
                                         "(default %(default)s)")
    # Politeness per host and machine (pipeline.data.politeness); 0 turns a cap off.
    per_host_connections: int = option(PolitenessConfig.connections, "requests in flight per host and machine; "
                                                                     "0: no cap (default %(default)s)")
    per_host_rate: float = option(PolitenessConfig.rate, "requests/s per host and machine; 0: no cap "
                                                         "(default %(default)s)")
    per_host_burst: int = option(PolitenessConfig.burst, "requests a rested host gets at once (default %(default)s)")
    robots_txt: bool = option(True, "ignore robots.txt (only for hosts you own or have leave to crawl)")
    progress_every: float = option(10.0, "seconds between progress lines while a shard downloads "
                                         "(default %(default)s)")
    # "pyspark": img2dataset's Spark distributor, one task per shard (pipeline.data.spark); its
    # master: local[N] (default local[processes]), local-cluster[W,C,MB], spark://, k8s://https://
    distributor: str = option("multiprocessing", "pyspark: img2dataset's Spark distributor, one task per shard "
                                                 "(needs imagen-pipeline[spark] and Java 17)",
                              choices=spark.DISTRIBUTORS)
    spark_master: str | None = option(None, "pyspark: local[N] (default local[PROCESSES]), local-cluster[W,C,MB], "
                                            "spark://HOST:PORT, k8s://https://HOST:PORT or yarn", metavar="URL")
    spark_conf: dict[str, str] = dataclasses.field(default_factory=dict)  # on top of pipeline.data.spark's
    retry_attempts: int = option(RetryConfig.attempts, "retry passes over the transient failures (timeouts, resets, 429, 5xx) "
                                    "after the download; 0: none (default %(default)s)")
    retry_base_delay: float = option(RetryConfig.base_delay, "seconds before the first retry pass, doubled for each next one, "
                                          "with jitter (default %(default)s)")
    retry_max_delay: float = option(RetryConfig.max_delay, "cap on the seconds between retry passes (default %(default)s)")


def infer_input_format(url_list: str) -> str:
    """Input format from the file extension (``.gz`` ignored): parquet, csv, tsv, jsonl, json, txt."""
    name = storage.basename(url_list).lower().removesuffix(".gz")
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    if ext not in INPUT_FORMATS:
        raise ValueError(f"cannot infer the format of URL list {url_list!r} from its extension; "
                         f"pass input_format= one of {INPUT_FORMATS}")
    return ext


def _read_one(uri: str, input_format: str, policy: FetchPolicy | None = None) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    try:
        with storage.open(uri, "rb", compression="infer", policy=policy) as f:
            if input_format == "parquet":
                return pq.read_table(f)
            if input_format == "csv":
                return pacsv.read_csv(f)
            if input_format == "tsv":
                return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter="\t"))
            if input_format == "jsonl":
                return pajson.read_json(f)
            if input_format == "json":  # a bare NaN (Python's json writes them) is a missing value
                return pa.Table.from_pylist(json.load(f, parse_constant=lambda _: None))
            return pacsv.read_csv(f, read_options=pacsv.ReadOptions(column_names=["url"]))
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError) as e:  # names the file (one CLI line)
        raise ValueError(f"URL list {uri} is not readable as {input_format} ({' '.join(str(e).split())}): "
                         "fix the file or pass --input-format") from None


def read_url_list(url_list: str, input_format: str, url_col: str = "url", caption_col: str | None = "caption",
                  extra_columns: list[str] | None = None, policy: FetchPolicy | None = None) -> pa.Table:
    """Read a URL list (a file, or a folder of files of one format) as a table with columns
    ``url``, ``caption`` (when ``caption_col`` is set; a missing caption is ``""``) and
    ``extra_columns``. An http(s) list is one file, read through the fetch guard under
    ``policy`` (default: the deployment's)."""
    files = [url_list]
    if not storage.is_http(url_list) and storage.isdir(url_list, policy):
        files = storage.list_files(url_list, rf".*\.{input_format}(\.gz)?")
        if not files:
            raise ValueError(f"no *.{input_format} files in URL list folder {url_list!r}")
    table = pa.concat_tables([_read_one(f, input_format, policy) for f in files], promote_options="default")
    wanted = {url_col: "url", **({caption_col: "caption"} if caption_col else {})}
    wanted.update({c: c for c in extra_columns or []})
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ValueError(f"URL list {url_list!r} has no column(s) {missing}; it has {table.column_names}. "
                         "Set url_col= / caption_col= to the right names.")
    table = table.select(list(wanted)).rename_columns(list(wanted.values()))
    if "caption" in table.column_names:
        table = table.set_column(table.column_names.index("caption"), "caption", _captions(table["caption"]))
    return table


def _captions(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Captions as strings, a missing one (null, or the float NaN pandas writes for it) as "":
    the filter then counts it as ``caption_too_short`` instead of training on the text "nan"."""
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return pc.fill_null(pc.cast(column, pa.string()), "")


def screen_urls(table: pa.Table, policy: FetchPolicy | None = None) -> tuple[pa.Table, pa.Table]:
    """Split a URL table into (allowed, refused); refused gains a ``reason`` column.

    Decides what the URL alone decides: malformed URLs, schemes other than HTTP(S) (urllib
    would read ``file://`` from this machine) and literal private/loopback/link-local IPs.
    Host names are checked when they are resolved, inside the fetch (:mod:`pipeline.netguard`),
    so a DNS answer cannot change between check and use and no lookup is done twice.
    """
    policy = policy or FetchPolicy()
    reasons = [literal_reason(u, policy) for u in table["url"].to_pylist()]
    refused_mask = pa.array([r is not None for r in reasons], pa.bool_())
    refused = table.filter(refused_mask)
    refused = refused.append_column("reason", pa.array([r for r in reasons if r is not None], pa.string()))
    return table.filter(pc.invert(refused_mask)), refused


def _prepare_list(table: pa.Table, output: str, settings: dict) -> str:
    """Write the list img2dataset will see; refuse to mix it into shards made from another list."""
    uri = storage.join(output, SCREENED_LIST)
    meta = {b"pipeline.download": json.dumps(settings, sort_keys=True).encode()}
    table = table.replace_schema_metadata(meta)
    done = storage.list_files(output, r"\d+_stats\.json")
    unchanged = _unchanged(uri, table)
    if done and unchanged is False:
        raise RuntimeError(f"{output} already holds {len(done)} finished shards downloaded from a different "
                           "URL list or with different settings; use a new output folder or delete it")
    if not unchanged:  # a rerun of the same list writes nothing
        with storage.atomic_write(uri) as f:
            pq.write_table(table, f)
    return uri


def _unchanged(uri: str, table: pa.Table) -> bool | None:
    """Whether ``uri`` already holds ``table`` (rows, schema and its metadata); None when there is
    no such file. An unreadable file is not the same table."""
    if not storage.exists(uri):
        return None
    try:
        with storage.open(uri) as f:
            old = pq.read_table(f)
    except (pa.ArrowInvalid, FileNotFoundError):
        return False
    return old.equals(table) and old.schema.metadata == table.schema.metadata


def _write_refused(refused: pa.Table, output: str) -> str:
    """``refused.parquet``, written only when its rows changed (a rerun writes nothing)."""
    uri = storage.join(output, REFUSED_LIST)
    if not _unchanged(uri, refused):
        with storage.atomic_write(uri) as f:
            pq.write_table(refused, f)
    return uri


def _child_env(policy: FetchPolicy) -> dict:
    env = dict(os.environ)
    env.update(NO_ALBUMENTATIONS_UPDATE="1",  # albumentations checks PyPI for updates at import
               WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(decoder_env(policy))  # OpenCV's pixel cap in img2dataset's decoder
    return env


def shard_failures(parquet_uri: str) -> tuple[int, collections.Counter]:
    """URL-list rows of one img2dataset shard and its failures as ``{(stage, reason): n}``
    (rows the retry pass superseded are not counted: :mod:`pipeline.data.raw_rows`)."""
    rows = read_shard_rows(parquet_uri, ["status", "error_message"])
    failures: collections.Counter = collections.Counter()
    for status, error in ((r["status"], r["error_message"]) for r in rows):
        if status != "success":
            reason = normalize_error(error)
            failures[(reason_stage(reason), reason)] += 1
    return len(rows), failures


def read_refused(output: str) -> collections.Counter:
    """Rows the pre-screen refused before img2dataset saw them, by reason."""
    uri = storage.join(output, REFUSED_LIST)
    if not storage.exists(uri):
        return collections.Counter()
    with storage.open(uri, "rb") as f:
        return collections.Counter(pq.read_table(f, columns=["reason"])["reason"].to_pylist())


def summarize(output: str) -> dict:
    """Totals over a download folder: finished shards, successes, failures and refusals by reason.

    ``input_rows == successes + failed + refused``; ``rejected`` holds every refusal by reason,
    from the pre-screen (``refused.parquet``) and from inside the fetch (shard parquets).
    ``errors`` are the failures left after the retry pass; ``transient`` how many of them a
    later pass may still get; ``retry`` the pass's ``_retry/stats.json`` (counts before/after).
    """
    stats_files = storage.list_files(output, r"\d+_stats\.json")
    totals = {"output": output, "shards": len(stats_files), "total": 0, "successes": 0}
    failures: collections.Counter = collections.Counter()
    for uri in stats_files:
        stats = storage.read_json(uri)
        totals["successes"] += stats["successes"]
        rows, shard = shard_failures(uri[: -len("_stats.json")] + ".parquet")
        totals["total"] += rows  # a retry shard's rows re-fetch rows counted already
        failures.update(shard)
    prescreened = read_refused(output)
    refused = collections.Counter(prescreened)
    refused.update({reason: n for (stage, reason), n in failures.items() if stage == "refused"})
    errors = collections.Counter({reason: n for (stage, reason), n in failures.items() if stage == "download"})
    totals["failed"] = sum(errors.values())
    totals["refused"] = sum(refused.values())
    totals["input_rows"] = totals["total"] + sum(prescreened.values())
    totals["errors"] = dict(errors.most_common())
    totals["transient"] = sum(n for reason, n in errors.items() if is_transient(reason))
    totals["rejected"] = dict(sorted(refused.items()))
    retry_stats = storage.join(output, RETRY_DIR, retry.STATS)
    if storage.exists(retry_stats):
        totals["retry"] = storage.read_json(retry_stats)
    return totals


def _shard_ids(output: str) -> set[int]:
    return {int(storage.basename(u).split("_")[0]) for u in storage.list_files(output, r"\d+_stats\.json")}


def _missing_shards(output: str, n_rows: int, per_shard: int) -> list[str]:
    return [f"{i:05d}" for i in sorted(set(range(math.ceil(n_rows / per_shard))) - _shard_ids(output))]


def _check_finished(output: str, n_rows: int, per_shard: int) -> None:
    missing = _missing_shards(output, n_rows, per_shard)
    if missing:
        raise RuntimeError(f"img2dataset exited but shard(s) {missing} in {output} have no _stats.json "
                           "(see the errors above); run the same download again to retry only those shards")


def _resolve(config: DownloadConfig) -> DownloadConfig:
    """Fill the stage's resize defaults and validate; every error names the option to change."""
    policy = stage_policy(stage_specs(config.presets, config.stages))
    config = dataclasses.replace(config, **{k: policy[k] for k in ("image_size", "resize_mode", "resize_only_if_bigger")
                                            if getattr(config, k) is None})
    if config.resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode={config.resize_mode!r}: use one of {RESIZE_MODES} "
                         "('border' pads with white bars, which the model would learn)")
    if config.encode_format not in DEFAULT_QUALITY:
        raise ValueError(f"encode_format={config.encode_format!r}: use one of {sorted(DEFAULT_QUALITY)}")
    if config.encode_quality is None:
        config = dataclasses.replace(config, encode_quality=DEFAULT_QUALITY[config.encode_format])
    if config.encode_format == "png" and not 0 <= config.encode_quality <= 9:
        raise ValueError(f"encode_quality={config.encode_quality} for png is a zlib level: use 0..9")
    if config.distributor not in spark.DISTRIBUTORS:
        raise ValueError(f"distributor={config.distributor!r}: use one of {spark.DISTRIBUTORS}")
    if config.distributor != "pyspark" and (config.spark_master or config.spark_conf):
        raise ValueError("spark_master / spark_conf apply to distributor='pyspark' (--distributor pyspark) only")
    if config.distributor == "pyspark":
        config = dataclasses.replace(config, spark_master=spark.check_master(
            config.spark_master or f"local[{max(config.processes, 1)}]"))
    if config.number_sample_per_shard < 1 or config.timeout <= 0:
        raise ValueError("number_sample_per_shard must be >= 1 and timeout > 0")
    if config.retry_attempts < 0 or config.retry_base_delay < 0 or config.retry_max_delay < config.retry_base_delay:
        raise ValueError("retry_attempts and retry_base_delay must be >= 0, retry_max_delay >= retry_base_delay")
    if config.per_host_connections < 0 or config.per_host_rate < 0 or config.per_host_burst < 1:
        raise ValueError(f"--per-host-connections {config.per_host_connections} / --per-host-rate "
                         f"{config.per_host_rate}: use 0 (no cap) or more; --per-host-burst "
                         f"{config.per_host_burst}: use 1 or more")
    reserved = [c for c in config.save_additional_columns or [] if c in RESERVED_COLUMNS]
    if reserved:
        raise ValueError(f"--extra-columns {reserved[0]!r} is a column img2dataset writes itself (reserved: "
                         f"{', '.join(RESERVED_COLUMNS)}); rename that column in the URL list, or leave it out")
    return config


def _layout(config: DownloadConfig, policy: FetchPolicy) -> dict:
    """What decides the shards' content: a finished shard made with other values must not be mixed in."""
    keys = ("image_size", "resize_mode", "resize_only_if_bigger", "encode_format", "encode_quality",
            "number_sample_per_shard", "caption_col", "save_additional_columns", "disallowed_header_directives",
            "user_agent_token")
    layout = {k: getattr(config, k) for k in keys}
    layout["save_additional_columns"] = list(layout["save_additional_columns"] or [])
    layout["disallowed_header_directives"] = list(layout["disallowed_header_directives"])
    layout["caption_col"] = "caption" if config.caption_col else None
    layout["policy"] = {**dataclasses.asdict(policy), "allow_hosts": list(policy.allow_hosts)}
    return layout


def _img2dataset_spec(list_uri: str, output: str, config: DownloadConfig, policy: FetchPolicy) -> dict:
    kwargs = {
        "url_list": list_uri, "output_folder": output, "input_format": "parquet", "url_col": "url",
        "caption_col": "caption" if config.caption_col else None, "output_format": "webdataset",
        "incremental_mode": "incremental", "enable_wandb": False, "compute_hash": "sha256",
        "image_size": config.image_size, "resize_mode": config.resize_mode,
        "resize_only_if_bigger": config.resize_only_if_bigger, "encode_format": config.encode_format,
        "encode_quality": config.encode_quality, "number_sample_per_shard": config.number_sample_per_shard,
        "save_additional_columns": list(config.save_additional_columns or []) or None,
        "processes_count": config.processes, "thread_count": config.threads, "timeout": config.timeout,
        "distributor": config.distributor,
        "retries": config.retries, "user_agent_token": config.user_agent_token,
        # An empty list would make img2dataset fall back to its own default list.
        "disallowed_header_directives": list(config.disallowed_header_directives) or None,
    }
    spec = {"download": kwargs, "policy": {**dataclasses.asdict(policy), "allow_hosts": list(policy.allow_hosts)},
            "politeness": politeness_spec(config), "progress_every": config.progress_every}
    if config.distributor == "pyspark":
        spec["spark"] = {"master": config.spark_master,
                         "conf": spark.session_conf(config.spark_master, policy, config.spark_conf)}
    return spec


def child_module(spec: dict) -> str:
    """The module a download child runs: img2dataset under the guard, here or on Spark."""
    return "pipeline.data.spark" if "spark" in spec else "pipeline.data.fetch_guard"


def run_child(spec: dict) -> None:
    """Run img2dataset under the guard in a child process on ``spec`` (:func:`_img2dataset_spec`'s)."""
    if "spark" in spec:
        spark.require_spark()
    env = _child_env(spec_policy(spec))
    run_streaming([sys.executable, "-m", child_module(spec), json.dumps(spec)], env=env, tail=30)


def politeness_spec(config: DownloadConfig) -> dict:
    """The download's :class:`~pipeline.data.politeness.PolitenessConfig` fields, as the child's
    spec carries them (the Spark path runs the same spec in every executor)."""
    return {"connections": config.per_host_connections, "rate": config.per_host_rate,
            "burst": config.per_host_burst, "robots_txt": config.robots_txt,
            "user_agent_token": config.user_agent_token}


def download(url_list: str, output: str, config: DownloadConfig | None = None, **overrides) -> dict:
    """Download ``url_list`` into webdataset shards under ``output``; returns :func:`summarize`.

    Options are :class:`DownloadConfig` fields, as ``config`` and/or keyword overrides. A re-run
    over the same output only downloads shards without a ``_stats.json``.
    """
    config = _resolve(dataclasses.replace(config or DownloadConfig(), **overrides))
    policy = deployment_policy(allow_private_networks=config.allow_private_networks,
                               allow_hosts=config.allow_hosts, max_bytes=config.max_bytes,
                               max_pixels=config.max_pixels)
    fmt = config.input_format or infer_input_format(url_list)
    caption_col = None if fmt == "txt" else config.caption_col  # a .txt list is one URL per line
    config = dataclasses.replace(config, caption_col=caption_col)
    table = read_url_list(url_list, fmt, config.url_col, caption_col, list(config.save_additional_columns or []),
                          policy)
    allowed, refused = screen_urls(table, policy)
    storage.makedirs(output)
    list_uri = _prepare_list(allowed, output, _layout(config, policy))
    refused_uri = _write_refused(refused, output)
    if refused.num_rows:
        print(f"refused {refused.num_rows} of {table.num_rows} URLs before fetching (scheme or private "
              f"address); see {refused_uri}", flush=True)
    missing = _missing_shards(output, allowed.num_rows, config.number_sample_per_shard)
    n_shards = math.ceil(allowed.num_rows / config.number_sample_per_shard)
    print(f"download: {n_shards - len(missing)} of {n_shards} shards already done, {len(missing)} to fetch",
          flush=True)
    spec = _img2dataset_spec(list_uri, output, config, policy)
    retry.record_download(output, spec)  # what the retry pass re-runs, now or from the CLI / the DAG
    # Skip img2dataset's ~10 s start-up when every shard already has its completion marker.
    if missing:
        run_child(spec)
        _check_finished(output, allowed.num_rows, config.number_sample_per_shard)
    if config.retry_attempts > 0:
        retry.retry_failed(output, config.retry_attempts, config.retry_base_delay, config.retry_max_delay, run=run_child)
    return check_downloaded(summarize(output), url_list)


class NothingDownloaded(RuntimeError):
    """Not one image came down: the next step must not run on nothing. ``summary`` is
    :func:`summarize`'s (the counts by reason are all there)."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


class NothingAllowed(NothingDownloaded, ValueError):
    """Nothing could come down: an empty URL list, or every URL refused by the fetch policy. An
    input error (a ValueError: the DAG task fails without retries), where a download whose
    every fetch failed may be a host that is down, which a retry can meet up again."""


# Refusals the deployment's private-network setting lifts (the other refusals are the URL's fault).
ADDRESS_REASONS = tuple(r for r in REFUSAL_REASONS if r.endswith("_address"))


def check_downloaded(summary: dict, url_list: str) -> dict:
    """``summary`` when at least one image came down; else :class:`NothingDownloaded`, saying why.

    Refusals of private addresses name the setting that lifts them (the deployment forgot it, or
    the CLI flag); a download that got some images but had private addresses refused warns.
    """
    address = {r: n for r, n in summary["rejected"].items() if r in ADDRESS_REASONS}
    lift = (f"if these hosts are yours, set {ENV_ALLOW_PRIVATE}=1 (or {ENV_ALLOW_HOSTS}=HOST:PORT,...) where "
            "the download runs, or pass --allow-private-networks / --allow-host HOST:PORT to the CLI")
    if summary["successes"]:
        if address:
            log.warning("%d of %d URLs were refused as private, loopback or link-local addresses (%s); %s",
                        sum(address.values()), summary["input_rows"], _counts(address), lift)
        return summary
    rows, output = summary["input_rows"], summary["output"]
    if not rows:
        message = f"the URL list {url_list} has no rows: nothing to download"
    elif address:
        message = (f"nothing downloaded: {sum(address.values())} of {rows} URLs were refused as private, loopback "
                   f"or link-local addresses ({_counts(address)}); {lift}. Refused rows: "
                   f"{storage.join(output, REFUSED_LIST)} and the shards' parquet files")
    else:
        reasons = {**summary["rejected"], **summary["errors"]}
        message = (f"nothing downloaded: all {rows} URLs failed ({_counts(reasons)}); each row's error is in "
                   f"{storage.join(output, 'NNNNN.parquet')} (error_message) and {REFUSED_LIST}")
    if rows and sum(address.values()) < rows:  # some URLs were allowed and failed: perhaps a host down
        raise NothingDownloaded(message, summary)
    raise NothingAllowed(message, summary)


def _counts(counts: dict[str, int], top: int = 5) -> str:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{r} {n}" for r, n in ranked[:top]) + (" ..." if len(ranked) > top else "")


def retry_download(output: str, attempts: int = RetryConfig.attempts, base_delay: float = RetryConfig.base_delay,
                   max_delay: float = RetryConfig.max_delay, url_list: str | None = None) -> dict:
    """The retry pass (:func:`pipeline.data.retry.retry_failed`) on the finished download in
    ``output``, then :func:`summarize` (with the pass's counts), checked: :class:`NothingDownloaded`
    when still not one image came down (the DAG's ``retry_failed`` task, ``download --retry-failed``)."""
    retry.retry_failed(output, attempts, base_delay, max_delay, run=run_child)
    return check_downloaded(summarize(output), url_list or storage.join(output, SCREENED_LIST))
