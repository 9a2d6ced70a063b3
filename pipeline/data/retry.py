"""The retry pass: fetch the transient failures of a finished download again, a bounded number of times.

A failure is transient when a later try may pass (a timeout, a reset or refused connection, a
temporary DNS failure, HTTP 429 or 5xx: :func:`pipeline.data.fetch_guard.is_transient`); 404, 403,
410, bodies no decoder takes, the guard's refusals and filter rejects are permanent and never
fetched again. Each attempt

1. lists the original download's rows that failed for a transient reason and are not recovered
   (``OUTPUT/_retry/attempt-SSSSS/list.parquet``, written once; SSSSS is the attempt's first shard);
2. waits (exponential backoff with jitter: :func:`backoff_delay`) and runs the very img2dataset
   child the download ran (its spec, ``OUTPUT/_retry/download.json``, recorded by
   :func:`pipeline.data.download.download`; ``run``: its ``run_child``) on that list, its shards numbered from SSSSS on, after
   every shard of the folder; each row carries ``retry_of``, the key of the row it fetches again;
3. marks each original row with its outcome: ``status == "recovered"`` and ``recovered_as`` (the
   new key) when it came down, else its ``error_message`` becomes the attempt's (``first_error``
   keeps the download's; ``retry_attempts`` counts the tries), then writes ``applied.json``.

Every URL-list row is counted once (:func:`pipeline.data.raw_rows.superseded`) and a sample's key
is in one shard only. A rerun fetches nothing already recovered; a pass cut short resumes: an
attempt listed but not applied is finished first (img2dataset skips its finished shards).
``OUTPUT/_retry/stats.json`` holds the failures per reason before the first retry and after the
last, the recoveries per reason and each attempt; :func:`pipeline.data.download.summarize` and so
the CLI's JSON include it.

    from pipeline.data.download import retry_download
    retry_download("ROOT/raw", attempts=2)   # the pass, then the download's summary
    imagen-pipeline download --retry-failed --output ROOT/raw
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
import time
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.fetch_guard import is_transient, normalize_error, spec_politeness
from pipeline.data.politeness import hosts_quiet_for
from pipeline.data.raw_rows import RECOVERED, RETRY_DIR, RETRY_OF, read_shard_rows
from pipeline.data.retry_config import RetryConfig

DOWNLOAD_SPEC = "download.json"
STATS = "stats.json"
LIST = "list.parquet"
APPLIED = "applied.json"
SOURCE = "retry_source"  # the attempt list's column naming the shard parquet of the row retried
REASON = "retry_reason"  # and the reason it failed for (img2dataset reads neither)
# Columns the pass adds to a retried row of the download's parquet.
_MARKS = pa.schema([("first_error", pa.string()), ("retry_attempts", pa.int64()), ("retried_in", pa.int64()),
                    ("recovered_as", pa.string())])


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): ``d = min(cap, base * 2**(attempt-1))``,
    drawn uniformly from ``[d/2, d]`` ("equal jitter"): never sooner than half the backoff, so a
    busy host gets its breather, and spread, so that many workers do not come back at once."""
    d = min(cap, base * 2 ** (attempt - 1))
    return d / 2 + (rng or random).uniform(0, d / 2)


def _hosts_quiet_for(spec: dict, rows: pa.Table) -> float:
    """Seconds until the hosts of ``rows`` are past the Retry-After and failure backoff the
    download's politeness recorded on this machine (at most its ``backoff_cap``): a retry sent
    sooner would only be refused as ``host_backoff`` once more. 0 without politeness."""
    config = spec_politeness(spec)
    if config is None:
        return 0.0
    return min(max(hosts_quiet_for(config, rows["url"].to_pylist()), 0.0), config.backoff_cap)


def _dir(output: str, *parts: str) -> str:
    return storage.join(output, RETRY_DIR, *parts)


def record_download(output: str, spec: dict) -> None:
    """Keep the child spec a download runs (:func:`pipeline.data.download.run_child`), for the pass."""
    storage.makedirs(_dir(output))
    storage.write_json_if_changed(_dir(output, DOWNLOAD_SPEC), spec)


def _download_spec(output: str) -> dict:
    uri = _dir(output, DOWNLOAD_SPEC)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} is missing: {output} is no finished download, or one made before the "
                                "retry pass; run the download again (finished shards are not fetched again)")
    return storage.read_json(uri)


def _shard_id(uri: str) -> int:
    return int(re.match(r"\d+", storage.basename(uri)).group(0))


