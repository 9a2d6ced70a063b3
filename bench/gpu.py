"""The one GPU check: measure the GPU figures the moment a GPU is available (about 6 minutes
on one datacenter GPU; every part has its own time limit and the whole stays under 8).

    python bench/gpu.py            # or bench/gpu.sh; no arguments needed
    python bench/gpu.py --device cpu --train-steps 4 --preset-scale tiny   # the same path on CPU

Without a CUDA device it says so, prints ``{"gpu": null, "skipped": "no CUDA device"}`` and
exits 0. With one it runs, each part in turn, most wanted first (a failing part is reported,
the others run; a part that no longer fits the budget is skipped and says so):

1. ``calibrate``: each paper preset's training step as the trainer runs it (pipeline/train/step.py
   via ``plan --calibrate``'s ``measure_train``: bf16, fused AdamW, EMA, text padded to 128
   tokens; the 1024 stage on 256 px crops) at the largest micro-batch that fits (from the
   preset's micro-batch, doubled while it fits, halved on out-of-memory): images/s and MFU.
2. ``compile``: the base stage's step with ``torch.compile`` against eager at that batch.
3. ``cascade``: one image from text embeddings through 64 -> 256 -> 1024 px, each stage at its
   preset's sampler and steps (random weights), seconds per stage.
4. ``embed``: the T5 forward of a T5-XXL-shaped and a T5-small-shaped encoder (random weights,
   bf16) in tokens/s, the figure ``pipeline/calibration.json`` holds per device.
5. ``train``: a base64 U-Net sized like NeMo's 500M Imagen base model (513M parameters, 4096-d
   text) in bf16 for a few hundred steps through the real trainer, under ``torchrun
   --nproc_per_node 1`` (nccl), on the tiny dataset made by the tiny pipeline; the trainer logs
   ``perf/mfu`` itself.
6. ``unet``: ``bench/unet.py`` (our U-Net against diffusers' at 32/64 px).

The last line is one JSON object: ``images_per_s``, ``mfu`` and ``peak_memory_bytes`` of the
training run at the top level, each part's figures under its name. MFU = images/s x training
FLOPs per image (3 x one forward, counted by ``imagen.flops``) / the GPU's peak bf16 FLOP/s
from the calibration table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script: import imagen/ and pipeline/ from this checkout
    sys.path.insert(0, REPO)

PRESET = "nemo500m"  # registered in the training child only (see _register_preset)
TEXT_TOKENS = 128  # the trainer pads text to the preset's max_text_len: the length MFU counts
BUDGET = 450  # seconds for all parts: 7.5 minutes, under the 8 the check must fit
LIMITS = {"unet": 180, "train": 210}  # seconds per subprocess part (also capped by what is left)


def nemo500m_config(scale: str = "full"):
    """A base64 stage sized like NeMo's 500M Imagen base model (channels 256, mults 1-2-3-4,
    attention at the three lower levels, T5-XXL-width text), in the base layout (ADM skips):
    2 res blocks per level down, 3 up, 513M parameters. ``scale="tiny"``: the same layout at
    CPU size, for ``--device cpu``."""
    from imagen.config import StageConfig, TrainConfig, UNetConfig

    full = scale == "full"
    unet = UNetConfig(image_size=64, channels=256 if full else 32, channel_mults=(1, 2, 3, 4),
                      num_res_blocks=(2, 2, 2, 2) if full else (1, 1, 1, 1), head_dim=64 if full else 32,
                      text_embed_dim=4096 if full else 32, num_groups=32 if full else 8)
    train = TrainConfig(global_batch=64 if full else 4, micro_batch=64 if full else 4, lr=1e-4, warmup_steps=50, max_steps=300,
                        ema_update_after_step=10, checkpoint_every=10_000, keep_checkpoints=1,
                        log_every=25 if full else 1, sample_every=0)
    return StageConfig("base64", PRESET, 64, None, unet=unet, train=train, max_text_len=128)


def device_type(device_name: str) -> str | None:
    """The calibration table's key for a CUDA device name (the trainer's own rule: pipeline/train/perf.py)."""
    from pipeline.train.perf import device_key

    return device_key(device_name)


def peak_flops(device_name: str) -> tuple[str | None, float | None]:
    """(calibration device key, peak bf16 FLOP/s) for a CUDA device name, or (None, None)."""
    from pipeline.train.perf import peak_for_name

    key = device_type(device_name)
    return (key, peak_for_name(device_name)) if key else (None, None)


def mfu(images_per_s: float | None, train_flops_per_image: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
    if not images_per_s or not peak:
        return None
    return images_per_s * train_flops_per_image / peak


def train_summary(child: dict, cfg, peak: float | None) -> dict:
    """The training part's figures from what the training child printed (``child``)."""
    from imagen.flops import TRAIN_FLOPS_PER_FORWARD, unet_forward_flops, unet_params

    flops = TRAIN_FLOPS_PER_FORWARD * unet_forward_flops(cfg.unet, cfg.spec.crop_size, TEXT_TOKENS)
    ips = child.get("images_per_s")
    return {"images_per_s": ips, "mfu": mfu(ips, flops, peak), "train_flops_per_image": flops,
            "params": unet_params(cfg.unet), "peak_memory_bytes": child.get("peak_memory_bytes"),
            "steps": child.get("step"), "loss": child.get("loss"),
            "data_wait_fraction": child.get("data_wait_fraction"), "global_batch": cfg.train.global_batch}


