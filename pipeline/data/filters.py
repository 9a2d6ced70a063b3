"""Filter downloaded img2dataset shards into evenly sized clean shards, counting every reject.

Three passes, each restartable, so a run killed at any point and started again redoes little
and ends with the same bytes:

1. per raw shard (``workers`` processes in parallel): the per-sample filters of
   :mod:`pipeline.data.filter_registry` (cheapest first), configured model scorers, and each kept
   sample's dedup signature -> ``_filter/NNNNN.parquet``, one row per sample (key, url, reject
   reason, sha256, pHash, thumbnail, scores, and where each member lies with its sha256).
   Written atomically, it is the shard's completion marker; it is redone when the per-sample
   settings or the raw shard's bytes change (checked by the raw shard's sha256, not its size).
   An image is decoded only when a filter or scorer needs pixels the download did not record:
   the raw shard's ``NNNNN_facts.arrow`` (:mod:`pipeline.data.facts`) gives, for each stored
   PNG, its size, pHash, thumbnail and extremes, computed from the very pixels img2dataset
   encoded; a fact is used only for a member whose bytes hash to it and whose header gives its
   size, so the results are the same bits as a decode's. Shards without facts (older downloads,
   a lossy ``encode_format``, a sidecar lost or unreadable) and members rewritten since are
   decoded: the output is byte-identical either way, only slower.
2. global and cheap: exact and near duplicates across the whole dataset, each group keeping its
   best copy (:mod:`pipeline.data.dedup`, :mod:`pipeline.data.copies`), then the held-out validation split by a hash of each kept
   sample's URL (:mod:`pipeline.data.split`), then the reshard plan -> ``_filter/plan.parquet``
   (:mod:`pipeline.data.reshard`).
3. per output shard: ``000000.tar``, ``000001.tar``, ... (training) and ``val-000000.tar``, ...
   (validation) with ``samples_per_shard`` samples each (the last one of each split less),
   copied from the raw shards without re-encoding, each member checked against the sha256
   pass 1 read, each shard written atomically; shards already written for the same plan are kept.
``manifest.json`` is written last; a re-run with unchanged input and settings returns it as is.
Every tar is indexed, read and written through :mod:`pipeline.data.shards` (the format's owner).

    from pipeline.data.filters import filter_shards, format_reject_table
    manifest = filter_shards("raw/", "filtered/", workers=2)
    print(format_reject_table(manifest))
    imagen-pipeline filter --input raw/ --output filtered/      # prints the same table

Output folder:
    000000.tar, ...   KEY.png|jpg|webp (as downloaded), KEY.txt (caption, stripped),
                      KEY.json (img2dataset metadata: url, caption, width, ...; "scores" if any)
    val-000000.tar, ...  the validation split, same members (training readers never list them)
    _filter/          per-sample fates and the reshard plan (see above)
    manifest.json     see :func:`filter_shards`
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data import reshard, shards
from pipeline.data import split as splits
from pipeline.data.download import normalize_error, read_refused, reason_stage, shard_failures
from pipeline.data.facts import ImageFacts, read_facts
from pipeline.data.filter_registry import (
    FILTERS,
    CaptionLengthFilter,
    DecodeFilter,
    Filter,
    FilterConfig,
    MaxAspectFilter,
    MaxPixelsFilter,
    MinSideFilter,
    Sample,
    apply_filters,
    build_filters,
    build_scorers,
)
from pipeline.data.images import IMAGE_EXTS
from pipeline.data.raw_rows import read_shard_rows
from pipeline.layout import manifest_of

# Re-exported: callers import the whole filter step from here.
__all__ = ["FILTERS", "CaptionLengthFilter", "DecodeFilter", "Filter", "FilterConfig", "MaxAspectFilter",
           "MaxPixelsFilter", "MinSideFilter", "Sample", "apply_filters", "build_filters", "filter_shards",
           "format_reject_table", "index_raw_shard", "read_located", "read_shard", "sample_fates",
           "stage_config"]

# v3: per-sample stored side, per-stage counts; v4: raw shards verified, dropped_members, duplicate_key;
# v5: member names matched exactly, pass 1 reused by the raw shard's sha256, pass 3 checks members' sha256;
# v6: the validation split (val-NNNNNN.tar, "split", per-stage val counts); v7: a duplicate group keeps
# its best copy (pipeline.data.copies), not its first: an older output is redone, never reused as is
MANIFEST_FORMAT = "imagen-pipeline/filtered-shards/v7"
# Pass 1's own results are unchanged since v5: an upgrade reuses them rather than re-decoding everything.
PASS1_FORMAT = "imagen-pipeline/filtered-shards/v5"
WORK = "_filter"
PLAN = "plan.parquet"
# Config fields that only the global pass uses: changing them does not redo pass 1.
GLOBAL_FIELDS = ("dedup", "near_dedup", "near_dup_distance", "near_dup_color_tolerance", "stage_sides",
                 "val_fraction", "val_max")
WORK_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("reason", pa.string()),
                         ("sha256", pa.binary()), ("phash", pa.uint64()), ("thumb", pa.binary()),
                         ("scores", pa.string()), ("members", pa.string()),
                         ("side", pa.int32())])  # the stored image's short side: which stages can use it


def _sample_from(key: str, members: dict[str, bytes], digests: dict[str, bytes] | None = None,
                 facts: dict[bytes, ImageFacts] | None = None) -> Sample:
    """The sample of ``members``; with ``facts`` (:func:`pipeline.data.facts.read_facts`) and the
    members' sha256 ``digests``, the image's facts when its bytes hash to one and its header
    gives that fact's size (anything else is decoded, as without facts)."""
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    meta = {}
    if "json" in members:
        with contextlib.suppress(ValueError):
            meta = json.loads(members["json"])
    caption = members.get("txt", b"").decode("utf-8", errors="replace")
    sample = Sample(key=key, caption=caption, image_bytes=members.get(ext) if ext else None, ext=ext, meta=meta)
    fact = facts.get(digests[ext]) if facts and digests and ext else None
    if fact is not None and (sample.width, sample.height) == (fact.width, fact.height):
        sample.facts = fact
    return sample


