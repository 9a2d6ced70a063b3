"""Filter downloaded img2dataset shards into evenly sized clean shards, counting every reject.

Three passes, each restartable, so a run killed at any point and started again redoes little
and ends with the same bytes:

1. per raw shard (``workers`` processes in parallel): the per-sample filters of
   :mod:`pipeline.filter_registry` (cheapest first), configured model scorers, and each kept
   sample's dedup signature -> ``_filter/NNNNN.parquet``, one row per sample (key, url, reject
   reason, sha256, pHash, thumbnail, scores). Written atomically, it is the shard's completion
   marker; it is redone only when its raw shard or the per-sample settings change.
2. global and cheap: exact and near duplicates across the whole dataset in URL-list order
   (:mod:`pipeline.dedup`), then the reshard plan -> ``_filter/plan.parquet``.
3. per output shard: ``000000.tar``, ``000001.tar``, ... with ``samples_per_shard`` samples each
   (the last one less), copied from the raw shards without re-encoding, each written atomically;
   shards already written for the same plan are kept.
``manifest.json`` is written last; a re-run with unchanged input and settings returns it as is.

    from pipeline.filters import filter_shards, format_reject_table
    manifest = filter_shards("raw/", "filtered/", workers=2)
    print(format_reject_table(manifest))
    imagen-pipeline filter --input raw/ --output filtered/      # prints the same table

Output folder:
    000000.tar, ...   KEY.png|jpg|webp (as downloaded), KEY.txt (caption, stripped),
                      KEY.json (img2dataset metadata: url, caption, width, ...; "scores" if any)
    _filter/          per-sample fates and the reshard plan (see above)
    manifest.json     see :func:`filter_shards`
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import tarfile
import time
import warnings
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.download import normalize_error, read_refused, reason_stage, shard_failures
from pipeline.filter_registry import (
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

# Re-exported: callers import the whole filter step from here.
__all__ = ["FILTERS", "CaptionLengthFilter", "DecodeFilter", "Filter", "FilterConfig", "MaxAspectFilter",
           "MaxPixelsFilter", "MinSideFilter", "Sample", "apply_filters", "build_filters", "filter_shards",
           "format_reject_table", "read_located", "read_shard", "sample_fates", "stage_config"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "imagen-pipeline/filtered-shards/v3"  # v3: per-sample stored side, per-stage counts
WORK = "_filter"
PLAN = "plan.parquet"
# Config fields that only the global pass uses: changing them does not redo pass 1.
GLOBAL_FIELDS = ("dedup", "near_dedup", "near_dup_distance", "near_dup_color_tolerance", "stage_sides")
WORK_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("reason", pa.string()),
                         ("sha256", pa.binary()), ("phash", pa.uint64()), ("thumb", pa.binary()),
                         ("scores", pa.string()), ("members", pa.string()),
                         ("side", pa.int32())])  # the stored image's short side: which stages can use it


def _split_key(name: str) -> tuple[str, str]:
    # webdataset's rule: the key is everything before the first dot of the file name.
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _sample_from(key: str, members: dict[str, bytes]) -> Sample:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    meta = {}
    if "json" in members:
        with contextlib.suppress(ValueError):
            meta = json.loads(members["json"])
    caption = members.get("txt", b"").decode("utf-8", errors="replace")
    return Sample(key=key, caption=caption, image_bytes=members.get(ext) if ext else None, ext=ext, meta=meta)


def read_shard(uri: str, keys: set[str] | None = None,
               locations: dict[str, dict[str, list[int]]] | None = None) -> Iterator[Sample]:
    """Samples of one webdataset tar in key order (only ``keys``, when given).

    img2dataset writes samples in the order its download threads finish; reading them in key
    order (= URL-list order) makes the output, and which duplicate is kept, independent of
    download timing. Only member headers are read up front; data is read one sample at a time.
    ``locations`` (if given) receives ``{key: {ext: [offset, size]}}`` for :func:`read_located`.
    """
    with storage.open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        groups: dict[str, dict[str, tarfile.TarInfo]] = collections.defaultdict(dict)
        try:
            infos = tar.getmembers()
        except tarfile.TarError as err:
            raise RuntimeError(f"raw shard {uri} is not a readable tar ({err}); delete it and its "
                               "_stats.json, then re-run the download step to fetch it again") from err
        for info in infos:
            if info.isfile():
                key, ext = _split_key(info.name)
                groups[key][ext] = info
        for key in sorted(groups if keys is None else keys & groups.keys()):
            if locations is not None:
                locations[key] = {ext: [info.offset_data, info.size] for ext, info in groups[key].items()}
            members = {ext: tar.extractfile(info).read() for ext, info in groups[key].items()}
            yield _sample_from(key, members)


def read_located(uri: str, located: list[tuple[str, dict[str, list[int]]]]) -> Iterator[Sample]:
    """Samples at known tar offsets (from :func:`read_shard`'s ``locations``), in the given order.

    Seeks straight to the member data: no tar header is parsed a second time, which is most of
    the cost of reading a shard of small images.
    """
    with storage.open(uri, "rb") as f:
        for key, members in located:
            data = {}
            for ext, (offset, size) in members.items():
                f.seek(offset)
                data[ext] = f.read(size)
                if len(data[ext]) != size:
                    raise RuntimeError(f"raw shard {uri} changed while filtering (member {key}.{ext} is cut); "
                                       "run the filter step again")
            yield _sample_from(key, data)


# --- pass 1: per raw shard ------------------------------------------------------------------

def _pass1_settings(config: FilterConfig) -> str:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in GLOBAL_FIELDS}
    return json.dumps({"format": MANIFEST_FORMAT, **fields}, sort_keys=True, default=list)


def _score(gates, candidates: list[Sample], reasons: dict[str, str | None], scores: dict[str, dict]) -> None:
    """Run each scorer over the samples still kept, in batches; record scores and rejects."""
    for gate in gates:
        batch = [s for s in candidates if reasons[s.key] is None]
        for sample, value in zip(batch, gate.scorer.score(batch), strict=True):
            scores[sample.key][gate.name] = round(float(value), 6)
            reasons[sample.key] = gate.reason(value)


def filter_raw_shard(raw_uri: str, work_uri: str, config: FilterConfig) -> dict:
    """Pass 1 for one raw shard: write its per-sample fates to ``work_uri``; returns counts."""
    from pipeline.dedup import image_signature

    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped filters were already reported once by filter_shards
        filters, _ = build_filters(config)
        gates, _ = build_scorers(config)
    rows, kept_samples, reasons, scores, locations = [], [], {}, {}, {}
    for sample in read_shard(raw_uri, locations=locations):
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
        if reasons[sample.key] is None:
            sig = image_signature(sample.image_bytes, sample.image)
        kept = reasons[sample.key] is None
        values = (sample.key, sample.meta.get("url"), reasons[sample.key], *sig,
                  json.dumps(scores[sample.key]) if scores[sample.key] else None,
                  json.dumps(locations[sample.key], sort_keys=True) if kept else None,
                  min(sample.width, sample.height) if kept else None)
        for name, value in zip(WORK_SCHEMA.names, values, strict=True):
            columns[name].append(value)
        sample.__dict__.pop("image", None)  # free decoded pixels as we go
    meta = {b"settings": _pass1_settings(config).encode(), b"raw_size": str(storage.size(raw_uri)).encode()}
    table = pa.table(columns, schema=WORK_SCHEMA.with_metadata(meta))
    with storage.atomic_write(work_uri) as f:
        pq.write_table(table, f)
    kept = sum(r is None for r in reasons.values())
    return {"shard": storage.basename(raw_uri), "seen": len(rows), "kept": kept, "seconds": time.monotonic() - start}


def _pass1_done(raw_uri: str, work_uri: str, settings: str) -> bool:
    if not storage.exists(work_uri):
        return False
    with storage.open(work_uri, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    return meta.get(b"settings") == settings.encode() and meta.get(b"raw_size") == str(storage.size(raw_uri)).encode()


def _run_pass1(raw: list[str], work: str, config: FilterConfig, workers: int) -> None:
    settings = _pass1_settings(config)
    wanted = {_work_uri(work, r) for r in raw}
    for uri in storage.list_files(work, r"\d+\.parquet"):
        if uri not in wanted:
            storage.remove(uri)  # its raw shard is gone
    todo = [r for r in raw if not _pass1_done(r, _work_uri(work, r), settings)]
    print(f"filter: {len(raw) - len(todo)} of {len(raw)} raw shards already filtered, {len(todo)} to go", flush=True)

    def report(result: dict) -> None:
        print(f"filter {result['shard']}: kept {result['kept']}/{result['seen']} ({result['seconds']:.1f} s)",
              flush=True)

    if workers <= 1 or len(todo) <= 1:
        for r in todo:
            report(filter_raw_shard(r, _work_uri(work, r), config))
        return
    import concurrent.futures
    import multiprocessing

    # spawn: no fork of a process that may hold threads (Airflow, a loaded model).
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(filter_raw_shard, r, _work_uri(work, r), config) for r in todo]
        for future in concurrent.futures.as_completed(futures):
            report(future.result())


def _work_uri(work: str, raw_uri: str) -> str:
    return storage.join(work, storage.basename(raw_uri)[: -len(".tar")] + ".parquet")


# --- pass 2: global dedup and the reshard plan -----------------------------------------------

def _plan(raw: list[str], work: str, config: FilterConfig, samples_per_shard: int) -> tuple[pa.Table, collections.Counter]:
    """The plan: one row per sample that passed pass 1, in dataset order, with its output shard
    (or its duplicate reason and original); also the rejects of pass 1 and 2 by reason."""
    from pipeline.dedup import find_duplicates

    rejects: collections.Counter = collections.Counter()
    cols: dict[str, list] = {"raw": [], "key": [], "sha256": [], "phash": [], "thumb": [], "scores": [],
                             "members": [], "side": []}
    for r in raw:
        with storage.open(_work_uri(work, r), "rb") as f:
            table = pq.read_table(f)
        rejects.update(x for x in table["reason"].to_pylist() if x is not None)
        table = table.filter(table["reason"].is_null())
        cols["raw"] += [storage.basename(r)] * table.num_rows
        for name in ("key", "sha256", "phash", "thumb", "scores", "members", "side"):
            cols[name] += table[name].to_pylist()
    dups = {}
    if config.dedup or config.near_dedup:
        found = find_duplicates(zip(cols["key"], cols["sha256"], cols["phash"], cols["thumb"], strict=True),
                                exact=config.dedup, near=config.near_dedup, max_distance=config.near_dup_distance,
                                color_tolerance=config.near_dup_color_tolerance)
        dups = {key: (reason, original) for key, reason, original in found}
    rejects.update(reason for reason, _ in dups.values())
    shard, n_kept = [], 0
    for key in cols["key"]:
        shard.append(None if key in dups else f"{n_kept // samples_per_shard:06d}.tar")
        n_kept += key not in dups
    plan = pa.table({"raw": cols["raw"], "key": cols["key"], "shard": pa.array(shard, pa.string()),
                     "reason": pa.array([dups.get(k, (None,))[0] for k in cols["key"]], pa.string()),
                     "duplicate_of": pa.array([dups.get(k, (None, None))[1] for k in cols["key"]], pa.string()),
                     "scores": pa.array(cols["scores"], pa.string()),
                     "members": pa.array(cols["members"], pa.string()),
                     "side": pa.array(cols["side"], pa.int32())})
    digest = hashlib.sha256(json.dumps([plan[c].to_pylist() for c in ("raw", "key", "shard", "scores")]).encode())
    return plan.replace_schema_metadata({b"plan_id": digest.hexdigest().encode()}), rejects


# --- pass 3: write the output shards ----------------------------------------------------------

def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed mtime/owner so the same input always gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Streams samples into named output shards, each written atomically (temp name, then rename)."""

    def __init__(self, output: str):
        self.output = output
        self._name: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._tar: tarfile.TarFile | None = None

    def write(self, sample: Sample, name: str) -> None:
        if name != self._name:
            self.close()
            self._name, self._stack = name, contextlib.ExitStack()
            f = self._stack.enter_context(storage.atomic_write(storage.join(self.output, name)))
            tar = tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by the stack
            self._tar = self._stack.enter_context(tar)
        _add_member(self._tar, f"{sample.key}.{sample.ext}", sample.image_bytes)
        _add_member(self._tar, f"{sample.key}.txt", sample.caption.strip().encode("utf-8"))
        _add_member(self._tar, f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True).encode("utf-8"))

    def close(self) -> None:
        """Finish the open shard: close the tar, then rename it into place."""
        if self._stack is not None:
            self._stack.close()
            print(f"filter: wrote {storage.join(self.output, self._name)}", flush=True)
        self._stack, self._tar, self._name = None, None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._stack is not None:
            # Hand the error to atomic_write, which deletes the half-written temporary shard.
            self._stack.__exit__(*exc)
            self._stack, self._tar, self._name = None, None, None


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
    if _plan_id(plan_uri) != plan.schema.metadata[b"plan_id"]:
        # Shards from another plan must go before the new plan is recorded: after a crash
        # here the recorded plan still differs, and the next run clears again.
        for uri in storage.list_files(output, r"\d{6}\.tar"):
            storage.remove(uri)
        with storage.atomic_write(plan_uri) as f:
            pq.write_table(plan, f)
    rows = [r for r in plan.select(["raw", "key", "shard", "scores", "members"]).to_pylist() if r["shard"]]
    todo = {r["shard"] for r in rows} - {storage.basename(u) for u in storage.list_files(output, r"\d{6}\.tar")}
    needed: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:  # plan order: raw shard, then key
        if r["shard"] in todo:
            needed[r["raw"]].append(r)
    with ShardWriter(output) as writer:
        for raw_name, raw_rows in sorted(needed.items()):
            located = [(r["key"], json.loads(r["members"])) for r in raw_rows]
            for sample, row in zip(read_located(storage.join(input, raw_name), located), raw_rows, strict=True):
                if row["scores"]:
                    sample.meta["scores"] = json.loads(row["scores"])
                writer.write(sample, row["shard"])