def original_shards(output: str) -> list[str]:
    """Parquet URIs of the download's own finished shards (the retry shards have a ``retry_of`` column)."""
    found = []
    for stats in storage.list_files(output, r"\d+_stats\.json"):
        uri = stats[: -len("_stats.json")] + ".parquet"
        with storage.open(uri, "rb") as f:
            if RETRY_OF not in pq.ParquetFile(f).schema_arrow.names:
                found.append(uri)
    return found


def transient_rows(output: str, columns: list[str]) -> pa.Table:
    """The download's rows that failed for a transient reason and are not recovered: ``columns``
    (url, caption, the extra columns), ``retry_of`` (their key), ``retry_source`` (their parquet)
    and ``retry_reason``."""
    found = []
    for uri in original_shards(output):
        for row in read_shard_rows(uri, [*columns, "key", "status", "error_message"]):
            reason = normalize_error(row["error_message"])
            if row["status"] != "success" and is_transient(reason):
                found.append({**{c: row[c] for c in columns}, RETRY_OF: row["key"], SOURCE: storage.basename(uri),
                              REASON: reason})
    return pa.Table.from_pylist(found) if found else pa.table({c: [] for c in [*columns, RETRY_OF, SOURCE, REASON]})


def _attempts(output: str) -> list[int]:
    return sorted(int(storage.basename(u).split("-")[1]) for u in storage.list_files(_dir(output), r"attempt-\d+")
                  if storage.exists(storage.join(u, LIST)))


def _attempt_uri(output: str, attempt: int, name: str = "") -> str:
    return _dir(output, f"attempt-{attempt:05d}", *([name] if name else []))


def _attempt_shards(output: str, attempt: int, per_shard: int) -> list[int]:
    with storage.open(_attempt_uri(output, attempt, LIST), "rb") as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    return list(range(attempt, attempt + math.ceil(rows / per_shard)))


def _next_shard(output: str, per_shard: int) -> int:
    """After every shard of the folder (finished or not) and every attempt listed."""
    ids = [_shard_id(u) for u in storage.list_files(output, r"\d+(\.tar|\.parquet|_stats\.json)")]
    ids += [_attempt_shards(output, a, per_shard)[-1] for a in _attempts(output)]
    return max(ids, default=-1) + 1


def _run_attempt(output: str, spec: dict, attempt: int, run: Callable[[dict], None]) -> list[int]:
    """img2dataset on the attempt's list, as the download ran it; its shards from ``attempt`` on."""
    spec = json.loads(json.dumps(spec))
    kwargs = spec["download"]
    per_shard = kwargs["number_sample_per_shard"]
    kwargs.update(url_list=_attempt_uri(output, attempt, LIST), output_folder=output, input_format="parquet",
                  url_col="url", incremental_mode="incremental",
                  save_additional_columns=[*(kwargs.get("save_additional_columns") or []), RETRY_OF])
    spec["start_shard_id"] = attempt
    shards = _attempt_shards(output, attempt, per_shard)
    if any(not storage.exists(storage.join(output, f"{i:05d}_stats.json")) for i in shards):
        run(spec)
    missing = [f"{i:05d}" for i in shards if not storage.exists(storage.join(output, f"{i:05d}_stats.json"))]
    if missing:
        raise RuntimeError(f"retry shard(s) {missing} in {output} have no _stats.json (see the errors above); "
                           "run the retry pass again (download --retry-failed): it resumes")
    return shards


def _mark(uri: str, outcomes: dict[str, dict], attempt: int) -> None:
    """Write each retried row's outcome into the download's parquet ``uri`` (once per attempt)."""
    with storage.open(uri, "rb") as f:
        table = pq.read_table(f)
    schema = table.schema
    for field in _MARKS:
        if field.name not in schema.names:
            schema = schema.append(field)
    rows = table.to_pylist()
    for row in rows:
        outcome = outcomes.get(row["key"])
        if outcome is None or row.get("retried_in") == attempt or row["status"] in ("success", RECOVERED):
            continue
        row["first_error"] = row.get("first_error") or row["error_message"]
        row["retry_attempts"] = (row.get("retry_attempts") or 0) + 1
        row["retried_in"] = attempt
        if outcome["status"] == "success":
            row["status"], row["recovered_as"] = RECOVERED, outcome["key"]
        else:
            row["error_message"] = outcome["error_message"]
    with storage.atomic_write(uri) as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)