@dataclasses.dataclass
class RawShard:
    """One raw shard's members, checked against the download's record of it.

    ``groups``: key -> {ext: header} of the first member of each kind (image, txt, json) in tar
    order; ``dropped``: members that are no sample of this download, by reason;
    ``rejected_rows``: key -> (url, reason) of the keys the parquet lists as successes that
    cannot be read as a sample: the name is no plain key (``unsafe_member_name``), or the image
    is there only under another spelling (``unknown_member_extension``); ``sha256``: of the
    whole tar, as read (the key under which pass 1's results are reused).
    """

    uri: str
    groups: dict[str, dict[str, shards.Member]]
    dropped: collections.Counter
    rejected_rows: dict[str, tuple[str | None, str]]
    sha256: str = ""


def _damaged(uri: str, why: str) -> RuntimeError:
    stats = uri[: -len(".tar")] + "_stats.json"
    return RuntimeError(f"raw shard {uri} is damaged: {why}. Delete it and {storage.basename(stats)}, then "
                        "re-run the download step to fetch it again")


def _successes(uri: str) -> dict[str, str | None]:
    """{key: url} of the rows img2dataset recorded as downloaded (status success) for this tar."""
    parquet = uri[: -len(".tar")] + ".parquet"
    try:
        with storage.open(parquet, "rb") as f:
            rows = pq.read_table(f, columns=["key", "url", "status"]).to_pylist()
    except (OSError, KeyError, pa.ArrowException) as err:
        raise _damaged(uri, f"its download record {parquet} cannot be read ({err})") from err
    keys = [r["key"] for r in rows if r["status"] == "success"]
    twice = sorted(str(k) for k, n in collections.Counter(keys).items() if n > 1)
    if twice:
        raise _damaged(uri, f"{parquet} lists keys {twice[:10]} as downloaded more than once")
    return {r["key"]: r["url"] for r in rows if r["status"] == "success"}


