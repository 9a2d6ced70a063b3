"""``imagen-pipeline plan``: predict a full run before starting it.

From a URL-list size (or ``--samples N``), a caption token-length distribution (measured on a
sample of the URL list's captions, or ``--mean-tokens``), the stages and presets, the text
encoder, a GPU type, a node count and a price per GPU-hour, it prints a table and returns
(the CLI prints it as the last line, as JSON):

- storage per phase: raw (img2dataset output), filtered, embeddings (fp16, no padding),
  checkpoints (weights + EMA + optimizer state per kept checkpoint, and ``final/``);
- the number of raw and filtered shards and of mapped embed tasks (imagen_embed);
- hours of the download (CPU cores), GPU-hours and wall time of the embedding and of every
  training stage, and the total cost.

Throughputs come from the calibration table ``pipeline/calibration.json`` (each entry says
where it comes from: measured here, or derived from published peak FLOP/s and an MFU
assumption), merged with the user's own file (``--calibration``, default
``~/.cache/imagen-pipeline/calibration.json``), whose entries win. ``--calibrate`` measures
this machine (a few real training steps of each stage's U-Net, and a T5 encoder forward)
and writes what it measured to that file (pipeline/calibrate.py)::

    imagen-pipeline plan --samples 400000000 --encoder t5-xxl --gpu h100 --nodes 8
    imagen-pipeline plan --url-list urls.parquet --gpu a100-80gb --price-per-gpu-hour 1.8
    imagen-pipeline plan --calibrate --gpu cpu --presets tiny --encoder tiny
    python -m pipeline.plan ...                      # the same, without the CLI
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from imagen.config import STAGES
from pipeline.data.embed_config import EmbedConfig

TABLE = Path(__file__).with_name("calibration.json")
USER_TABLE = os.path.join("~", ".cache", "imagen-pipeline", "calibration.json")

# Defaults of the steps this plans, copied (planning must not import img2dataset or Airflow);
# tests/unit/test_defaults.py checks each against its owner: pipeline/data/download.py
# DownloadConfig.number_sample_per_shard and .encode_format, pipeline/data/filters.py
# filter_shards(samples_per_shard=), dags/imagen_common.py embed_params "embed_shards_per_task",
# and Airflow's [core] max_map_length default.
RAW_PER_SHARD, FILTERED_PER_SHARD = 10_000, 1000
EMBED_SHARDS_PER_TASK, MAX_MAP_LENGTH = 16, 1024
DOWNLOAD_FORMAT = "png"  # lossless by default
MAX_TOKENS = EmbedConfig().max_length  # the embed step's token limit (Imagen appendix F: 128)
# One embeddings parquet row besides its vectors (pipeline/data/embed.py schema): __key__
# (~9 chars + 4-byte offset), num_tokens int32 4, the list offset 4, image_ext (~3 + 4),
# image_offset 8, image_size 8, image_side 4, image_sha256 32 bytes.
EMBED_ROW_OVERHEAD = 80
FP16 = 2
# Bytes per parameter of one step-N checkpoint: fp32 weights + fp32 EMA (imagen.ema) +
# the optimizer state (AdamW: exp_avg and exp_avg_sq in fp32; Adafactor's factored second
# moment is O(rows + columns), counted as 0). final/ keeps weights + EMA only.
WEIGHTS_AND_EMA = 8
OPTIMIZER_STATE = {"adamw": 8, "adafactor": 0}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """A T5 v1.1 encoder's shape: its width is the embeddings' D, the rest gives its FLOPs."""

    name: str
    d_model: int
    num_layers: int
    inner: int  # num_heads * d_kv
    d_ff: int

    @property
    def flops_per_token(self) -> int:
        """2 per multiply-add of the non-embedding weights (q, k, v, o; gated FFN: wi_0, wi_1,
        wo); attention scores are left out (captions are short: ~2 * L * inner per layer)."""
        return 2 * self.num_layers * (4 * self.d_model * self.inner + 3 * self.d_model * self.d_ff)


# The one place encoder widths live. Shapes are the google/t5-v1_1-* configs; "tiny" is
# pipeline.dev.tinymodels.build_tiny_t5's default (d_model 32, 2 layers, 2 heads, d_ff 64).
ENCODERS = {
    "t5-xxl": EncoderSpec("google/t5-v1_1-xxl", 4096, 24, 4096, 10240),
    "t5-xl": EncoderSpec("google/t5-v1_1-xl", 2048, 24, 2048, 5120),
    "t5-large": EncoderSpec("google/t5-v1_1-large", 1024, 24, 1024, 2816),
    "t5-base": EncoderSpec("google/t5-v1_1-base", 768, 12, 768, 2048),
    "t5-small": EncoderSpec("google/t5-v1_1-small", 512, 8, 384, 1024),
    "tiny": EncoderSpec("t5-tiny (build_tiny_t5)", 32, 2, 32, 64),
}


def resolve_encoder(name: str) -> tuple[str, EncoderSpec]:
    """(calibration key, shape) of ``--encoder``: a short name, a hub id or a local directory."""
    for key, spec in ENCODERS.items():
        if name in (key, spec.name, spec.name.split("/")[-1]):
            return key, spec
    config = Path(name, "config.json")
    if config.is_file():
        c = json.loads(config.read_text())
        spec = EncoderSpec(name, c["d_model"], c["num_layers"], c["num_heads"] * c["d_kv"], c["d_ff"])
        match = [k for k, s in ENCODERS.items() if dataclasses.replace(s, name=name) == spec]
        return (match[0] if match else f"local:{Path(name).name}"), spec
    raise ValueError(f"unknown --encoder {name!r}; use one of {', '.join(ENCODERS)}, their hub ids "
                     f"({', '.join(s.name for s in ENCODERS.values() if '/' in s.name)}) or a local "
                     "encoder directory with a config.json")


# ---------------------------------------------------------------------------------------
# Calibration table


def load_calibration(user: str | None = USER_TABLE) -> dict:
    """The checked-in table with the user's file (if it exists) merged over it, entry by entry."""
    table = json.loads(TABLE.read_text())
    path = os.path.expanduser(user) if user else None
    if path and os.path.isfile(path):
        with open(path) as f:
            mine = json.load(f)
        for section, devices in mine.items():
            if isinstance(devices, dict) and isinstance(table.get(section), dict):
                for device, entries in devices.items():
                    if isinstance(entries, dict) and isinstance(table[section].get(device), dict):
                        table[section][device] = {**table[section][device], **entries}
                    else:
                        table[section][device] = entries
    return table