# --- the step ---------------------------------------------------------------------------------

def _raw_shards(input: str) -> list[str]:
    """Finished raw shards; a shard without its _stats.json is still being (or failed being) downloaded."""
    if not storage.exists(input):
        raise FileNotFoundError(f"no download output at {input!r}; run the download step first")
    shards = storage.list_shards(input, r"\d+\.tar")
    unfinished = [storage.basename(s) for s in shards if not storage.exists(s[: -len(".tar")] + "_stats.json")]
    if unfinished:
        raise RuntimeError(f"raw shards {unfinished} in {input} have no _stats.json: their download did not "
                           "finish; re-run the download step (it resumes) before filtering")
    return shards


def _fingerprint(input: str) -> dict[str, int]:
    files = storage.list_files(input, r"(\d+(\.tar|\.parquet|_stats\.json))|refused\.parquet")
    return {storage.basename(f): storage.size(f) for f in files}


def _up_to_date(output: str, settings: dict) -> dict | None:
    uri = storage.join(output, MANIFEST)
    if not storage.exists(uri):
        return None
    manifest = storage.read_json(uri)
    if any(manifest.get(k) != v for k, v in settings.items()):
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

        {"format": "imagen-pipeline/filtered-shards/v3", "input": ..., "output": ...,
         "input_fingerprint": {"00000.tar": size, ...}, "config": {FilterConfig fields},
         "samples_per_shard": 1000, "filters": [names run], "skipped_filters": {name: why},
         "shards": {"000000.tar": kept_in_shard, ...},
         "input_rows": N, "kept": k, "rejected": N - k,
         "rejects": {"refused": {"loopback_address": r, ...},   # never contacted
                     "download": {"http_404": d, ...},         # img2dataset and fetch failures
                     "filter": {"caption_too_short": f, ...}},  # this step, dedup included
         "stages": {"sr1024": {"min_side": 1024, "samples": s,   # per config.stage_sides: what
                               "excluded": {"too_small_for_sr1024": k - s}}, ...}}  # each stage uses

    ``input_rows`` counts every row of the URL list, so ``kept + rejected == input_rows``.
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
    storage.remove(storage.join(output, MANIFEST))  # first: a crash from here on never looks finished
    work = storage.join(output, WORK)
    _run_pass1(raw, work, config, workers)
    plan, filter_rejects = _plan(raw, work, config, samples_per_shard)
    _write_outputs(input, output, plan)
    shards = dict(sorted(collections.Counter(s for s in plan["shard"].to_pylist() if s).items()))
    rows, download_rejects, refused = _download_rejects(input, raw)
    rejects = {"refused": dict(sorted(refused.items())), "download": dict(sorted(download_rejects.items())),
               "filter": dict(sorted(filter_rejects.items()))}
    kept = sum(shards.values())
    manifest = {"format": MANIFEST_FORMAT, "input": input, "output": output, **settings, "filters": names,
                "skipped_filters": skipped, "shards": shards, "input_rows": rows, "kept": kept,
                "rejected": sum(sum(r.values()) for r in rejects.values()), "rejects": rejects,
                "stages": stage_counts(plan, config.stage_sides)}
    if kept + manifest["rejected"] != rows:
        # A raw tar and its parquet disagree (e.g. a tar rewritten by hand): say so, keep going.
        print(f"warning: kept {kept} + rejected {manifest['rejected']} != {rows} rows listed in the "
              f"parquet files of {input}", flush=True)
    storage.write_json(storage.join(output, MANIFEST), manifest)
    return manifest