def index_raw_shard(uri: str) -> RawShard:
    """Read a raw shard's headers and verify them against its img2dataset parquet.

    Raises (naming the shard, and the keys) when the tar ends early at a corrupt header or
    lacks samples the parquet records as successes: a good sample is never lost in silence.
    Members that are no sample of the download are dropped and counted (``RawShard.dropped``):
    ``unsafe_member_name``, ``not_a_regular_file``, ``unknown_member_extension`` (not exactly
    png, jpg, jpeg, webp, txt or json: ``KEY.PNG`` is one), ``duplicate_key`` (a second member
    of one kind for a key: the first in tar order wins) and ``not_in_download_parquet``.
    The tar is read once, front to back, and hashed on the way (``RawShard.sha256``).
    """
    groups: dict[str, dict[str, shards.Member]] = collections.defaultdict(dict)
    dropped: collections.Counter = collections.Counter()
    misspelt: set[str] = set()  # keys with a member under an unknown extension
    # A stream: every byte goes through the hash once, whatever the storage, in constant memory.
    scan = shards.TarScan(uri)
    try:
        members = list(scan)
    except shards.ShardDamaged as err:
        raise _damaged(uri, f"{err}; the samples behind it would be lost") from err
    for m in members:
        if not shards.is_safe_member(m.name):
            dropped["unsafe_member_name"] += 1
            continue
        if not m.isfile:
            dropped["not_a_regular_file"] += 1
            continue
        if m.ext not in shards.KINDS:
            dropped["unknown_member_extension"] += 1
            misspelt.add(m.key)
            continue
        group = groups[m.key]
        if any(shards.KINDS[e] == shards.KINDS[m.ext] for e in group):
            dropped["duplicate_key"] += 1
            continue
        group[m.ext] = m
    listed = _successes(uri)
    rejected = {k: (u, "unsafe_member_name") for k, u in listed.items() if not shards.is_plain_key(k)}
    for key in sorted(misspelt & listed.keys()):
        if not any(shards.KINDS[e] == "image" for e in groups.get(key, {})):
            # Its image is there only under another spelling: a counted reject, not a damaged shard.
            groups.pop(key, None)
            rejected[key] = (listed[key], "unknown_member_extension")
    missing = sorted(str(k) for k in listed if k not in groups and k not in rejected)
    if missing:
        raise _damaged(uri, f"{len(missing)} sample(s) the download recorded as successes are not in the tar "
                            f"(keys {missing[:10]}{' ...' if len(missing) > 10 else ''})")
    for key in [k for k in groups if k not in listed]:
        dropped["not_in_download_parquet"] += len(groups.pop(key))
    if dropped:
        print(f"warning: raw shard {uri}: dropped {sum(dropped.values())} tar member(s) that are no sample "
              f"of this download: {dict(sorted(dropped.items()))}", flush=True)
    return RawShard(uri, dict(groups), dropped, rejected, scan.sha256)


def read_shard(uri: str, keys: set[str] | None = None, locations: dict[str, dict[str, list]] | None = None,
               shard: RawShard | None = None, facts: dict[bytes, ImageFacts] | None = None) -> Iterator[Sample]:
    """Samples of one raw shard in key order (only ``keys``, when given), verified by
    :func:`index_raw_shard` (or taken from ``shard``, its result).

    img2dataset writes samples in the order its download threads finish; reading them in key
    order (= URL-list order) makes the output, and which duplicate is kept, independent of
    download timing. The index streams the tar once up front (headers and hash); member data
    is then read, and held, one sample at a time.
    ``locations`` (if given) receives ``{key: {ext: [offset, size, sha256 hex]}}`` of the bytes
    read, for :func:`read_located`. ``facts`` (the shard's :func:`pipeline.data.facts.read_facts`)
    are attached to the samples whose image bytes they describe (:func:`_sample_from`).
    """
    groups = (shard or index_raw_shard(uri)).groups
    with storage.open(uri, "rb") as f:
        for key in sorted(groups if keys is None else keys & groups.keys()):
            members = {}
            for ext, m in groups[key].items():
                f.seek(m.offset)  # just indexed: the data is read as is, hashed below
                members[ext] = f.read(m.size)
            digests = {ext: hashlib.sha256(data).digest() for ext, data in members.items()}
            if locations is not None:
                locations[key] = {ext: [m.offset, m.size, digests[ext].hex()] for ext, m in groups[key].items()}
            yield _sample_from(key, members, digests, facts)