def final_json(gpu: str | None, key: str | None, peak: float | None, parts: dict, seconds: float) -> dict:
    """The one JSON line: the training run's images/s, MFU and peak memory on top, every part below."""
    train = parts.get("train") or {}
    return {"gpu": gpu, "device_type": key, "peak_bf16_flops": peak,
            "images_per_s": train.get("images_per_s"), "mfu": train.get("mfu"),
            "peak_memory_bytes": train.get("peak_memory_bytes"), **parts, "seconds": round(seconds, 1)}


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def _pythonpath() -> str:
    """This checkout first, then whatever PYTHONPATH the caller set (wheels carried to a GPU
    machine, say: a part's subprocess must see them too)."""
    return os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)


def _run(cmd: list[str], limit: int, env: dict | None = None) -> dict:
    """Run a part as a subprocess; its last JSON line, or what went wrong."""
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit} s: {' '.join(cmd)}"}
    tail = (out.stdout + out.stderr)[-1500:]
    if out.returncode:
        return {"error": f"exit {out.returncode}: {tail}"}
    try:
        return {**_last_json(out.stdout), "seconds": round(time.perf_counter() - t0, 1)}
    except ValueError as e:
        return {"error": f"{e}: {tail}"}


# ---------------------------------------------------------------------------------------
# The parts


def unet_part(left: float) -> dict:
    return _run([sys.executable, os.path.join(REPO, "bench", "unet.py")], int(min(LIMITS["unet"], left)))


def embed_part(device: str, seconds: float) -> dict:
    from pipeline.calibrate import measure_embed
    from pipeline.plan import ENCODERS, WEB_MIX_MEAN

    out = {}
    for key in ("t5-xxl", "t5-small") if device == "cuda" else ("tiny",):
        try:
            out[key] = measure_embed(ENCODERS[key], device, seconds, WEB_MIX_MEAN)
        except Exception as e:  # noqa: BLE001 - report it, run the other parts
            out[key] = {"error": f"{type(e).__name__}: {e}"}
    return out


def make_data(root: str, scale: str) -> tuple[str, str]:
    """The tiny pipeline: tinydata -> download -> filter -> embed (4096-d random T5 at full
    scale). Returns (filtered shards, embeddings folder)."""
    from pipeline.data.download import download
    from pipeline.data.embed import embed_shards
    from pipeline.data.filters import filter_shards, stage_config
    from pipeline.dev.tinydata import OWN_SERVER_POLITENESS, make_tiny_dataset, serve
    from pipeline.dev.tinymodels import build_tiny_t5

    presets = {"base64": "tiny", "sr256": "tiny", "sr1024": "tiny"}  # originals at 128 px
    server = serve(os.path.join(root, "tiny"), 0)
    try:
        info = make_tiny_dataset(os.path.join(root, "tiny"), n=240, seed=0, port=server.server_address[1])
        download(info["urls"], os.path.join(root, "raw"), presets=presets, allow_private_networks=True,
                 number_sample_per_shard=60, **OWN_SERVER_POLITENESS)
    finally:
        server.shutdown()
        server.server_close()
    filtered = os.path.join(root, "filtered")
    filter_shards(os.path.join(root, "raw"), filtered, stage_config(presets), samples_per_shard=60)
    wide = scale == "full"  # T5-XXL width, one layer: the U-Net's text input is what counts
    encoder = build_tiny_t5(os.path.join(root, "t5"), d_model=4096 if wide else 32, num_layers=1,
                            num_heads=64 if wide else 2, d_ff=4096 if wide else 64)
    emb = embed_shards(filtered, os.path.join(root, "embeddings"), encoder)["output"]
    return filtered, emb