def device_info(table: dict, gpu: str) -> dict:
    devices = table["devices"]
    if gpu not in devices:
        raise ValueError(f"unknown --gpu {gpu!r}; known device types: {', '.join(sorted(devices))}. "
                         "Add one to the calibration file (devices.<name>.peak_bf16_flops) or run "
                         "plan --calibrate --gpu NAME on that machine")
    return devices[gpu]


def train_entry(table: dict, gpu: str, stage: str, preset_name: str) -> dict:
    device_info(table, gpu)
    entry = table["train"].get(gpu, {}).get(f"{stage}:{preset_name}")
    if not entry:
        have = ", ".join(sorted(table["train"].get(gpu, {}))) or "none"
        raise ValueError(
            f"no calibration entry for training {stage} with preset {preset_name} on {gpu} "
            f"(entries for {gpu}: {have}). Run `imagen-pipeline plan --calibrate --gpu {gpu} "
            f"--stages {stage} --presets {preset_name}` on such a machine, or add "
            f'train.{gpu}."{stage}:{preset_name}": {{"images_per_s": N, "source": "..."}} to '
            f"{USER_TABLE}")
    return entry


def embed_entry(table: dict, gpu: str, encoder_key: str, spec: EncoderSpec) -> dict:
    """Tokens/s of the encoder on ``gpu``; derived from the device's peak and MFU if unmeasured."""
    entry = table.get("embed", {}).get(gpu, {}).get(encoder_key)
    if entry:
        return entry
    dev = device_info(table, gpu)
    if dev.get("peak_bf16_flops") and dev.get("mfu"):
        return {"tokens_per_s": dev["peak_bf16_flops"] * dev["mfu"] / spec.flops_per_token,
                "source": f"derived: peak {dev['peak_bf16_flops']:.3g} FLOP/s x MFU {dev['mfu']} / "
                          f"{spec.flops_per_token:.3g} FLOPs per token"}
    raise ValueError(f"no calibration entry for embedding with {encoder_key} on {gpu}: run "
                     f"`imagen-pipeline plan --calibrate --gpu {gpu} --encoder {encoder_key}` there")