def read_located(uri: str, located: list[tuple[str, dict[str, list]]]) -> Iterator[Sample]:
    """Samples at known tar offsets (from :func:`read_shard`'s ``locations``), in the given order.

    Seeks straight to the member data (:func:`pipeline.data.shards.read_at`): no tar is indexed
    a second time, which is most of the cost of reading a shard of small images. Each member's
    name (exactly, in its own header), size and sha256 are checked against what pass 1 read and
    filtered, so a shard rewritten since, even in place at the same size, fails instead of giving
    other bytes.
    """
    with storage.open(uri, "rb") as f:
        for key, members in located:
            data = {}
            for ext, (offset, size, sha256) in members.items():
                name = shards.member_name(key, ext)
                data[ext] = shards.read_at(f, offset, name, size)
                if data[ext] is None or len(data[ext]) != size:
                    why = "is not where it was"
                elif hashlib.sha256(data[ext]).hexdigest() != sha256:
                    why = "has other bytes than the ones filtered"
                else:
                    continue
                raise RawShardChanged(f"raw shard {uri} changed since it was filtered (member {name} {why}); "
                                      "run the filter step again: it filters the shard anew")
            yield _sample_from(key, data)


class RawShardChanged(RuntimeError):
    """A raw shard differs from its pass-1 index; the filter step redoes it on the next run."""


# --- pass 1: per raw shard ------------------------------------------------------------------

def _pass1_settings(config: FilterConfig) -> str:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in GLOBAL_FIELDS}
    return json.dumps({"format": PASS1_FORMAT, **fields}, sort_keys=True, default=list)


def _score(gates, candidates: list[Sample], reasons: dict[str, str | None], scores: dict[str, dict]) -> None:
    """Run each scorer over the samples still kept, in batches; record scores and rejects."""
    for gate in gates:
        batch = [s for s in candidates if reasons[s.key] is None]
        for sample, value in zip(batch, gate.scorer.score(batch), strict=True):
            scores[sample.key][gate.name] = round(float(value), 6)
            reasons[sample.key] = gate.reason(value)


def filter_raw_shard(raw_uri: str, work_uri: str, config: FilterConfig) -> dict:
    """Pass 1 for one raw shard: write its per-sample fates to ``work_uri``; returns counts."""
    from pipeline.data.dedup import image_signature

    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped filters were already reported once by filter_shards
        filters, _ = build_filters(config)
        gates, _ = build_scorers(config)
    rows, kept_samples, reasons, scores, locations = [], [], {}, {}, {}
    shard = index_raw_shard(raw_uri)
    facts = read_facts(raw_uri)
    for sample in read_shard(raw_uri, locations=locations, shard=shard, facts=facts):
        reasons[sample.key] = apply_filters(filters, sample)
        scores[sample.key] = {}
        rows.append(sample)
        if reasons[sample.key] is None:
            kept_samples.append(sample)
    if gates:
        _score(gates, kept_samples, reasons, scores)
    columns: dict[str, list] = {name: [] for name in WORK_SCHEMA.names}
    for sample in rows:
        sig = (None, None, None)
        if reasons[sample.key] is None and sample.facts is not None:
            sig = (sample.facts.sha256, sample.facts.phash, sample.facts.thumb)  # the bytes hash to it
        elif reasons[sample.key] is None:
            sig = image_signature(sample.image_bytes, sample.image)
        kept = reasons[sample.key] is None
        values = (sample.key, sample.meta.get("url"), reasons[sample.key], *sig,
                  json.dumps(scores[sample.key]) if scores[sample.key] else None,
                  json.dumps(locations[sample.key], sort_keys=True) if kept else None,
                  min(sample.width, sample.height) if kept else None)
        for name, value in zip(WORK_SCHEMA.names, values, strict=True):
            columns[name].append(value)
        sample.__dict__.pop("image", None)  # free decoded pixels as we go
    for key, (url, reason) in sorted(shard.rejected_rows.items(), key=lambda kv: str(kv[0])):
        # A listed row with no readable sample (see RawShard.rejected_rows): counted, with its reason.
        for name, value in zip(WORK_SCHEMA.names, (str(key), url, reason), strict=False):
            columns[name].append(value)
        for name in WORK_SCHEMA.names[3:]:
            columns[name].append(None)
    # raw_sha256 is the hash of the bytes indexed (RawShard.sha256): pass 1's result is reused
    # only for a raw shard with exactly these bytes (_pass1_done).
    meta = {b"settings": _pass1_settings(config).encode(), b"raw_size": str(storage.size(raw_uri)).encode(),
            b"raw_sha256": shard.sha256.encode(),
            b"dropped_members": json.dumps(dict(sorted(shard.dropped.items()))).encode()}
    table = pa.table(columns, schema=WORK_SCHEMA.with_metadata(meta))
    with storage.atomic_write(work_uri) as f:
        pq.write_table(table, f)
    kept = sum(r is None for r in reasons.values())
    return {"shard": storage.basename(raw_uri), "seen": len(rows) + len(shard.rejected_rows), "kept": kept,
            "seconds": time.monotonic() - start}