def train_part(root: str, device: str, steps: int, scale: str, peak: float | None, left: float) -> dict:
    t0 = time.perf_counter()
    try:
        filtered, emb = make_data(root, scale)
    except Exception as e:  # noqa: BLE001
        return {"error": f"making the tiny data: {type(e).__name__}: {e}"}
    data_s = time.perf_counter() - t0
    spec = {"scale": scale, "data": filtered, "embeddings": emb, "steps": steps, "device": device,
            "checkpoint_dir": os.path.join(root, "checkpoints"), "tracking_uri": f"sqlite:///{root}/mlflow.db"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           os.path.abspath(__file__), "--train-child", json.dumps(spec)]
    child = _run(cmd, int(min(LIMITS["train"], left - data_s)))
    if "error" in child:
        return child
    return {**train_summary(child, nemo500m_config(scale), peak), "data_seconds": round(data_s, 1),
            "seconds": child["seconds"]}


def train_child(spec: dict) -> None:
    """Under torchrun: train the NeMo-500M-sized base64 preset with the real trainer."""
    import torch

    from imagen import config
    from pipeline.train.job import TrainJob
    from pipeline.train.worker import run

    config.PRESETS[PRESET] = lambda: nemo500m_config(spec["scale"])  # this process only
    job = TrainJob(stage="base64", preset=PRESET, data=spec["data"], embeddings=spec["embeddings"],
                   checkpoint_dir=spec["checkpoint_dir"], max_steps=spec["steps"],
                   precision="bf16" if spec["device"] == "cuda" else "fp32", tracking_uri=spec["tracking_uri"],
                   experiment="bench-gpu", num_workers=4 if spec["device"] == "cuda" else 0,
                   device=spec["device"], sample_every=0)
    result = run(job)
    if spec["device"] == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, default=str))


