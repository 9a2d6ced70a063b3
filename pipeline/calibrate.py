"""``imagen-pipeline plan --calibrate``: measure this machine for the capacity planner.

Times the trainer's own optimizer step (pipeline/train/step.py) of each requested stage on
batches shaped as the loader makes them, and the forward pass of a randomly
initialised T5 encoder of the requested shape, then merges the entries into the user
calibration file that ``pipeline.plan`` reads over the checked-in table::

    imagen-pipeline plan --calibrate --gpu cpu --presets tiny --encoder tiny   # ~40 s here
    imagen-pipeline plan --calibrate --gpu h200 --stages base64                # on a GPU machine

``bench/gpu.py`` uses the same two measurements.
"""

from __future__ import annotations

import json
import os
import time

from pipeline.plan import EncoderSpec, PlanInputs, load_calibration, resolve_encoder


def synthetic_batch(cfg, batch: int, mean_tokens: float = 20.0, seed: int = 0) -> dict:
    """A batch as the loader hands it to the trainer (pipeline/data/loader.py ``collate``): uint8
    pixels at the stage's crop, fp16 text padded to ``max_text_len`` with captions of about
    ``mean_tokens`` tokens (web captions: ~20 T5 tokens), pinned when CUDA is there."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    spec, dim, width = cfg.spec, cfg.unet.text_embed_dim, cfg.max_text_len
    lengths = np.clip(rng.poisson(mean_tokens, batch), 1, width)
    out = {"image": torch.from_numpy(rng.integers(0, 256, (batch, 3, spec.crop_size, spec.crop_size), np.uint8)),
           "text_embeds": torch.from_numpy(rng.standard_normal((batch, width, dim), np.float32).astype(np.float16)),
           "text_mask": torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]),
           "keys": [f"{i:09d}" for i in range(batch)]}
    if spec.lowres_crop_size:
        side = spec.lowres_crop_size
        out["lowres"] = torch.from_numpy(rng.integers(0, 256, (batch, 3, side, side), np.uint8))
    if torch.cuda.is_available():
        out = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in out.items()}
    return out


def measure_train(stage: str, preset_name: str, device: str, seconds: float, batch: int | None = None,
                  compile: bool = False) -> dict:
    """images/s of the trainer's own optimizer step (pipeline/train/step.py: draws on the device,
    loss, backward, clipping, AdamW, EMA, the loader's uint8/fp16 batches copied in and
    normalised on the device, text padded to the preset's length; bf16 autocast on CUDA), with
    the metrics read back once per 50 steps as the paper presets log. One micro-batch per step."""
    import itertools

    import torch

    from imagen.config import preset
    from pipeline.train.job import batch_plan
    from pipeline.train.step import StepOptions, TrainStep

    cfg = preset(preset_name, stage)
    cuda = device.startswith("cuda")
    b = batch or min(cfg.train.micro_batch, 64 if cuda else 16)
    step = TrainStep(cfg, StepOptions(compile=compile), batch_plan(b, b, 1), 0, 1, torch.device(device))
    batches = itertools.repeat(synthetic_batch(cfg, b))
    step.model.train()

    def run(n: int, first: int) -> None:
        for i in range(first, first + n):
            step.run(batches, i, cfg.train.lr)
        step.read_metrics()  # waits for the device: the steps are done

    run(2, 0)  # warm-up: allocator, kernels (and the compile)
    # chunks of steps with one read each, as the trainer reads once per logging interval
    n, chunk, t0 = 0, 1, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        run(chunk, 2 + n)
        n += chunk
        chunk = min(2 * chunk, 10)
    return {"images_per_s": round(b * n / (time.perf_counter() - t0), 4), "batch": b, "steps": n}


def measure_embed(spec: EncoderSpec, device: str, seconds: float, mean_tokens: float,
                  batch: int | None = None) -> dict:
    """Tokens/s of a randomly initialised T5 encoder of ``spec``'s shape (weights do not change
    the speed): batches of captions of ``mean_tokens`` tokens (64 on CPU; 512 on CUDA, about
    the embed step's 16384-token budget at web caption lengths); bf16 on CUDA, fp32 on CPU."""
    import torch
    from transformers import T5Config, T5EncoderModel

    cuda = device.startswith("cuda")
    heads = max(1, spec.inner // 64) if spec.inner >= 64 else 2
    config = T5Config(vocab_size=1024, d_model=spec.d_model, d_kv=spec.inner // heads, d_ff=spec.d_ff,
                      num_layers=spec.num_layers, num_heads=heads, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0)
    with torch.device(device):
        model = T5EncoderModel(config).eval()
    if cuda:
        model = model.to(torch.bfloat16)
    length = max(1, round(mean_tokens))
    ids = torch.randint(0, 1024, (batch or (512 if cuda else 64), length), device=device)
    with torch.inference_mode():
        model(input_ids=ids)
        if cuda:
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < seconds:
            model(input_ids=ids)
            n += 1
        if cuda:
            torch.cuda.synchronize()
    return {"tokens_per_s": round(ids.numel() * n / (time.perf_counter() - t0), 2), "batch": ids.shape[0],
            "tokens_per_caption": length}


def calibrate(inp: PlanInputs, path: str, seconds: float = 8.0, batch: int | None = None) -> dict:
    """Measure each requested stage/preset (and the encoder, if it fits) here; merge the entries
    into the user calibration file at ``path`` and return them."""
    import platform

    import torch

    from imagen.config import resolve_presets

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpus = {k for k, d in load_calibration(None)["devices"].items() if d.get("peak_bf16_flops")}
    if (device == "cpu" and inp.gpu in gpus) or (device == "cuda" and inp.gpu == "cpu"):
        raise ValueError(f"--calibrate measures this machine ({device}) but --gpu is {inp.gpu!r}: pass the "
                         "type of this machine's device (cpu here, or a name of your own)")
    what = (torch.cuda.get_device_name(0) if device == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    when = time.strftime("%Y-%m-%d")
    found: dict[str, dict] = {"train": {inp.gpu: {}}, "embed": {inp.gpu: {}}}
    for stage, name in resolve_presets(inp.presets, inp.stages).items():
        m = measure_train(stage, name, device, seconds, batch)
        found["train"][inp.gpu][f"{stage}:{name}"] = {
            "images_per_s": m["images_per_s"],
            "source": f"measured by plan --calibrate on {what} ({device}, batch {m['batch']}, "
                      f"{m['steps']} timed steps, {when})"}
        print(f"calibrate: train {stage}:{name} on {device}: {m['images_per_s']:.2f} images/s", flush=True)
    key, spec = resolve_encoder(inp.encoder)
    if device == "cuda" or spec.flops_per_token / 2 < 1e9:  # a 4.7B T5-XXL in fp32 does not fit a CPU plan
        m = measure_embed(spec, device, seconds / 2, inp.mean_tokens)
        found["embed"][inp.gpu][key] = {
            "tokens_per_s": m["tokens_per_s"],
            "source": f"measured by plan --calibrate on {what} (random {key}-shaped T5 encoder, batch {m['batch']} x "
                      f"{m['tokens_per_caption']} tokens, {when})"}
        print(f"calibrate: embed {key} on {device}: {m['tokens_per_s']:.0f} tokens/s", flush=True)
    path = os.path.expanduser(path)
    mine = {}
    if os.path.isfile(path):
        with open(path) as f:
            mine = json.load(f)
    for section, devices in found.items():
        for dev_name, entries in devices.items():
            if entries:
                mine.setdefault(section, {}).setdefault(dev_name, {}).update(entries)
    if inp.gpu not in load_calibration(None)["devices"]:
        mine.setdefault("devices", {})[inp.gpu] = {"description": what, "peak_bf16_flops": None, "mfu": None,
                                                   "source": "added by plan --calibrate"}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(mine, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return {"calibration": path, "measured": found}