def _pass1_done(raw_uri: str, work_uri: str, settings: str) -> bool:
    """Whether ``work_uri`` holds pass 1's result for these settings and for the raw shard's
    present bytes: verified by content (its sha256), never by size or name alone."""
    if not storage.exists(work_uri):
        return False
    with storage.open(work_uri, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    if meta.get(b"settings") != settings.encode() or meta.get(b"raw_size") != str(storage.size(raw_uri)).encode():
        return False  # redone anyway: no need to read the shard
    return meta.get(b"raw_sha256") == shards.file_sha256(raw_uri).encode()


def _run_pass1(raw: list[str], work: str, config: FilterConfig, workers: int) -> None:
    import concurrent.futures

    settings = _pass1_settings(config)
    wanted = {_work_uri(work, r) for r in raw}
    for uri in storage.list_files(work, r"\d+\.parquet"):
        if uri not in wanted:
            storage.remove(uri)  # its raw shard is gone
    start = time.monotonic()
    # Hashing reads each raw shard once, in 1 MiB chunks; hashlib and the reads release the GIL,
    # so threads suffice to check `workers` shards at a time.
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        done = list(pool.map(lambda r: _pass1_done(r, _work_uri(work, r), settings), raw))
    todo = [r for r, ok in zip(raw, done, strict=True) if not ok]
    print(f"filter: {len(raw) - len(todo)} of {len(raw)} raw shards already filtered (checked by sha256 in "
          f"{time.monotonic() - start:.1f} s), {len(todo)} to go", flush=True)

    def report(result: dict) -> None:
        print(f"filter {result['shard']}: kept {result['kept']}/{result['seen']} ({result['seconds']:.1f} s)",
              flush=True)

    if workers <= 1 or len(todo) <= 1:
        for r in todo:
            report(filter_raw_shard(r, _work_uri(work, r), config))
        return
    import multiprocessing

    # spawn: no fork of a process that may hold threads (Airflow, a loaded model).
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(filter_raw_shard, r, _work_uri(work, r), config) for r in todo]
        for future in concurrent.futures.as_completed(futures):
            report(future.result())


def _work_uri(work: str, raw_uri: str) -> str:
    return storage.join(work, storage.basename(raw_uri)[: -len(".tar")] + ".parquet")


# --- pass 3: write the output shards ----------------------------------------------------------

def _plan_id(uri: str) -> bytes | None:
    if not storage.exists(uri):
        return None
    with storage.open(uri, "rb") as f:
        return (pq.read_schema(f).metadata or {}).get(b"plan_id")


def _write_outputs(input: str, output: str, plan: pa.Table) -> None:
    """Write every output shard of ``plan`` that is not already there from this same plan."""
    plan_uri = storage.join(output, WORK, PLAN)
    for uri in storage.list_files(output, r"\..*\.tmp-[0-9a-f]+"):
        storage.remove(uri)  # temporary files of a killed run
    pattern = splits.shard_pattern(None)  # both splits' shards
    if _plan_id(plan_uri) != plan.schema.metadata[b"plan_id"]:
        # Shards from another plan must go before the new plan is recorded: after a crash
        # here the recorded plan still differs, and the next run clears again.
        for uri in storage.list_files(output, pattern):
            storage.remove(uri)
        with storage.atomic_write(plan_uri) as f:
            pq.write_table(plan, f)
    rows = [r for r in plan.select(["raw", "key", "split", "shard", "scores", "members"]).to_pylist()
            if r["shard"]]
    todo = {r["shard"] for r in rows} - {storage.basename(u) for u in storage.list_files(output, pattern)}
    needed: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:  # plan order: raw shard, then key
        if r["shard"] in todo:
            needed[r["raw"]].append(r)
    # One writer per split: the plan interleaves the splits, and each writer must meet its
    # shards one after the other (it finishes a shard when the next name comes).
    with contextlib.ExitStack() as stack:
        writers = {name: stack.enter_context(shards.ShardWriter(output)) for name in splits.SPLITS}
        for raw_name, raw_rows in sorted(needed.items()):
            located = [(r["key"], json.loads(r["members"])) for r in raw_rows]
            raw_uri = storage.join(input, raw_name)
            try:
                for sample, row in zip(read_located(raw_uri, located), raw_rows, strict=True):
                    if row["scores"]:
                        sample.meta["scores"] = json.loads(row["scores"])
                    writers[row["split"]].write(sample, row["shard"])
            except RawShardChanged:
                storage.remove(_work_uri(storage.join(output, WORK), raw_uri))  # the next run redoes pass 1
                raise