def derived_train_entry(table: dict, gpu: str, stage: str, preset_name: str) -> dict:
    """images/s per device = peak bf16 FLOP/s x MFU / training FLOPs per image, where training
    FLOPs = 3 x one forward (imagen.flops) at the stage's training crop and 128 text tokens.
    How the published-figure rows of calibration.json were made."""
    from imagen.config import preset
    from imagen.flops import TRAIN_FLOPS_PER_FORWARD, unet_forward_flops

    dev = device_info(table, gpu)
    cfg = preset(preset_name, stage)
    flops = TRAIN_FLOPS_PER_FORWARD * unet_forward_flops(cfg.unet, cfg.spec.crop_size, MAX_TOKENS)
    ips = dev["peak_bf16_flops"] * dev["mfu"] / flops
    return {"images_per_s": round(ips, 3), "train_flops_per_image": flops,
            "source": f"derived: {dev['peak_bf16_flops']:.4g} FLOP/s peak bf16 dense x MFU {dev['mfu']} "
                      f"(assumed, see devices.{gpu}) / {flops:.4g} training FLOPs per image "
                      f"(3 x forward at {cfg.spec.crop_size} px, {MAX_TOKENS} text tokens, imagen.flops)"}


def raw_bytes_per_row(table: dict, size: int, fmt: str) -> float:
    """img2dataset output bytes per URL-list row at ``size`` px: a power law through the two
    published JPEG anchors (failed rows included), times the measured format factor."""
    raw = table["raw"]
    (s1, b1), (s2, b2) = sorted((a["size"], a["bytes_per_row"]) for a in raw["anchors"])
    exponent = math.log(b2 / b1) / math.log(s2 / s1)
    factors = raw["format_factor"]
    if fmt not in factors or fmt == "source":
        raise ValueError(f"unknown --encode-format {fmt!r}; choose from "
                         f"{', '.join(k for k in factors if k != 'source')}")
    return b1 * (size / s1) ** exponent * factors[fmt]


# ---------------------------------------------------------------------------------------
# Caption token lengths (the URL list itself is read by pipeline.data.url_list)


def _tokenizer(encoder: str, key: str):
    """The encoder's tokenizer if it can be had without a download, else None."""
    try:
        from transformers import AutoTokenizer

        if os.path.isdir(encoder):
            return AutoTokenizer.from_pretrained(encoder)
        if key == "tiny":
            from imagen.tiny_tokenizer import build_tiny_tokenizer

            return build_tiny_tokenizer()
        return AutoTokenizer.from_pretrained(ENCODERS[key].name, local_files_only=True)
    except Exception:  # not cached, no sentencepiece, ...: token_lengths falls back to a heuristic
        return None


def token_lengths(captions: list[str], encoder: str, key: str, max_tokens: int = MAX_TOKENS) -> tuple[list[int], str]:
    """Token count of each caption (``</s>`` included, truncated) and how it was measured."""
    tok = _tokenizer(encoder, key)
    if tok is not None:
        ids = tok(list(captions), truncation=True, max_length=max_tokens)["input_ids"]
        return [len(x) for x in ids], f"measured with the {key} tokenizer on {len(captions)} captions"
    # T5's SentencePiece vocabulary splits English web captions into about 1.3 pieces per
    # whitespace word (rule of thumb, not measured here), plus </s>
    lengths = [min(max_tokens, math.ceil(1.3 * len(c.split())) + 1) for c in captions]
    return lengths, (f"estimated on {len(captions)} captions as 1.3 tokens per word + 1 (no {key} "
                     "tokenizer available offline: pass a local encoder directory to measure)")


# A web-caption length mix (bench/embed.py): 85% 5-19 tokens, 12% 20-59, 3% 60-128, uniform
# within each bucket; its mean is the default when no captions or --mean-tokens are given.
WEB_MIX_MEAN = 0.85 * (5 + 19) / 2 + 0.12 * (20 + 59) / 2 + 0.03 * (60 + 128) / 2


# ---------------------------------------------------------------------------------------
# The plan