def cascade_part(device: str, scale: str, steps: int | None = None, batch: int = 1) -> dict:
    """One image through the three stages from text embeddings to the last stage's size, random
    weights, each stage at its preset's own sampler and step count (8 steps at tiny scale)."""
    import torch

    from imagen.cascade import Cascade, StageOptions
    from imagen.config import STAGES, preset
    from imagen.unet import UNet

    cuda = device == "cuda"
    stages = []
    for stage in STAGES:
        cfg = preset(stage if scale == "full" else "tiny", stage)
        with torch.device(device):
            stages.append((UNet(cfg.unet).eval(), cfg))
    dim = stages[0][1].unet.text_embed_dim
    g = torch.Generator(device).manual_seed(0)
    text = torch.randn(batch, TEXT_TOKENS, dim, device=device, generator=g)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool, device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        steps = steps if steps is not None or scale == "full" else 8
        out = Cascade(stages).run(text_embeds=text, text_mask=mask, seed=0,
                                  options=[StageOptions(steps=steps)] * len(stages))
    total = sum(out.seconds)
    return {"images_per_s": batch / total, "seconds_per_image": total / batch,
            "seconds_per_stage": [round(s, 3) for s in out.seconds],
            "steps_per_stage": [steps or cfg.diffusion.sample_steps for _, cfg in stages], "batch": batch, "image_size": int(out.images.shape[1]),
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def _largest_batch(stage: str, name: str, device: str, seconds: float, start: int, grow: int) -> dict:
    """``measure_train`` at the largest micro-batch that fits (up to ``start * grow``): halves on
    out-of-memory, doubles while it fits; the fastest batch's figures, with every batch tried."""
    import torch

    from pipeline.calibrate import measure_train

    tried, best, batch = {}, None, start
    while batch >= 1 and batch <= start * grow and batch not in tried:
        try:
            m = measure_train(stage, name, device, seconds, batch)
        except torch.cuda.OutOfMemoryError:
            tried[batch] = "out of memory"
            torch.cuda.empty_cache()
            if best is not None:
                break
            batch //= 2
            continue
        tried[batch] = m["images_per_s"]
        if best is None or m["images_per_s"] > best["images_per_s"]:
            best = m
        if device != "cuda":
            break
        batch *= 2
    if best is None:
        raise RuntimeError(f"{stage}:{name}: no micro-batch fits ({tried})")
    return {**best, "tried": tried}


def calibrate_part(device: str, scale: str, peak: float | None, seconds: float = 6.0) -> dict:
    """Each stage's paper preset (tiny on CPU) as ``plan --calibrate`` measures it (the trainer's
    own step, bf16): images/s per device and MFU at the largest micro-batch that fits, the
    numbers calibration.json holds. The 1024 stage trains on 256 px crops, as the trainer does."""
    import torch

    from imagen.config import STAGES, preset
    from pipeline.train.perf import train_flops_per_image

    out = {}
    for stage in STAGES:
        name = stage if scale == "full" else "tiny"
        cfg = preset(name, stage)
        start = cfg.train.micro_batch if device == "cuda" else 4
        m = _largest_batch(stage, name, device, seconds, start, grow=4)
        flops = train_flops_per_image(cfg)
        out[f"{stage}:{name}"] = {**m, "mfu": mfu(m["images_per_s"], flops, peak), "train_flops_per_image": flops}
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def compile_part(device: str, scale: str, batch: int | None, seconds: float = 6.0) -> dict:
    """The base stage's trainer step with ``torch.compile`` against eager, same batch: the
    measurement that decides ``--compile``'s default on GPUs (compile time included apart)."""
    from pipeline.calibrate import measure_train

    name = "base64" if scale == "full" else "tiny"
    b = batch or (64 if device == "cuda" else 4)
    eager = measure_train("base64", name, device, seconds, b)
    t0 = time.perf_counter()
    compiled = measure_train("base64", name, device, seconds, b, compile=True)
    return {"batch": b, "eager_images_per_s": eager["images_per_s"], "compiled_images_per_s": compiled["images_per_s"],
            "compile_speedup": compiled["images_per_s"] / eager["images_per_s"],
            "compiled_wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu runs the same parts at tiny size (to check this script without a GPU)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--preset-scale", default=None, choices=["full", "tiny"],
                   help="model sizes (default: full on cuda, tiny on cpu)")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["unet", "embed", "train", "cascade", "calibrate", "compile"])
    p.add_argument("--train-child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.train_child:
        train_child(json.loads(a.train_child))
        return 0
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU present (torch.cuda.is_available() is False): nothing to "
              "measure; run it on a GPU machine", flush=True)
        print(json.dumps({"gpu": None, "skipped": "no CUDA device"}))
        return 0
    scale = a.preset_scale or ("full" if a.device == "cuda" else "tiny")
    t0 = time.perf_counter()
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else None
    key, peak = peak_flops(gpu) if gpu else (None, None)
    print(f"bench/gpu.py: {gpu or 'cpu'} ({key or 'no calibration entry'}, peak bf16 {peak or 'unknown'} FLOP/s)",
          flush=True)
    parts: dict = {}

    def left() -> float:
        return BUDGET - (time.perf_counter() - t0)

    # in order of what the issue asks first; the calibration of the paper presets goes last
    # and is skipped when the budget is spent (need: seconds a part needs at least)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as root:
        def base_batch() -> int | None:
            best = (parts.get("calibrate") or {}).get(f"base64:{'base64' if scale == 'full' else 'tiny'}") or {}
            return best.get("batch")

        # the issue's order: the paper presets' MFU first, then compile on/off, the cascade's
        # time per image, T5 throughput, the real trainer end to end, and the U-Net comparison
        parts_in_order = (("calibrate", 60, lambda: calibrate_part(a.device, scale, peak)),
                          ("compile", 60, lambda: compile_part(a.device, scale, base_batch())),
                          ("cascade", 30, lambda: cascade_part(a.device, scale)),
                          ("embed", 30, lambda: embed_part(a.device, 5.0)),
                          ("train", 90, lambda: train_part(root, a.device, a.train_steps, scale, peak, left())),
                          ("unet", 60, lambda: unet_part(left())))
        for name, need, fn in parts_in_order:
            if name in a.skip or (name == "unet" and a.device != "cuda"):
                continue
            if left() < need:
                parts[name] = {"skipped": f"{left():.0f} s of the {BUDGET} s budget left"}
                continue
            t = time.perf_counter()
            try:
                parts[name] = fn()
            except Exception as e:  # noqa: BLE001 - one failing part must not hide the others
                parts[name] = {"error": f"{type(e).__name__}: {e}"}
            if a.device == "cuda":
                torch.cuda.empty_cache()
            print(f"{name}: {json.dumps(parts[name], default=str)[:400]} ({time.perf_counter() - t:.0f} s)",
                  flush=True)
    print(json.dumps(final_json(gpu, key, peak, parts, time.perf_counter() - t0), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