# --- the step ---------------------------------------------------------------------------------

def _raw_shards(input: str) -> list[str]:
    """Finished raw shards; a shard without its _stats.json is still being (or failed being) downloaded."""
    if not storage.exists(input):
        raise FileNotFoundError(f"no download output at {input!r}; run the download step first")
    found = storage.list_shards(input, r"\d+\.tar")
    unfinished = [storage.basename(s) for s in found if not storage.exists(s[: -len(".tar")] + "_stats.json")]
    if unfinished:
        raise RuntimeError(f"raw shards {unfinished} in {input} have no _stats.json: their download did not "
                           "finish; re-run the download step (it resumes) before filtering")
    return found


def _fingerprint(input: str) -> dict[str, int]:
    files = storage.list_files(input, r"(\d+(\.tar|\.parquet|_stats\.json|_source\.jsonl))|refused\.parquet")
    return {storage.basename(f): storage.size(f) for f in files}


def _up_to_date(output: str, settings: dict) -> dict | None:
    uri = manifest_of(output)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    if manifest.get("format") != MANIFEST_FORMAT or any(manifest.get(k) != v for k, v in settings.items()):
        return None
    if not all(storage.exists(storage.join(output, name)) for name in manifest.get("shards", {})):
        return None
    return manifest


def _download_rejects(input: str, raw: list[str]) -> tuple[int, collections.Counter, collections.Counter]:
    """Rows of the URL list, download failures by reason, and refusals (pre-screen and in-fetch) by reason."""
    refused = read_refused(input)
    rows, download = sum(refused.values()), collections.Counter()
    for tar_uri in raw:
        n, failures = shard_failures(tar_uri[: -len(".tar")] + ".parquet")
        rows += n
        for (stage, reason), count in failures.items():
            (refused if stage == "refused" else download)[reason] += count
    return rows, download, refused


def _skipped(config: FilterConfig) -> tuple[list[str], dict[str, str]]:
    """Names of the filters and scorers that run, and ``{name: why}`` for those skipped (no model loads)."""
    filters, skipped = build_filters(config)
    without_weights = {k: v for k, v in config.scorers.items() if not v.get("weights")}
    skipped.update(build_scorers(dataclasses.replace(config, scorers=without_weights))[1])
    names = [f.name for f in filters] + [f"score:{k}" for k in sorted(config.scorers) if k not in without_weights]
    return names, skipped