# Every numeric input's flag, type and range: (cast, lowest, lowest excluded, highest). The command
# line's parsers (add_arguments) and PlanInputs check the same limits, so a bad value is one line
# naming its flag instead of a negative cost, a complex image size or a ZeroDivisionError.
LIMITS: dict[str, tuple[type, float, bool, float | None]] = {
    "--samples": (int, 1, False, None),
    "--mean-tokens": (float, 0, True, None),
    "--caption-sample": (int, 1, False, None),
    "--steps": (int, 1, False, None),
    "--batch-size": (int, 1, False, None),
    "--image-size": (int, 1, False, None),
    "--keep-checkpoints": (int, 1, False, None),
    "--nodes": (int, 1, False, None),
    "--gpus-per-node": (int, 1, False, None),
    "--price-per-gpu-hour": (float, 0, False, None),
    "--scaling-efficiency": (float, 0, True, 1),
    "--download-cores": (int, 1, False, None),
    "--calibrate-seconds": (float, 0, True, None),
    "--calibrate-batch": (int, 1, False, None),
}


def limit_error(flag: str, value: Any) -> str | None:
    """What is wrong with ``value`` for ``flag`` (:data:`LIMITS`), or None when it is fine."""
    cast, low, low_open, high = LIMITS[flag]
    kind = "an integer" if cast is int else "a number"
    wanted = f"{kind} {'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, int | float) or (cast is int and not isinstance(value, int)):
        return f"{flag} {value!r}: must be {wanted}"
    if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
        return f"{flag} {value}: must be {wanted}"
    return None


def _checked(flag: str):
    """An argparse ``type=`` for ``flag``: its cast, then its range (:data:`LIMITS`)."""

    def parse(text: str) -> Any:
        try:
            value = LIMITS[flag][0](text)
        except ValueError:
            value = text
        if (problem := limit_error(flag, value)) is not None:
            raise argparse.ArgumentTypeError(f"{text}: {problem.split(': ', 1)[1]}")
        return value

    parse.__name__ = flag
    return parse


def _checked_per_stage(flag: str):
    """An argparse ``type=`` for ``[STAGE=]N`` items of ``flag``; returns the item unchanged."""

    def parse(text: str) -> str:
        stage, sep, value = text.rpartition("=")
        if sep and stage not in STAGES:
            raise argparse.ArgumentTypeError(f"{text!r}: unknown stage {stage!r}; use N or STAGE=N with STAGE "
                                             f"in {', '.join(STAGES)}")
        try:
            _checked(flag)(value)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{text}: {str(e).split(': ', 1)[1]}") from None
        return text

    parse.__name__ = flag
    return parse


