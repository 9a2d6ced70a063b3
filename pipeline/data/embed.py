"""Precompute frozen T5 caption embeddings for filtered WebDataset shards.

Imagen trains against a frozen text encoder (sec. 2.1), so captions are encoded once,
ahead of training, instead of running T5-XXL in every training step. For each filtered
shard ``INPUT/NNNNNN.tar`` (members ``KEY.png``, ``KEY.txt``, ``KEY.json``), and each shard of
the validation split ``INPUT/val-NNNNNN.tar`` (:mod:`pipeline.data.split`), this writes::

    OUTPUT/<encoder-slug>/NNNNNN.parquet     (val-NNNNNN.parquet for val-NNNNNN.tar)

one row per key (the first image and caption in tar order): its caption's real-token embedding
and where its image lies in the tar, with the image's short side and sha256 (read from the image
here, never from metadata that could lie). The columns, the writer and the readers are
:mod:`pipeline.data.embeddings`, the one owner of that format.

The parquet file is the shard's completion marker: it is written to a temporary name and
renamed, and its schema metadata (``encoder_id``, ``max_length``, ``dtype``, ``dim``, source
shard name, size and sha256, ``code_version``...) decides whether a re-run may skip the
shard: the tar is matched by its content hash, so a shard changed in place is redone. A
worker killed mid-shard leaves at most a hidden ``.NNNNNN.parquet.tmp-*`` file, which the
next run over that shard deletes.

A shard's captions are tokenized once, sorted by token count and cut into length buckets
under a padded-token budget (``max_batch_tokens``, at most ``batch_size`` captions), so a
batch pads only to near its own length; on out-of-memory the budget halves and the batch is
retried. Only the real tokens of each caption are stored, as float16.

Each distinct caption is encoded once (:func:`embed_distinct`): a shard's duplicates are grouped
before tokenizing, and each distinct caption's vectors are kept in a content-addressed cache,
``OUTPUT/caption-cache/`` (:mod:`pipeline.data.caption_cache`), keyed by the caption and the
encoder identity (:func:`encoder_identity`), so other shards, other workers and reruns read them
instead of encoding again. Rows still keep their own key and vectors: the parquet is the same.
The result's ``caption_dedup`` reports the share of encoder work saved
(:func:`~pipeline.data.caption_cache.caption_dedup_saving`); ``caption_cache=False``
(``--no-caption-cache``) keeps the grouping within a shard and drops the cache.

The options and their defaults (encoder, max_length, batch_size, max_batch_tokens, device, dtype,
caption_cache) are the fields of :class:`~pipeline.data.embed_config.EmbedConfig`.

Several GPUs or machines split the shards: ``split_shards(INPUT, N)`` returns N disjoint,
sample-balanced lists, and worker ``i`` runs ``embed_shards(..., shards=lists[i])`` (an
Airflow task mapped over the lists, or one process per GPU). Paths are fsspec URIs::

    imagen-pipeline embed --input INPUT --output OUTPUT --encoder google/t5-v1_1-xxl \\
        [--worker 0 --num-workers 8]
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import logging
import math
import re
import time
from dataclasses import dataclass

import numpy as np

from pipeline import storage
from pipeline.data.caption_cache import CACHE_DIR, CaptionCache, DedupStats
from pipeline.data.embed_config import EmbedConfig
from pipeline.data.embeddings import STORAGE_DTYPE, build_table, read_footer, write_table
from pipeline.data.shards import KINDS, ShardDamaged, TarScan, file_sha256
from pipeline.data.split import shard_pattern
from pipeline.layout import manifest_of

log = logging.getLogger(__name__)

# Bump when the stored values or layout change: shards written by older code are redone.
# v2: image_ext/offset/size columns; v3: image_side; v4: source_sha256, image_sha256, one sample per key
CODE_VERSION = "embed-v4"
# Keys that must match for an existing parquet to count as done; then the source tar's
# size and sha256 must match too (see _is_done).
_MATCH_KEYS = ("encoder_id", "max_length", "dtype", "code_version", "source_shard")
_SHARD = shard_pattern(None)  # both splits: the validation loader needs embeddings too
# A batch takes captions down to this fraction of its longest one: <= 20% of it is padding,
# and web captions (mostly 5-20 tokens) still fill large batches.
BUCKET_RATIO = 0.8


def encoder_identity(enc, name: str) -> dict:
    """The one owner of "which encoder made these vectors": the weights (``encoder_id``: resolved hub
    name and commit, or folder name and content hash), the resolved name or folder, the token limit
    and the compute and storage dtypes. Recorded in every parquet's metadata and hashed into the
    caption cache's keys (:mod:`pipeline.data.caption_cache`); ``name``: used when ``enc`` does
    not say its own."""
    return {
        "encoder_id": enc.encoder_id,
        "encoder_name": getattr(enc, "name_or_path", name),
        "max_length": enc.max_length,
        "dtype": str(getattr(enc, "dtype", "float32")).removeprefix("torch."),
        "storage_dtype": STORAGE_DTYPE,
    }


def encoder_slug(encoder_id: str) -> str:
    """Directory-safe name for an encoder id (``google/t5@abc`` -> ``google-t5-abc``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", encoder_id).strip("-.")


def shard_stem(uri: str) -> str:
    """``.../000003.tar`` or ``000003.parquet`` -> ``000003`` (``val-000003.tar`` -> ``val-000003``)."""
    return storage.basename(uri).split(".", 1)[0]


@dataclass
class TarIndex:
    """What one scan of a shard finds: captions, and where each sample's image lies.

    ``images`` maps a key to ``(ext, data offset, size, short side)`` of its image member,
    so a reader can later ``seek`` straight to it (the training loader's random access); the
    short side in pixels is -1 when the scan did not read the image (``captions=False``).
    """

    keys: list[str]  # samples with a caption, tar order
    captions: list[str]
    images: dict[str, tuple[str, int, int, int]]
    all_keys: list[str]  # every sample, tar order
    image_sha256: dict[str, bytes] = dataclasses.field(default_factory=dict)  # with captions only
    sha256: str = ""  # of the whole tar (with captions only: the tar is streamed)
    size: int = 0  # bytes of the tar
    duplicates: int = 0  # second members of one kind (image, caption) for a key: ignored

    @property
    def no_caption(self) -> int:
        return len(self.all_keys) - len(self.keys)


def scan_tar(uri: str, captions: bool = True) -> TarIndex:
    """Index one shard (:class:`pipeline.data.shards.TarScan`). With ``captions`` the tar is
    streamed (every byte read once, and hashed: ``TarIndex.sha256``); without, headers are read
    and data is seeked past.

    A key keeps the first member of each kind (image, caption) in tar order; later ones are
    counted in ``duplicates``. Raises ``ValueError`` naming the shard if the tar ends early
    at a corrupt header (tarfile alone would stop there in silence).
    """
    index = TarIndex([], [], {}, [])
    seen: set[str] = set()
    with_caption: set[str] = set()
    scan = TarScan(uri, hashed=captions)
    try:
        for m in scan:
            if not m.isfile:
                continue
            if m.key not in seen:
                seen.add(m.key)
                index.all_keys.append(m.key)
            kind = KINDS.get(m.ext)
            if kind == "txt" and captions:
                if m.key in with_caption:
                    index.duplicates += 1
                    continue
                with_caption.add(m.key)
                index.keys.append(m.key)
                index.captions.append(scan.read().decode("utf-8").strip())
            elif kind == "image":
                if m.key in index.images:
                    index.duplicates += 1
                    continue
                side = -1
                if captions:
                    data = scan.read()
                    index.image_sha256[m.key] = hashlib.sha256(data).digest()
                    side = _short_side(data)
                index.images[m.key] = (m.ext, m.offset, m.size, side)
    except ShardDamaged as err:
        raise ValueError(f"shard {uri} is damaged: {err}. Re-run the filter step to write it again (delete it "
                         "first).") from err
    index.size, index.sha256 = scan.size, scan.sha256
    if index.duplicates:
        log.warning("%s: %d second member(s) for a key ignored (the first of each kind is used)", uri,
                    index.duplicates)
    return index


def _short_side(data: bytes) -> int:
    """The image's short side from its header (no pixels decoded); -1 if unreadable."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return min(img.size)
    except Exception:  # noqa: BLE001 - the loader counts an undecodable image when it meets it
        return -1


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA/MPS out-of-memory, or the CPU allocator failing to get memory."""
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


@dataclass
class EncodeStats:
    """What batching cost: real vs padded tokens, batches run, OOM retries, final budget."""

    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    oom_retries: int = 0
    token_budget: int = 0


def _next_batch(order: list[int], sorted_lengths: np.ndarray, pos: int, max_batch: int,
                budget: int) -> list[int]:  # fmt: skip
    # Captions are sorted longest first, so the first one sets the batch's padded length;
    # the batch stops where lengths fall below BUCKET_RATIO of it (a length bucket).
    longest = int(sorted_lengths[pos])
    shortest = math.ceil(BUCKET_RATIO * longest)
    in_bucket = int(np.searchsorted(-sorted_lengths, -shortest, side="right")) - pos
    n = max(1, min(max_batch, budget // longest, in_bucket))
    return order[pos : pos + n]


class NonFiniteEmbedding(ValueError):
    """Caption ``index`` encodes to inf/nan in float16 (fp16 overflow in T5 v1.1)."""

    def __init__(self, index: int):
        super().__init__(f"caption {index} has a non-finite float16 embedding")
        self.index = index


def _forward(encoder, ids: list[list[int]]) -> np.ndarray:
    """float16 ``[sum T, D]``: the real tokens of each caption, row after row."""
    import torch

    hidden, mask = encoder.encode_ids(ids)
    real = hidden[mask].to(torch.float16)  # cast on the device: half the copy to host
    if not torch.isfinite(real).all():  # checked per batch: memory bounded by the batch
        bad_token = int((~torch.isfinite(real).all(dim=1)).nonzero()[0])
        ends = np.cumsum([len(x) for x in ids])
        raise NonFiniteEmbedding(int(np.searchsorted(ends, bad_token, side="right")))
    return real.cpu().numpy()


def encode_captions(
    encoder, ids: list[list[int]], batch_size: int, max_batch_tokens: int
) -> tuple[np.ndarray, np.ndarray, EncodeStats]:
    """Encode tokenized captions; returns ``(flat float16 [sum T, D], lengths, stats)``.

    ``flat`` holds the real tokens of caption 0, then caption 1, ... in input order. Batches
    are built from captions sorted by length, longest first (an out-of-memory shows at
    once), each at most ``batch_size`` captions and ``max_batch_tokens`` padded tokens, and
    none shorter than ``BUCKET_RATIO`` of the batch's longest (padding <= 20%). On
    out-of-memory the budget halves and the same captions are retried; the smaller budget
    then holds for the rest of the call. Raises :class:`NonFiniteEmbedding` naming the
    caption's index when its float16 vectors overflow.
    """
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.empty((int(offsets[-1]), encoder.dim), dtype=np.float16)
    order = sorted(range(len(ids)), key=lambda i: (-lengths[i], i))
    sorted_lengths = lengths[order]
    stats = EncodeStats(tokens=int(offsets[-1]), token_budget=max_batch_tokens)
    pos = 0
    while pos < len(order):
        batch = _next_batch(order, sorted_lengths, pos, batch_size, stats.token_budget)
        padded = len(batch) * int(lengths[batch[0]])
        try:
            real = _forward(encoder, [ids[i] for i in batch])
        except NonFiniteEmbedding as err:
            raise NonFiniteEmbedding(batch[err.index]) from None
        except (RuntimeError, MemoryError) as err:
            if not (isinstance(err, MemoryError) or is_out_of_memory(err)):
                raise
            if len(batch) == 1:
                raise RuntimeError(
                    f"out of memory encoding one caption of {padded} tokens: lower "
                    "--max-length, use --dtype bfloat16, or run on a device with more memory"
                ) from err
            stats.token_budget, stats.oom_retries = padded // 2, stats.oom_retries + 1
            log.warning("out of memory at %d captions x %d tokens; token budget now %d",
                        len(batch), lengths[batch[0]], stats.token_budget)  # fmt: skip
            _release_cached_memory()
            continue
        row = 0
        for i in batch:
            flat[offsets[i] : offsets[i + 1]] = real[row : row + lengths[i]]
            row += lengths[i]
        stats.padded_tokens += padded
        stats.batches += 1
        pos += len(batch)
    return flat, lengths, stats


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def embedding_files(path: str, split: str | None = None) -> list[str]:
    """Sorted ``NNNNNN.parquet`` and ``val-NNNNNN.parquet`` URIs directly under ``path`` (only
    those of ``split``, "train" or "val", when given)."""
    return storage.list_files(path, shard_pattern(split, "parquet"))


def resolve_embeddings_dir(path: str) -> str:
    """``path`` itself if it holds embeddings, else its single encoder subfolder.

    Lets callers pass either ``embed_shards``'s ``output`` or the root given to it.
    """
    if embedding_files(path):
        return path
    found = [storage.basename(d) for d in storage.list_dirs(path)
             if embedding_files(storage.join(path, storage.basename(d)))]
    if len(found) == 1:
        return storage.join(path, found[0])
    raise ValueError(
        f"no embeddings parquet in {path}"
        + (f"; pick one encoder folder of {found}" if found else "; run the embed step first")
    )


def read_metadata(path: str) -> dict:
    """Schema metadata of an embeddings parquet (reads the footer only).

    ``path`` may also be an embeddings directory (or its parent with one encoder folder):
    then the metadata of its first parquet is returned, shard-specific keys included.
    """
    if storage.isdir(path):
        path = embedding_files(resolve_embeddings_dir(path))[0]
    return read_footer(path)[1]


def _is_done(uri: str, expected: dict, tar_uri: str) -> bool:
    """Whether ``uri`` holds this shard's embeddings for these settings. The tar is matched by
    content: a changed shard of the same size (tars are padded to 10 KiB) is redone. It is
    hashed only when everything cheaper matched."""
    from imagen.text import same_encoder

    if not storage.exists(uri):
        return False
    try:
        meta = read_metadata(uri)
    except ValueError:
        return False  # a corrupt leftover is simply redone
    if not same_encoder(meta.get("encoder_id"), expected["encoder_id"]) or not all(
            str(meta.get(k)) == str(expected[k]) for k in _MATCH_KEYS if k != "encoder_id"):
        return False
    if meta.get("source_size") != storage.size(tar_uri) or not meta.get("source_sha256"):
        return False
    return meta["source_sha256"] == file_sha256(tar_uri)


def _select(shard_uris: list[str], shards: list[str] | None) -> list[str]:
    if shards is None:
        return shard_uris
    wanted = {shard_stem(s) for s in shards}
    chosen = [u for u in shard_uris if shard_stem(u) in wanted]
    missing = wanted - {shard_stem(u) for u in chosen}
    if missing:
        raise ValueError(f"shards not found in input: {sorted(missing)}")
    return chosen


def _shard_weights(input: str, shard_uris: list[str]) -> dict[str, int]:
    """Samples per shard from the filter manifest (``{"shards": {name: count}}``), else bytes."""
    names = [storage.basename(u) for u in shard_uris]
    manifest_uri = manifest_of(input)
    if storage.exists(manifest_uri):
        counts = storage.read_json(manifest_uri).get("shards")
        if isinstance(counts, dict) and all(isinstance(counts.get(n), int) for n in names):
            return {n: counts[n] for n in names}
        log.warning("%s does not list a sample count for every shard; balancing by bytes",
                    manifest_uri)  # fmt: skip
    return {storage.basename(u): storage.size(u) for u in shard_uris}


def split_shards(input: str, num_workers: int) -> list[list[str]]:
    """``num_workers`` disjoint lists of shard names covering every shard in ``input``.

    Balanced by sample count (largest shards first, each to the least loaded worker), and
    deterministic, so a retried Airflow map index gets the same list. A worker gets an
    empty list when there are fewer shards than workers.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    shard_uris = storage.list_shards(input, _SHARD)
    if not shard_uris:
        raise ValueError(f"no NNNNNN.tar shards in {input}; run the filter step first")
    weights = _shard_weights(input, shard_uris)
    names = sorted(weights)
    return [[names[i] for i in part] for part in balanced_split([weights[n] for n in names],
                                                                num_workers)]  # fmt: skip


def balanced_split(weights: list[int], parts: int) -> list[list[int]]:
    """Indices of ``weights`` in ``parts`` disjoint sorted lists of near-equal total weight.

    Greedy, heaviest first, each to the lightest list (ties: lower index first), so the
    result depends only on the weights: every process computes the same split.
    """
    loads = [(0, p) for p in range(parts)]
    owned: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, p = heapq.heappop(loads)
        owned[p].append(i)
        heapq.heappush(loads, (load + weights[i], p))
    return [sorted(o) for o in owned]


def _clean_temps(out_dir: str, name: str) -> None:
    """Delete temporaries a killed run left for this shard (only this worker's shards)."""
    for uri in storage.list_files(out_dir, rf"\.{name}\.parquet\.tmp-[0-9a-f]+"):
        log.warning("removing %s, left by an interrupted run", uri)
        storage.remove(uri)


def _open_encoder(encoder, cfg: EmbedConfig):
    from imagen.text import open_encoder
    from pipeline import logs
    from pipeline.netguard import refuse_model_url

    logs.quiet_progress_bars()  # "Loading weights" on stderr: ERROR lines in an Airflow task log
    if isinstance(encoder, str):
        refuse_model_url(encoder)  # a URL never reaches transformers: hub names and local dirs only
        return open_encoder(encoder, max_length=cfg.max_length, device=cfg.device, dtype=cfg.dtype)
    return encoder  # an already built TextEncoder (benchmarks, tests): its own settings win


def embed_shards(
    input: str,
    output: str,
    encoder=None,
    *,
    shards: list[str] | None = None,
    config: EmbedConfig | None = None,
    **options,
) -> dict:
    """Embed the captions of every (or the selected) filtered shard; see the module doc.

    Args:
        input: directory (fsspec URI) of filtered ``NNNNNN.tar`` and ``val-NNNNNN.tar`` shards.
        output: root directory; results go to ``output/<encoder-slug>/``.
        encoder: hub id or local directory of a T5 encoder (``t5:`` prefix optional), or
            an :class:`imagen.text.TextEncoder` (then max_length, device, dtype are its own);
            default ``config.encoder``.
        shards: subset of shard names (``000003``, ``val-000003.tar`` or paths), e.g. one list
            of :func:`split_shards`; default every shard in ``input``.
        config: the options (:class:`EmbedConfig`: max_length, batch_size, max_batch_tokens
            (halves on out-of-memory), device, dtype, caption_cache); ``options`` override its fields.

    Returns:
        ``{"output", "encoder_id", "shards", "samples", "skipped", "samples_per_s",
        "padding"}``: the embeddings directory, the encoder identity, shards and samples
        embedded now, shards skipped because an up-to-date parquet was there, throughput,
        and the fraction of encoded positions that were padding; ``caption_dedup``: captions and
        tokens of the shards embedded now, how many were encoded, cache hits and corrupt
        entries, the cache folder, and ``saving`` (share of tokens not encoded, see
        :func:`~pipeline.data.caption_cache.caption_dedup_saving`).
    """
    cfg = dataclasses.replace(config or EmbedConfig(), **options)
    if cfg.batch_size < 1 or cfg.max_batch_tokens < 1:
        raise ValueError(f"batch_size ({cfg.batch_size}) and max_batch_tokens "
                         f"({cfg.max_batch_tokens}) must be >= 1")  # fmt: skip
    shard_uris = _select(storage.list_shards(input, _SHARD), shards)
    if not shard_uris and shards is None:
        raise ValueError(f"no NNNNNN.tar shards in {input}; run the filter step first")
    enc = _open_encoder(cfg.encoder if encoder is None else encoder, cfg)
    out_dir = storage.join(output, encoder_slug(enc.encoder_id))
    storage.makedirs(out_dir)
    identity = encoder_identity(enc, str(encoder or cfg.encoder))
    base_meta = {**identity, "code_version": CODE_VERSION}
    cache = _open_cache(output, identity, enc) if cfg.caption_cache else None
    opts = dataclasses.replace(cfg)  # a copy: its token budget shrinks on out-of-memory
    total, start, dedup = EncodeStats(), time.perf_counter(), DedupStats()
    done = skipped = samples = 0
    for n, uri in enumerate(shard_uris, 1):
        name = shard_stem(uri)
        out_uri = storage.join(out_dir, f"{name}.parquet")
        _clean_temps(out_dir, name)
        meta = {**base_meta, "source_shard": f"{name}.tar"}
        if _is_done(out_uri, meta, uri):
            skipped += 1
            continue
        count, stats, shard_dedup = _embed_one(uri, out_uri, enc, opts, meta, f"{n}/{len(shard_uris)}", cache)
        dedup.add(shard_dedup)
        opts.max_batch_tokens = stats.token_budget  # an OOM-reduced budget carries over
        total.tokens += stats.tokens
        total.padded_tokens += stats.padded_tokens
        samples += count
        done += 1
    rate = samples / max(time.perf_counter() - start, 1e-9)
    padding = 1 - total.tokens / total.padded_tokens if total.padded_tokens else 0.0
    saved = dedup.as_dict(cache.dir if cache else None)
    print(f"[embed] {done} shard(s) embedded, {skipped} skipped, {samples} samples "
          f"({rate:.1f} samples/s) -> {out_dir}; {dedup.captions_encoded} of {dedup.captions} captions "
          f"encoded ({saved['saving']:.1%} of tokens saved by caption dedup)", flush=True)  # fmt: skip
    return {
        "output": out_dir,
        "encoder_id": enc.encoder_id,
        "shards": done,
        "samples": samples,
        "skipped": skipped,
        "samples_per_s": round(rate, 2),
        "padding": round(padding, 4),
        "caption_dedup": saved,
    }


def _open_cache(output: str, identity: dict, enc) -> CaptionCache | None:
    """The caption cache of this encoder identity, or None when its id pins no exact weights."""
    from imagen.text import pins_weights

    if not pins_weights(identity["encoder_id"]):
        log.warning("encoder id %s pins no exact weights (hub cache empty?): the caption cache is off for "
                    "this run, duplicates are still encoded once per shard", identity["encoder_id"])
        return None
    return CaptionCache(storage.join(output, CACHE_DIR), identity, encoder_slug(identity["encoder_id"]), enc.dim)


def _embed_one(uri: str, out_uri: str, enc, opts: EmbedConfig, meta: dict, progress: str,
               cache: CaptionCache | None):  # fmt: skip
    """Embed one shard and write its parquet; returns (samples, EncodeStats, DedupStats)."""
    start = time.perf_counter()
    index = scan_tar(uri)
    keys = index.keys
    if index.no_caption:
        log.warning("%s: %d sample(s) have no .txt caption and get no embedding", uri,
                    index.no_caption)  # fmt: skip
    try:
        flat, lengths, stats, dedup = embed_distinct(index.captions, enc, opts, cache)
    except NonFiniteEmbedding as err:
        raise ValueError(
            f"{uri}: embedding of key {keys[err.index]!r} is not finite in float16 (overflow). "
            "Encode in float32 or bfloat16 (--dtype) and check the encoder weights."
        ) from err
    # The bytes that were indexed and embedded: a re-run redoes the shard if they change.
    extra = {"dim": enc.dim, "num_samples": len(keys), "tar_samples": len(index.all_keys),
             "source_size": index.size, "source_sha256": index.sha256}
    where = [index.images.get(k, ("", -1, -1, -1)) for k in keys]
    table = build_table(keys, lengths, flat, where, [index.image_sha256.get(k) for k in keys], {**meta, **extra})
    write_table(table, out_uri)
    seconds = time.perf_counter() - start
    padding = 1 - stats.tokens / stats.padded_tokens if stats.padded_tokens else 0.0
    print(
        f"[embed] shard {progress} {meta['source_shard']}: {len(keys)} samples, "
        f"{dedup.captions_encoded} captions encoded ({dedup.distinct} distinct, {dedup.cache_hits} cached), "
        f"{stats.batches} batches, {padding:.0%} padding, in {seconds:.1f}s "
        f"({len(keys) / max(seconds, 1e-9):.1f} samples/s)",
        flush=True,
    )
    return len(keys), stats, dedup


def embed_distinct(captions: list[str], enc, opts: EmbedConfig, cache: CaptionCache | None = None):
    """:func:`encode_captions` for one shard's captions, each distinct caption encoded once.

    Duplicates within the list are grouped first; distinct captions found whole in ``cache`` are
    read, not encoded (nor tokenized); the rest are encoded and written to ``cache``. Returns
    ``(flat float16 [sum T, D], lengths, EncodeStats, DedupStats)`` laid out exactly as
    :func:`encode_captions` over every caption would (row ``i``: ``captions[i]``). A
    :class:`NonFiniteEmbedding` names the first index in ``captions`` holding the bad caption.
    """
    first: dict[str, int] = {}  # distinct caption -> its first index in captions (dicts keep order)
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    distinct = list(first)
    found, corrupt = cache.get_many(distinct) if cache else ({}, 0)
    todo = [u for u in range(len(distinct)) if u not in found]
    ids = enc.token_ids([distinct[u] for u in todo]) if todo else []
    try:
        new_flat, new_lengths, stats = encode_captions(enc, ids, opts.batch_size, opts.max_batch_tokens)
    except NonFiniteEmbedding as err:
        raise NonFiniteEmbedding(first[distinct[todo[err.index]]]) from None
    new_offsets = np.concatenate([[0], np.cumsum(new_lengths)])
    vectors = dict(found)
    for j, u in enumerate(todo):
        vectors[u] = new_flat[new_offsets[j] : new_offsets[j + 1]]
    if cache and todo:  # before the parquet (the shard's completion marker) is written
        cache.put_many([distinct[u] for u in todo], [vectors[u] for u in todo])
    slot = {c: u for u, c in enumerate(distinct)}
    per_row = [vectors[slot[c]] for c in captions]
    lengths = np.array([len(v) for v in per_row], dtype=np.int64)
    flat = np.empty((int(lengths.sum()), enc.dim), dtype=np.float16)
    pos = 0
    for v in per_row:
        flat[pos : pos + len(v)] = v
        pos += len(v)
    dedup = DedupStats(captions=len(captions), distinct=len(distinct), cache_hits=len(found),
                       captions_encoded=len(todo), tokens=int(lengths.sum()), tokens_encoded=stats.tokens,
                       corrupt_entries=corrupt)  # fmt: skip
    return flat, lengths, stats, dedup