def filter_shards(input: str, output: str, config: FilterConfig | None = None,
                  samples_per_shard: int = 1000, workers: int = 1) -> dict:
    """Filter the raw img2dataset shards in ``input`` into clean shards in ``output``.

    Returns the manifest (also written to ``output/manifest.json``, last)::

        {"format": "imagen-pipeline/filtered-shards/v7", "input": ..., "output": ...,
         "input_fingerprint": {"00000.tar": size, ...}, "config": {FilterConfig fields},
         "samples_per_shard": 1000, "filters": [names run], "skipped_filters": {name: why},
         "shards": {"000000.tar": kept_in_shard, ..., "val-000000.tar": kept_in_shard, ...},
         "input_rows": N, "kept": k, "rejected": N - k,         # k: both splits
         "split": {"val_fraction": 0.05, "val_max": 10000, "by": "url",   # pipeline.data.split
                   "train": k - v, "val": v, "keyed_without_url": 0},
         "rejects": {"refused": {"loopback_address": r, ...},   # never contacted
                     "download": {"http_404": d, ...},         # img2dataset and fetch failures
                     "filter": {"caption_too_short": f, ...}},  # this step, dedup included
         "dropped_members": {"unsafe_member_name": m, ...},   # tar members that are no row
                                                              # (see index_raw_shard)
         "stages": {"sr1024": {"min_side": 1024,                  # per config.stage_sides: what
                               "samples": s, "excluded": {"too_small_for_sr1024": k - v - s},
                               "val_samples": w,                 # each stage trains (validates) on
                               "val_excluded": {"too_small_for_sr1024": v - w}}, ...},
         "dedup": {"keep": ["native_short_side", "lossless_source", "url_order"],  # pipeline.data.copies
                   "kept_a_later_copy": g, "no_source_record": n}}

    ``input_rows`` counts every row of the URL list, so ``kept + rejected == input_rows``. The
    validation split (``val-NNNNNN.tar``) is drawn after dedup by a hash of each kept sample's
    URL (its key when it has none; counted in ``keyed_without_url``): see
    :func:`pipeline.data.split.assign` for why it is stable across reruns and longer URL lists.
    Each raw shard is verified against its img2dataset parquet first (:func:`index_raw_shard`):
    a tar that ends early at a corrupt header, or lacks a sample recorded as downloaded, stops
    the step with an error naming the shard and keys. Of several samples with one key, the first
    in dataset order that passes the filters is kept (``duplicate_key`` counts the others).

    A rerun with the same settings, input names and sizes, and every output shard in place
    returns the manifest as is, reading no shard (the output stays what pass 1 made of the
    bytes it hashed). Any other run hashes every raw shard and reuses pass 1 only for the same
    bytes; pass 3 copies a member only if its sha256 is still the one pass 1 filtered.
    """
    config = config or FilterConfig()
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: use >= 1")
    raw = _raw_shards(input)
    settings = json.loads(json.dumps({"config": dataclasses.asdict(config), "samples_per_shard": samples_per_shard,
                                      "input_fingerprint": _fingerprint(input)}))
    existing = _up_to_date(output, settings)
    if existing is not None:
        print(f"filter: {output} is up to date ({existing['kept']} samples); nothing to do", flush=True)
        return existing
    names, skipped = _skipped(config)
    storage.makedirs(output)
    storage.remove(manifest_of(output))  # first: a crash from here on never looks finished
    work = storage.join(output, WORK)
    _run_pass1(raw, work, config, workers)
    plan, filter_rejects, dropped = reshard.plan([(storage.basename(r), _work_uri(work, r)) for r in raw],
                                                 config, samples_per_shard, input=input)
    _write_outputs(input, output, plan)
    written = dict(sorted(collections.Counter(s for s in plan["shard"].to_pylist() if s).items()))
    rows, download_rejects, refused = _download_rejects(input, raw)
    rejects = {"refused": dict(sorted(refused.items())), "download": dict(sorted(download_rejects.items())),
               "filter": dict(sorted(filter_rejects.items()))}
    kept = sum(written.values())
    manifest = {"format": MANIFEST_FORMAT, "input": input, "output": output, **settings, "filters": names,
                "skipped_filters": skipped, "shards": written, "input_rows": rows, "kept": kept,
                "rejected": sum(sum(r.values()) for r in rejects.values()), "rejects": rejects,
                "dropped_members": dict(sorted(dropped.items())), "split": reshard.split_counts(plan, config),
                "stages": reshard.stage_counts(plan, config.stage_sides), "dedup": reshard.dedup_counts(plan)}
    if kept + manifest["rejected"] != rows:
        # A raw tar and its parquet disagree (e.g. a tar rewritten by hand): say so, keep going.
        print(f"warning: kept {kept} + rejected {manifest['rejected']} != {rows} rows listed in the "
              f"parquet files of {input}", flush=True)
    storage.write_json(manifest_of(output), manifest)
    return manifest


def stage_config(presets: dict[str, str], stages=None, **overrides) -> FilterConfig:
    """The filter settings for data that serves ``stages`` (each at its preset's sizes): the
    smallest stage's side is the size floor, and every stage's too-small samples are counted."""
    from imagen.config import stage_specs
    from pipeline.data.download import stage_policy

    policy = stage_policy(stage_specs(presets, stages))
    return FilterConfig(**{"min_side": policy["min_side"], "stage_sides": policy["stage_sides"], **overrides})