@dataclasses.dataclass
class PlanInputs:
    """What one plan is made from (``run`` fills it from the command line); checked when made,
    each error naming the flag to change."""

    samples: int  # URL-list rows to download
    mean_tokens: float  # caption tokens per sample, </s> included, after truncation
    stages: tuple[str, ...] = STAGES
    presets: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> preset (default: paper)
    encoder: str = "t5-xxl"
    gpu: str = "h100"
    nodes: int = 1
    gpus_per_node: int = 8
    price_per_gpu_hour: float | None = None
    steps: dict[str, int] = dataclasses.field(default_factory=dict)  # default: the preset's max_steps
    batch_size: dict[str, int] = dataclasses.field(default_factory=dict)  # global; default: preset's
    image_size: int | None = None  # download size; default: the largest stage's
    encode_format: str = DOWNLOAD_FORMAT
    optimizer: str = "adamw"
    scaling_efficiency: float | None = None  # default 0.9 on more than one GPU, else 1
    download_cores: int = 16
    keep_checkpoints: int | None = None
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # where samples/tokens came from

    def __post_init__(self) -> None:
        from imagen.config import resolve_presets

        numbers = {"--samples": self.samples, "--mean-tokens": self.mean_tokens, "--nodes": self.nodes,
                   "--gpus-per-node": self.gpus_per_node, "--download-cores": self.download_cores,
                   "--price-per-gpu-hour": self.price_per_gpu_hour, "--image-size": self.image_size,
                   "--scaling-efficiency": self.scaling_efficiency, "--keep-checkpoints": self.keep_checkpoints}
        problems = [limit_error(flag, v) for flag, v in numbers.items() if v is not None]
        for flag, values in (("--steps", self.steps), ("--batch-size", self.batch_size)):
            problems += [limit_error(flag, v) for v in values.values()]
            problems += [f"{flag}: unknown stage {s!r}" for s in values if s not in STAGES]
        if not self.stages or not set(self.stages) <= set(STAGES):
            problems.append(f"--stages {list(self.stages)}: choose one or more of {', '.join(STAGES)}")
        for stage, name in self.presets.items():
            try:
                resolve_presets({stage: name})
            except ValueError as err:
                problems.append(f"--presets {stage}={name}: {err} (use [STAGE=]PRESET)")
        if self.encode_format not in ("png", "jpg", "webp"):
            problems.append(f"--encode-format {self.encode_format!r}: use png, jpg or webp")
        if self.optimizer not in OPTIMIZER_STATE:
            problems.append(f"--optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZER_STATE)}")
        problems = [p for p in problems if p]
        if problems:
            raise ValueError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def _stage_plan(inp: PlanInputs, table: dict, stage: str, n_gpus: int, eff: float) -> dict:
    from imagen.config import preset, stage_preset
    from imagen.flops import unet_params

    name = stage_preset(inp.presets, stage)
    cfg = preset(name, stage)
    entry = train_entry(table, inp.gpu, stage, name)
    steps = inp.steps.get(stage, cfg.train.max_steps)
    batch = inp.batch_size.get(stage, cfg.train.global_batch)
    seen = steps * batch
    gpu_hours = seen / entry["images_per_s"] / 3600
    params = unet_params(cfg.unet)
    keep = cfg.train.keep_checkpoints if inp.keep_checkpoints is None else inp.keep_checkpoints
    per_ckpt = params * (WEIGHTS_AND_EMA + OPTIMIZER_STATE[inp.optimizer])
    return {"preset": name, "params": params, "image_size": cfg.image_size, "crop_size": cfg.spec.crop_size,
            "steps": steps, "global_batch": batch, "samples_seen": seen,
            "images_per_s_per_gpu": entry["images_per_s"], "throughput_source": entry.get("source", ""),
            "gpu_hours": gpu_hours, "wall_hours": gpu_hours / n_gpus / eff,
            "checkpoint_bytes": keep * per_ckpt + params * WEIGHTS_AND_EMA, "checkpoints_kept": keep}