def stage_config(presets: dict[str, str], stages=None, **overrides) -> FilterConfig:
    """The filter settings for data that serves ``stages`` (each at its preset's sizes): the
    smallest stage's side is the size floor, and every stage's too-small samples are counted."""
    from imagen.config import stage_specs
    from pipeline.download import stage_policy

    policy = stage_policy(stage_specs(presets, stages))
    return FilterConfig(**{"min_side": policy["min_side"], "stage_sides": policy["stage_sides"], **overrides})


def stage_counts(plan: pa.Table, stage_sides: dict[str, int]) -> dict[str, dict]:
    """Per cascade stage: the kept samples it can train on (stored short side >= its side) and
    those left out of it alone, as ``{"too_small_for_<stage>": n}``."""
    sides = [s for s, shard in zip(plan["side"].to_pylist(), plan["shard"].to_pylist(), strict=True) if shard]
    out = {}
    for stage, need in stage_sides.items():
        small = sum(s is None or s < need for s in sides)
        out[stage] = {"min_side": need, "samples": len(sides) - small, "excluded": {f"too_small_for_{stage}": small}}
    return out


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
    for stage, counts in manifest.get("stages", {}).items():
        for reason, n in counts["excluded"].items():
            lines.append(f"{stage:<10} {reason:<32} {n:>8}  (kept, used by the other stages)")
        lines.append(f"{stage:<10} {'samples for this stage':<32} {counts['samples']:>8}")
    for name, why in manifest.get("skipped_filters", {}).items():
        lines.append(f"skipped filter {name}: {why}")
    return "\n".join(lines)


