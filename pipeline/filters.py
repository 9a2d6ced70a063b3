"""Filter downloaded img2dataset shards into clean training shards, counting every reject.

A filter is anything with a ``name`` and ``check(sample) -> reason | None`` (None keeps the
sample). Filters are registered by name and built from one :class:`FilterConfig`; they run
cheapest first (caption, then size from the image header, then a full decode, then
exact-duplicate removal by sha256 of the image bytes across the whole dataset).

    from pipeline.filters import filter_shards, format_reject_table
    manifest = filter_shards("raw/", "filtered/")
    print(format_reject_table(manifest))

Output folder:
    000000.tar, 000001.tar, ...   KEY.png|jpg|webp (as downloaded), KEY.txt (caption),
                                  KEY.json (img2dataset metadata: url, caption, width, ...)
    manifest.json                 written last; see :func:`filter_shards`

Dedup spans all shards, so the whole output is one unit of work: a re-run over unchanged
input with the same config returns the existing manifest; anything else rewrites the output.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Protocol

import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "imagen-pipeline/filtered-shards/v1"


@dataclasses.dataclass
class Sample:
    """One downloaded sample; the image is only decoded when a filter asks for it."""

    key: str
    caption: str
    image_bytes: bytes | None
    ext: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    @cached_property
    def _header(self) -> Image.Image | None:
        # Image.open reads only the header: size without decoding pixels.
        if not self.image_bytes:
            return None
        try:
            return Image.open(io.BytesIO(self.image_bytes))
        except Exception:  # noqa: BLE001 - any unreadable header is the decode filter's job
            return None

    @property
    def width(self) -> int | None:
        return self._header.width if self._header else None

    @property
    def height(self) -> int | None:
        return self._header.height if self._header else None

    @property
    def original_size(self) -> tuple[int, int] | None:
        """Size of the image before img2dataset resized it, when the metadata records it."""
        w, h = self.meta.get("original_width"), self.meta.get("original_height")
        return (int(w), int(h)) if w and h else None

    @cached_property
    def image(self) -> Image.Image:
        """The fully decoded image (raises on corrupt data)."""
        img = Image.open(io.BytesIO(self.image_bytes or b""))
        img.load()
        return img

    def sizes(self) -> list[tuple[int, int]]:
        """Every known (width, height): stored, and original when recorded."""
        stored = [(self.width, self.height)] if self._header else []
        return stored + ([self.original_size] if self.original_size else [])


class Filter(Protocol):
    name: str

    def check(self, sample: Sample) -> str | None:
        """None keeps the sample; otherwise the reason it is rejected."""


@dataclasses.dataclass
class FilterConfig:
    """Thresholds for every registered filter (the single source of their defaults)."""

    min_caption_chars: int = 3
    max_caption_chars: int = 512
    min_side: int = 64
    max_aspect: float = 2.0
    max_pixels: int = 64_000_000
    dedup: bool = True


FILTERS: dict[str, Callable[[FilterConfig], Filter | None]] = {}


def register(name: str):
    """Class decorator: add a filter to the registry; registration order is run order."""

    def wrap(cls):
        cls.name = name
        FILTERS[name] = cls.from_config
        return cls

    return wrap


@register("caption_length")
class CaptionLengthFilter:
    def __init__(self, min_chars: int, max_chars: int):
        self.min_chars, self.max_chars = min_chars, max_chars

    @classmethod
    def from_config(cls, config: FilterConfig) -> CaptionLengthFilter:
        return cls(config.min_caption_chars, config.max_caption_chars)

    def check(self, sample: Sample) -> str | None:
        n = len(sample.caption.strip())
        if n < self.min_chars:
            return "caption_too_short"
        return "caption_too_long" if n > self.max_chars else None


@register("min_side")
class MinSideFilter:
    """Rejects small images, also small sources that img2dataset upscaled (they are blurry)."""

    def __init__(self, min_side: int):
        self.min_side = min_side

    @classmethod
    def from_config(cls, config: FilterConfig) -> MinSideFilter:
        return cls(config.min_side)

    def check(self, sample: Sample) -> str | None:
        small = any(min(w, h) < self.min_side for w, h in sample.sizes())
        return "image_too_small" if small else None


@register("max_aspect")
class MaxAspectFilter:
    """Rejects elongated images: a center crop of a 4:1 source drops most of what the caption says."""

    def __init__(self, max_aspect: float):
        self.max_aspect = max_aspect

    @classmethod
    def from_config(cls, config: FilterConfig) -> MaxAspectFilter:
        return cls(config.max_aspect)

    def check(self, sample: Sample) -> str | None:
        bad = any(max(w, h) > self.max_aspect * min(w, h) for w, h in sample.sizes())
        return "aspect_ratio_too_large" if bad else None


@register("max_pixels")
class MaxPixelsFilter:
    """Rejects huge stored images from their header, before a decode could exhaust memory."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels

    @classmethod
    def from_config(cls, config: FilterConfig) -> MaxPixelsFilter:
        return cls(config.max_pixels)

    def check(self, sample: Sample) -> str | None:
        if sample.width is None:
            return None
        return "image_too_large" if sample.width * sample.height > self.max_pixels else None