def plan(inp: PlanInputs, table: dict) -> dict:
    """The whole prediction as a JSON-able dict (see the module doc). Raises ValueError with
    what to fix for an unknown GPU or encoder, or a missing calibration entry."""
    from imagen.config import resolve_presets, stage_specs

    if inp.samples < 1 or inp.nodes < 1 or inp.gpus_per_node < 1 or inp.mean_tokens <= 0:
        raise ValueError("--samples/--url-list rows, --nodes, --gpus-per-node and the mean token count "
                         "must be positive")
    dev = device_info(table, inp.gpu)
    key, enc = resolve_encoder(inp.encoder)
    if inp.optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"unknown --optimizer {inp.optimizer!r}; choose {', '.join(OPTIMIZER_STATE)}")
    n_gpus = inp.nodes * inp.gpus_per_node
    eff = inp.scaling_efficiency or (0.9 if n_gpus > 1 else 1.0)
    presets = resolve_presets(inp.presets, inp.stages)
    size = inp.image_size or max(s.image_size for s in stage_specs(presets, list(inp.stages)).values())

    filt = table["filter"]
    downloaded = round(inp.samples * filt["download_success_rate"])
    kept = round(inp.samples * filt["download_success_rate"] * filt["keep_rate"])
    raw = inp.samples * raw_bytes_per_row(table, size, inp.encode_format)
    tokens = kept * inp.mean_tokens
    embeddings = tokens * enc.d_model * FP16 + kept * EMBED_ROW_OVERHEAD

    raw_shards = math.ceil(inp.samples / RAW_PER_SHARD)
    filtered_shards = math.ceil(kept / FILTERED_PER_SHARD)
    per_task = max(EMBED_SHARDS_PER_TASK, math.ceil(filtered_shards / MAX_MAP_LENGTH))

    dl = table["download"]
    emb = embed_entry(table, inp.gpu, key, enc)
    embed_gpu_hours = tokens / emb["tokens_per_s"] / 3600
    stages = {s: _stage_plan(inp, table, s, n_gpus, eff) for s in inp.stages}
    gpu_hours = embed_gpu_hours + sum(p["gpu_hours"] for p in stages.values())
    wall = embed_gpu_hours / n_gpus / eff + sum(p["wall_hours"] for p in stages.values())
    billed = wall * n_gpus  # the cluster is held for the wall time, scaling losses included
    storage = {"raw": raw, "filtered": raw * filt["keep_rate"], "embeddings": embeddings,
               "checkpoints": sum(p["checkpoint_bytes"] for p in stages.values())}
    storage["total"] = sum(storage.values())
    price = inp.price_per_gpu_hour
    return {
        "inputs": {"samples": inp.samples, "mean_tokens": inp.mean_tokens, "stages": list(inp.stages),
                   "presets": presets, "encoder": key, "encoder_dim": enc.d_model, "gpu": inp.gpu,
                   "gpu_description": dev.get("description", inp.gpu), "nodes": inp.nodes,
                   "gpus_per_node": inp.gpus_per_node, "gpus": n_gpus, "scaling_efficiency": eff,
                   "price_per_gpu_hour": price, "download_image_size": size,
                   "encode_format": inp.encode_format, "optimizer": inp.optimizer, **inp.sources},
        "samples": {"url_rows": inp.samples, "downloaded": downloaded, "filtered": kept,
                    "download_success_rate": filt["download_success_rate"], "keep_rate": filt["keep_rate"]},
        "storage_bytes": storage,
        "shards": {"raw": raw_shards, "raw_samples_per_shard": RAW_PER_SHARD, "filtered": filtered_shards,
                   "filtered_samples_per_shard": FILTERED_PER_SHARD,
                   "embed_tasks": math.ceil(filtered_shards / per_task), "shards_per_embed_task": per_task},
        "download": {"cores": inp.download_cores, "samples_per_s_per_core": dl["samples_per_s_per_core"],
                     "hours": inp.samples / (dl["samples_per_s_per_core"] * inp.download_cores) / 3600},
        "embed": {"tokens": tokens, "tokens_per_s_per_gpu": emb["tokens_per_s"],
                  "samples_per_s_per_gpu": emb["tokens_per_s"] / inp.mean_tokens,
                  "gpu_hours": embed_gpu_hours, "wall_hours": embed_gpu_hours / n_gpus / eff,
                  "throughput_source": emb.get("source", "")},
        "stages": stages,
        "total": {"gpu_hours": gpu_hours, "billed_gpu_hours": billed, "wall_hours": wall,
                  "cost": None if price is None else billed * price},
        "notes": [
            f"raw: {raw_bytes_per_row(table, size, inp.encode_format):,.0f} B per URL row at {size} px "
            f"{inp.encode_format} ({table['raw']['source']})",
            f"embeddings: filtered x mean tokens x {enc.d_model} x 2 B (fp16, no padding) + "
            f"{EMBED_ROW_OVERHEAD} B per row",
            f"checkpoints: params x {WEIGHTS_AND_EMA + OPTIMIZER_STATE[inp.optimizer]} B per kept step "
            f"(fp32 weights + EMA + {inp.optimizer} state) + params x {WEIGHTS_AND_EMA} B for final/",
            "GPU-hours = samples seen / images/s per GPU / 3600; wall = GPU-hours / GPUs / scaling "
            "efficiency; cost = GPUs x wall x price; stages and the embedding run one after another",
            "global_batch is the preset's (Imagen appendix F), the trainer's --global-batch: each process "
            "takes global / GPUs of it as micro-batches with gradient accumulation (train --dry-run shows the cut)",
        ],
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return str(n)


def format_table(result: dict) -> str:
    """The plan as a human-readable table (``run`` prints it before returning the dict)."""
    i, s, st, sh = result["inputs"], result["samples"], result["storage_bytes"], result["shards"]
    cost = result["total"]["cost"]
    lines = [
        f"plan: {s['url_rows']:,} URL rows -> {s['downloaded']:,} downloaded -> {s['filtered']:,} kept; "
        f"{i['gpus']} x {i['gpu']} ({i['nodes']} node(s)); encoder {i['encoder']} ({i['encoder_dim']}-d), "
        f"{i['mean_tokens']:.2f} tokens/caption",
        "",
        f"{'storage':<14}{'bytes':>12}",
        *(f"  {k:<12}{_size(v):>12}" for k, v in st.items()),
        "",
        f"shards: {sh['raw']:,} raw x {sh['raw_samples_per_shard']:,}; {sh['filtered']:,} filtered x "
        f"{sh['filtered_samples_per_shard']:,}; {sh['embed_tasks']:,} mapped embed tasks of "
        f"{sh['shards_per_embed_task']} shards",
        f"download: {result['download']['hours']:,.1f} h on {result['download']['cores']} cores",
        "",
        f"{'phase':<10}{'preset':<9}{'params':>8}{'samples':>12}{'img/s/GPU':>11}{'GPU-h':>11}{'wall h':>9}",
    ]
    e = result["embed"]
    lines.append(f"{'embed':<10}{i['encoder']:<9}{'':>8}{s['filtered']:>12.3g}{e['samples_per_s_per_gpu']:>11.1f}"
                 f"{e['gpu_hours']:>11,.0f}{e['wall_hours']:>9,.1f}")
    for name, p in result["stages"].items():
        lines.append(f"{name:<10}{p['preset']:<9}{p['params'] / 1e6:>7.0f}M{p['samples_seen']:>12.3g}"
                     f"{p['images_per_s_per_gpu']:>11.1f}{p['gpu_hours']:>11,.0f}{p['wall_hours']:>9,.1f}")
    t = result["total"]
    lines += [f"{'total':<38}{t['gpu_hours']:>22,.0f}{t['wall_hours']:>9,.1f}",
              f"wall {t['wall_hours'] / 24:,.1f} days at scaling efficiency {i['scaling_efficiency']}; "
              + (f"cost ${cost:,.0f} ({t['billed_gpu_hours']:,.0f} billed GPU-h x ${i['price_per_gpu_hour']}/h)"
                 if cost is not None else "cost: pass --price-per-gpu-hour"),
              "", *(f"note: {n}" for n in result["notes"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line


def _per_stage(values: list[str] | None, flag: str, cast) -> dict[str, Any]:
    """``VALUE`` (every stage) or ``STAGE=VALUE`` items -> {stage: value}."""
    out: dict[str, Any] = {}
    for item in values or []:
        stage, sep, value = item.rpartition("=")
        if not sep:
            out.update({s: cast(value) for s in STAGES})
        elif stage in STAGES:
            out[stage] = cast(value)
        else:
            raise ValueError(f"{flag} {item!r}: unknown stage {stage!r}; use VALUE or STAGE=VALUE with "
                             f"STAGE in {', '.join(STAGES)}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to plan for")
    src.add_argument("--url-list", help="parquet/csv/tsv/jsonl/txt file or folder: its rows are counted and "
                                        "a sample of its captions tokenized")
    src.add_argument("--samples", type=_checked("--samples"),
                     help="number of URL-list rows (overrides the count of --url-list)")
    src.add_argument("--mean-tokens", type=_checked("--mean-tokens"), help="mean caption tokens (</s> included); "
                     "default: measured on --url-list, else a web-caption mix")
    src.add_argument("--caption-col", default="caption")
    src.add_argument("--caption-sample", type=_checked("--caption-sample"), default=10_000,
                     help="captions to tokenize (default 10000)")
    src.add_argument("--stages", nargs="+", default=list(PlanInputs.stages), choices=list(STAGES))
    src.add_argument("--presets", nargs="+", metavar="[STAGE=]PRESET",
                     help="one preset for every stage (e.g. tiny) or STAGE=PRESET items (default: paper presets)")
    src.add_argument("--encoder", default=PlanInputs.encoder,
                     help=f"{', '.join(ENCODERS)}, a hub id or a local encoder directory (default %(default)s)")
    src.add_argument("--steps", nargs="+", metavar="[STAGE=]N", type=_checked_per_stage("--steps"),
                     help="training steps (default: each preset's)")
    src.add_argument("--batch-size", nargs="+", metavar="[STAGE=]N", type=_checked_per_stage("--batch-size"),
                     help="global batch size (default: each preset's, Imagen appendix F)")
    src.add_argument("--image-size", type=_checked("--image-size"),
                     help="download size (default: the largest stage's)")
    src.add_argument("--encode-format", default=PlanInputs.encode_format, choices=["png", "jpg", "webp"],
                     help="image format of the download (default %(default)s, the download step's)")
    src.add_argument("--optimizer", default=PlanInputs.optimizer, choices=list(OPTIMIZER_STATE))
    src.add_argument("--keep-checkpoints", type=_checked("--keep-checkpoints"),
                     help="step-N checkpoints kept per stage (default: preset's)")
    hw = p.add_argument_group("where it runs")
    hw.add_argument("--gpu", default=PlanInputs.gpu, help="device type in the calibration table, e.g. h100, h200, "
                                                        "a100-80gb, l4, cpu (default %(default)s)")
    hw.add_argument("--nodes", type=_checked("--nodes"), default=PlanInputs.nodes)
    hw.add_argument("--gpus-per-node", type=_checked("--gpus-per-node"), default=PlanInputs.gpus_per_node)
    hw.add_argument("--price-per-gpu-hour", type=_checked("--price-per-gpu-hour"),
                    help="USD; without it no cost is computed")
    hw.add_argument("--scaling-efficiency", type=_checked("--scaling-efficiency"),
                    help="throughput of N GPUs / (N x one GPU), in (0, 1] (default 0.9 on more than one GPU)")
    hw.add_argument("--download-cores", type=_checked("--download-cores"), default=PlanInputs.download_cores,
                    help="CPU cores downloading (default %(default)s)")
    cal = p.add_argument_group("calibration")
    cal.add_argument("--calibration", default=USER_TABLE,
                     help=f"user calibration file, read over the checked-in table (default {USER_TABLE})")
    cal.add_argument("--calibrate", action="store_true",
                     help="measure the requested stages/presets (and encoder) on this machine as --gpu, "
                          "write them to --calibration, then plan")
    cal.add_argument("--calibrate-seconds", type=_checked("--calibrate-seconds"), default=8.0,
                     help="timed seconds per stage")
    cal.add_argument("--calibrate-batch", type=_checked("--calibrate-batch"),
                     help="images per timed step on this device (default: the preset's, at most 64 on a GPU, 16 on CPU)")


def inputs_from_args(a: argparse.Namespace) -> PlanInputs:
    sources: dict[str, str] = {}
    rows, captions = None, []
    if a.url_list:
        # imported here: planning without a list never loads storage (fsspec)
        from pipeline.data.url_list import read_url_list

        rows, captions = read_url_list(a.url_list, a.caption_col, a.caption_sample)
        sources["samples_source"] = f"{rows:,} rows in {a.url_list}"
    if a.samples is not None:
        rows, sources["samples_source"] = a.samples, "--samples"
    if rows is None:
        if not a.calibrate:
            raise ValueError("give --url-list PATH or --samples N: the number of image-text pairs to plan for")
        rows = 1
    key, _ = resolve_encoder(a.encoder)
    if a.mean_tokens is not None:
        mean, sources["mean_tokens_source"] = a.mean_tokens, "--mean-tokens"
    elif captions:
        lengths, how = token_lengths(captions, a.encoder, key)
        mean, sources["mean_tokens_source"] = sum(lengths) / len(lengths), how
    else:
        mean = WEB_MIX_MEAN
        sources["mean_tokens_source"] = ("assumed web-caption mix (85% 5-19, 12% 20-59, 3% 60-128 tokens; "
                                         "bench/embed.py): pass --mean-tokens or a --url-list with captions")
    presets = _per_stage(a.presets, "--presets", str)
    return PlanInputs(samples=rows, mean_tokens=mean, stages=tuple(s for s in STAGES if s in a.stages),
                      presets=presets, encoder=a.encoder, gpu=a.gpu, nodes=a.nodes, gpus_per_node=a.gpus_per_node,
                      price_per_gpu_hour=a.price_per_gpu_hour, steps=_per_stage(a.steps, "--steps", int),
                      batch_size=_per_stage(a.batch_size, "--batch-size", int), image_size=a.image_size,
                      encode_format=a.encode_format, optimizer=a.optimizer,
                      scaling_efficiency=a.scaling_efficiency, download_cores=a.download_cores,
                      keep_checkpoints=a.keep_checkpoints, sources=sources)