def sample_fates(input: str, output: str) -> pa.Table:
    """What became of every URL-list row: ``url, key, stage, reason, shard`` (one row each).

    ``stage`` is "refused", "download", "filter" or "kept" (then ``shard`` names the output
    shard and ``reason`` is null). Reads the download and filter outputs; writes nothing.
    """
    fates: list[dict] = []
    refused = storage.join(input, "refused.parquet")
    if storage.exists(refused):
        with storage.open(refused, "rb") as f:
            for r in pq.read_table(f, columns=["url", "reason"]).to_pylist():
                fates.append({"url": r["url"], "key": None, "stage": "refused", "reason": r["reason"], "shard": None})
    with storage.open(storage.join(output, WORK, PLAN), "rb") as f:
        plan = {r["key"]: r for r in pq.read_table(f, columns=["key", "shard", "reason"]).to_pylist()}
    for tar_uri in _raw_shards(input):
        with storage.open(tar_uri[: -len(".tar")] + ".parquet", "rb") as f:
            rows = pq.read_table(f, columns=["url", "key", "status", "error_message"]).to_pylist()
        with storage.open(_work_uri(storage.join(output, WORK), tar_uri), "rb") as f:
            filtered = {r["key"]: r["reason"] for r in pq.read_table(f, columns=["key", "reason"]).to_pylist()}
        for r in rows:
            fate = {"url": r["url"], "key": r["key"], "stage": "kept", "reason": None, "shard": None}
            if r["status"] != "success":
                reason = normalize_error(r["error_message"])
                fate.update(stage=reason_stage(reason), reason=reason)
            elif filtered.get(r["key"]) is not None:
                fate.update(stage="filter", reason=filtered[r["key"]])
            elif plan[r["key"]]["reason"] is not None:
                fate.update(stage="filter", reason=plan[r["key"]]["reason"])
            else:
                fate["shard"] = plan[r["key"]]["shard"]
            fates.append(fate)
    return pa.Table.from_pylist(fates, schema=pa.schema([(k, pa.string()) for k in
                                                         ("url", "key", "stage", "reason", "shard")]))