@register("decode")
class DecodeFilter:
    @classmethod
    def from_config(cls, config: FilterConfig) -> DecodeFilter:
        return cls()

    def check(self, sample: Sample) -> str | None:
        if not sample.image_bytes:
            return "missing_image"
        try:
            sample.image  # noqa: B018 - decoding is the check
        except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
            return "image_decode_error"
        return None


@register("dedup")
class DedupFilter:
    """Exact duplicates by sha256 of the stored bytes; the first occurrence is kept."""

    def __init__(self):
        self.seen: set[bytes] = set()

    @classmethod
    def from_config(cls, config: FilterConfig) -> DedupFilter | None:
        return cls() if config.dedup else None

    def check(self, sample: Sample) -> str | None:
        digest = hashlib.sha256(sample.image_bytes or b"").digest()
        if digest in self.seen:
            return "duplicate_image"
        # Runs last, so a sample that reaches here is kept: remember it.
        self.seen.add(digest)
        return None


def build_filters(config: FilterConfig | None = None) -> list[Filter]:
    """Instantiate every registered filter for ``config``, in run order (disabled ones skipped)."""
    config = config or FilterConfig()
    return [f for f in (make(config) for make in FILTERS.values()) if f is not None]


def apply_filters(filters: list[Filter], sample: Sample) -> str | None:
    """The first reject reason, or None when every filter keeps the sample."""
    for f in filters:
        reason = f.check(sample)
        if reason is not None:
            return reason
    return None


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


def read_shard(uri: str) -> Iterator[Sample]:
    """Samples of one webdataset tar, in key order.

    img2dataset writes samples in the order its download threads finish; reading them in
    key order (= URL-list order) makes the output, and which duplicate is kept, independent
    of download timing. Only member headers are read up front; data is read one sample at a time.
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
        for key in sorted(groups):
            members = {ext: tar.extractfile(info).read() for ext, info in groups[key].items()}
            yield _sample_from(key, members)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed mtime/owner so the same input always gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples into ``000000.tar``, ``000001.tar``, ... each atomically."""

    def __init__(self, output: str, samples_per_shard: int):
        self.output, self.samples_per_shard = output, samples_per_shard
        self.counts: dict[str, int] = {}
        self._name: str | None = None
        self._stack: contextlib.ExitStack | None = None
        self._tar: tarfile.TarFile | None = None

    def write(self, sample: Sample) -> None:
        if self._tar is None or self.counts[self._name] >= self.samples_per_shard:
            self.close()
            self._name = f"{len(self.counts):06d}.tar"
            self.counts[self._name] = 0
            self._stack = contextlib.ExitStack()
            f = self._stack.enter_context(storage.atomic_write(storage.join(self.output, self._name)))
            tar = tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by the stack
            self._tar = self._stack.enter_context(tar)
        _add_member(self._tar, f"{sample.key}.{sample.ext}", sample.image_bytes)
        _add_member(self._tar, f"{sample.key}.txt", sample.caption.strip().encode("utf-8"))
        _add_member(self._tar, f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True).encode("utf-8"))
        self.counts[self._name] += 1

    def close(self) -> None:
        """Finish the open shard: close the tar, then rename it into place."""
        if self._stack is not None:
            self._stack.close()
        self._stack, self._tar = None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._stack is not None:
            # Hand the error to atomic_write, which deletes the half-written temporary shard.
            self._stack.__exit__(*exc)
            self._stack, self._tar = None, None


def normalize_error(message: str | None) -> str:
    """A short, stable reason for an img2dataset error message ("HTTP Error 404: ..." -> "http_404")."""
    text = (message or "unknown").strip()
    lower = text.lower()
    http = re.match(r"http error (\d{3})", lower)
    if http:
        return f"http_{http.group(1)}"
    for needle, reason in (("timed out", "timeout"), ("connection refused", "connection_refused"),
                           ("name or service not known", "dns_error"), ("name resolution", "dns_error"),
                           ("x-robots-tag", "disallowed_by_x_robots_tag")):
        if needle in lower:
            return reason
    # Drop "<urlopen error [Errno 104] ...>" wrappers and numbers that vary per request.
    lower = re.sub(r"urlopen error|\[errno -?\d+\]|\d+", " ", lower)
    return re.sub(r"[^a-z]+", "_", lower).strip("_")[:60] or "unknown"