def format_reject_table(manifest: dict) -> str:
    """A plain-text table of rejects by stage and reason, then kept and total rows."""
    lines = [f"{'stage':<10} {'reason':<32} {'count':>8}"]
    for stage, reasons in manifest["rejects"].items():
        for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"{stage:<10} {reason:<32} {count:>8}")
    total = max(manifest["input_rows"], 1)
    lines.append(f"{'rejected':<43} {manifest['rejected']:>8}  ({manifest['rejected'] / total:.1%})")
    lines.append(f"{'kept':<43} {manifest['kept']:>8}  ({manifest['kept'] / total:.1%})")
    lines.append(f"{'input rows':<43} {manifest['input_rows']:>8}")
    for reason, n in manifest.get("dropped_members", {}).items():
        lines.append(f"{'dropped':<10} {reason:<32} {n:>8}  (tar members that are no URL-list row)")
    if "split" in manifest:
        split = manifest["split"]
        lines.append(f"{'training split':<43} {split['train']:>8}")
        lines.append(f"{'validation split':<43} {split['val']:>8}  (held out by URL hash: fraction "
                     f"{split['val_fraction']}, at most {split['val_max']})")
    for stage, counts in manifest.get("stages", {}).items():
        for reason, n in counts["excluded"].items():
            lines.append(f"{stage:<10} {reason:<32} {n:>8}  (kept, used by the other stages)")
        lines.append(f"{stage:<10} {'samples for this stage':<32} {counts['samples']:>8}")
        if "val_samples" in counts:
            lines.append(f"{stage:<10} {'validation samples':<32} {counts['val_samples']:>8}")
    for name, why in manifest.get("skipped_filters", {}).items():
        lines.append(f"skipped filter {name}: {why}")
    if "output" in manifest:
        lines.append(f"per-sample reasons: {storage.join(manifest['output'], WORK)}/ (README: Reject table)")
    return "\n".join(lines)


def sample_fates(input: str, output: str) -> pa.Table:
    """What became of every URL-list row: ``url, key, stage, reason, shard`` (one row each).

    ``stage`` is "refused", "download", "filter" or "kept" (then ``shard`` names the output
    shard, ``val-NNNNNN.tar`` for the validation split, and ``reason`` is null). Reads the download and filter outputs; writes nothing.
    """
    fates: list[dict] = []
    refused = storage.join(input, "refused.parquet")
    if storage.exists(refused):
        with storage.open(refused, "rb") as f:
            for r in pq.read_table(f, columns=["url", "reason"]).to_pylist():
                fates.append({"url": r["url"], "key": None, "stage": "refused", "reason": r["reason"], "shard": None})
    with storage.open(storage.join(output, WORK, PLAN), "rb") as f:
        plan = {(r["raw"], r["key"]): r
                for r in pq.read_table(f, columns=["raw", "key", "shard", "reason"]).to_pylist()}
    for tar_uri in _raw_shards(input):
        # a row the retry pass superseded is no URL-list row: its recovered sample's row is
        rows = read_shard_rows(tar_uri[: -len(".tar")] + ".parquet", ["url", "key", "status", "error_message"])
        with storage.open(_work_uri(storage.join(output, WORK), tar_uri), "rb") as f:
            filtered = {r["key"]: r["reason"] for r in pq.read_table(f, columns=["key", "reason"]).to_pylist()}
        raw_name = storage.basename(tar_uri)
        for r in rows:
            fate = {"url": r["url"], "key": r["key"], "stage": "kept", "reason": None, "shard": None}
            planned = plan.get((raw_name, r["key"]), {})
            if r["status"] != "success":
                reason = normalize_error(r["error_message"])
                fate.update(stage=reason_stage(reason), reason=reason)
            elif filtered.get(r["key"]) is not None:
                fate.update(stage="filter", reason=filtered[r["key"]])
            elif planned.get("reason") is not None:
                fate.update(stage="filter", reason=planned["reason"])
            else:
                fate["shard"] = planned["shard"]
            fates.append(fate)
    return pa.Table.from_pylist(fates, schema=pa.schema([(k, pa.string()) for k in
                                                         ("url", "key", "stage", "reason", "shard")]))