def _apply(output: str, attempt: int, shards: list[int]) -> dict:
    """Mark the originals with the attempt's outcomes, then ``applied.json`` (the attempt is done)."""
    with storage.open(_attempt_uri(output, attempt, LIST), "rb") as f:
        listed = pq.read_table(f, columns=[RETRY_OF, SOURCE])
    source = dict(zip(listed[RETRY_OF].to_pylist(), listed[SOURCE].to_pylist(), strict=True))
    outcomes: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for i in shards:
        with storage.open(storage.join(output, f"{i:05d}.parquet"), "rb") as f:
            for row in pq.read_table(f, columns=["key", "status", "error_message", RETRY_OF]).to_pylist():
                outcomes[source[row[RETRY_OF]]][row[RETRY_OF]] = row
    for name, by_key in sorted(outcomes.items()):
        _mark(storage.join(output, name), by_key, attempt)
    recovered = sum(r["status"] == "success" for by_key in outcomes.values() for r in by_key.values())
    # No wall-clock figures: a rerun of the same outcomes gives the same stats (the delays are printed).
    result = {"attempt": attempt, "rows": len(source), "recovered": recovered, "shards": [f"{i:05d}.tar" for i in shards]}
    storage.write_json(_attempt_uri(output, attempt, APPLIED), result)
    return result


def failure_counts(output: str) -> dict:
    """The download's failures per reason before any retry and now, and the recoveries per reason
    (the reason the row first failed for)."""
    before: collections.Counter = collections.Counter()
    after: collections.Counter = collections.Counter()
    recovered: collections.Counter = collections.Counter()
    for uri in original_shards(output):
        with storage.open(uri, "rb") as f:
            table = pq.read_table(f)
        first = table["first_error"].to_pylist() if "first_error" in table.column_names else [None] * table.num_rows
        for status, error, was in zip(table["status"].to_pylist(), table["error_message"].to_pylist(), first,
                                      strict=True):
            if status == "success":
                continue
            reason = normalize_error(was or error)
            before[reason] += 1
            if status == RECOVERED:
                recovered[reason] += 1
            else:
                after[normalize_error(error)] += 1

    def transient(c: collections.Counter) -> int:
        return sum(n for r, n in c.items() if is_transient(r))

    return {"before": dict(before.most_common()), "after": dict(after.most_common()),
            "recovered": dict(recovered.most_common()), "transient_before": transient(before),
            "transient_after": transient(after)}


def _write_stats(output: str) -> dict:
    applied = [_attempt_uri(output, a, APPLIED) for a in _attempts(output)]
    stats = {**failure_counts(output), "attempts": [storage.read_json(u) for u in applied if storage.exists(u)]}
    storage.write_json_if_changed(_dir(output, STATS), stats)
    return stats


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5])


def retry_failed(output: str, attempts: int = RetryConfig.attempts, base_delay: float = RetryConfig.base_delay,
                 max_delay: float = RetryConfig.max_delay, *, run: Callable[[dict], None],
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> dict:
    """Up to ``attempts`` retries of the transient failures of the download in ``output``, the
    k-th after :func:`backoff_delay` (k, ``base_delay``, ``max_delay``) seconds; an attempt cut
    short before is finished first. ``run(spec)`` runs the download's img2dataset child on a spec
    (:func:`pipeline.data.download.run_child`). Returns (and writes) ``_retry/stats.json``'s counts."""
    spec = _download_spec(output)  # no shards (every URL refused before fetching): nothing to retry
    columns = ["url", *(["caption"] if spec["download"].get("caption_col") else []),
               *(spec["download"].get("save_additional_columns") or [])]
    per_shard = spec["download"]["number_sample_per_shard"]
    for attempt in _attempts(output):  # listed by a pass that stopped before it was applied
        if not storage.exists(_attempt_uri(output, attempt, APPLIED)):
            print(f"retry: resuming attempt {attempt:05d}", flush=True)
            _apply(output, attempt, _run_attempt(output, spec, attempt, run))
    for k in range(1, attempts + 1):
        rows = transient_rows(output, columns)
        if not rows.num_rows:
            break
        reasons = collections.Counter(rows[REASON].to_pylist())
        delay = max(backoff_delay(k, base_delay, max_delay, rng), _hosts_quiet_for(spec, rows))
        attempt = _next_shard(output, per_shard)
        print(f"retry {k} of {attempts}: {rows.num_rows} transient failures ({_counts(reasons)}) in {delay:.1f} s, "
              f"shards from {attempt:05d}", flush=True)
        storage.makedirs(_attempt_uri(output, attempt))
        with storage.atomic_write(_attempt_uri(output, attempt, LIST)) as f:
            pq.write_table(rows, f)
        sleep(delay)
        result = _apply(output, attempt, _run_attempt(output, spec, attempt, run))
        print(f"retry {k}: recovered {result['recovered']} of {result['rows']}", flush=True)
        _write_stats(output)
    stats = _write_stats(output)
    print(f"retry: {sum(stats['recovered'].values())} recovered in all; transient failures left "
          f"{stats['transient_after']} (of {stats['transient_before']})", flush=True)
    return stats