def _download_rejects(input: str, raw_shards: list[str]) -> tuple[int, collections.Counter, collections.Counter]:
    """Rows img2dataset saw, its failures by reason (from each shard's parquet), and the
    rows the download step refused before img2dataset saw them (refused.parquet)."""
    rows, reasons = 0, collections.Counter()
    for tar_uri in raw_shards:
        parquet = tar_uri[: -len(".tar")] + ".parquet"
        with storage.open(parquet, "rb") as f:
            table = pq.read_table(f, columns=["status", "error_message"])
        rows += table.num_rows
        for status, error in zip(table["status"].to_pylist(), table["error_message"].to_pylist(), strict=True):
            if status != "success":
                reasons[normalize_error(error)] += 1
    refused = storage.join(input, "refused.parquet")
    if storage.exists(refused):
        with storage.open(refused, "rb") as f:
            refused_reasons = pq.read_table(f, columns=["reason"])["reason"].to_pylist()
        return rows, reasons, collections.Counter(refused_reasons)
    return rows, reasons, collections.Counter()


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


def _clear(output: str) -> None:
    """Remove what an earlier run left: the manifest first, so a crash never looks finished."""
    storage.remove(storage.join(output, MANIFEST))
    for uri in storage.list_files(output, r"\d{6}\.tar|\..*\.tmp-[0-9a-f]+"):
        storage.remove(uri)


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


def _filter_all(raw: list[str], writer: ShardWriter, config: FilterConfig) -> collections.Counter:
    """Run the filters over every raw shard in order; returns reject counts by reason."""
    filters = build_filters(config)
    rejects: collections.Counter = collections.Counter()
    for shard in raw:
        kept = seen = 0
        for sample in read_shard(shard):
            seen += 1
            reason = apply_filters(filters, sample)
            if reason is None:
                writer.write(sample)
                kept += 1
            else:
                rejects[reason] += 1
        print(f"filter {storage.basename(shard)}: kept {kept}/{seen}", flush=True)
    return rejects


def filter_shards(input: str, output: str, config: FilterConfig | None = None,
                  samples_per_shard: int = 1000) -> dict:
    """Filter the raw img2dataset shards in ``input`` into clean shards in ``output``.

    Returns the manifest (also written to ``output/manifest.json``, last)::

        {"format": "imagen-pipeline/filtered-shards/v1", "input": ..., "output": ...,
         "input_fingerprint": {"00000.tar": size, "00000.parquet": size, ...},
         "config": {FilterConfig fields}, "samples_per_shard": 1000,
         "shards": {"000000.tar": kept_in_shard, ...},
         "input_rows": N, "kept": k, "rejected": N - k,
         "rejects": {"refused": {"private_address": r},          # download pre-screen
                     "download": {"http_404": d, ...},           # img2dataset failures
                     "filter": {"caption_too_short": f, ...}}}   # this step

    ``input_rows`` counts every row of the URL list, so ``kept + rejected == input_rows``.
    """
    config = config or FilterConfig()
    raw = _raw_shards(input)
    settings = {"config": dataclasses.asdict(config), "samples_per_shard": samples_per_shard,
                "input_fingerprint": _fingerprint(input)}
    existing = _up_to_date(output, settings)
    if existing is not None:
        print(f"filter: {output} is up to date ({existing['kept']} samples); nothing to do", flush=True)
        return existing
    storage.makedirs(output)
    _clear(output)
    rows, download_rejects, refused = _download_rejects(input, raw)
    with ShardWriter(output, samples_per_shard) as writer:
        filter_rejects = _filter_all(raw, writer, config)
    kept = sum(writer.counts.values())
    rejects = {"refused": dict(sorted(refused.items())), "download": dict(sorted(download_rejects.items())),
               "filter": dict(sorted(filter_rejects.items()))}
    manifest = {"format": MANIFEST_FORMAT, "input": input, "output": output, **settings,
                "shards": writer.counts, "input_rows": rows + sum(refused.values()), "kept": kept,
                "rejected": sum(sum(r.values()) for r in rejects.values()), "rejects": rejects}
    if manifest["kept"] + manifest["rejected"] != manifest["input_rows"]:
        # A raw tar and its parquet disagree (e.g. a tar rewritten by hand): say so, keep going.
        print(f"warning: kept {kept} + rejected {manifest['rejected']} != {manifest['input_rows']} rows "
              f"listed in the parquet files of {input}", flush=True)
    storage.write_json(storage.join(output, MANIFEST), manifest)
    return manifest


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
    return "\n".join(lines)
