"""Benchmark: training images/s of the tiny and base64 presets on this machine, and the
fraction of step time spent waiting for data.

    python bench/train.py

tiny: the real trainer (pipeline/train/trainer.py) on the synthetic tiny dataset, made by the real
steps (tinydata -> img2dataset over loopback -> filter -> tiny T5 embed), batch 16, one
DataLoader worker; images/s and data-wait fraction are the trainer's own measurements after
its first logging interval. base64: the paper-sized 2B-parameter base U-Net, one optimizer
step at a time on synthetic 64px batches with T5-XXL-sized (4096-d) text (Adafactor + gradient
checkpointing, batch 1: what fits in this machine's 24 GiB on a CPU); skipped, with the reason,
when memory is short. The baseline of data_wait_fraction is the step time itself (target < 5%).
torch.compile: 200 tiny steps eager and compiled in the same run (compile_speedup: steady-state
images/s ratio; compile_wall_ratio_200_steps: whole-run wall time ratio, compile included).
Last line: JSON with tiny_img_s, base64_img_s, data_wait_fraction, compile_speedup,
compile_wall_ratio_200_steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def tiny_data(work: str) -> tuple[str, str]:
    from pipeline.data.download import download
    from pipeline.data.embed import embed_shards
    from pipeline.data.filters import filter_shards
    from pipeline.dev.tinydata import make_tiny_dataset, serve
    from pipeline.dev.tinymodels import build_tiny_t5

    server = serve(os.path.join(work, "tiny"), 0)
    try:
        info = make_tiny_dataset(os.path.join(work, "tiny"), n=240, port=server.server_address[1])
        download(info["urls"], os.path.join(work, "raw"), allow_private_networks=True)
    finally:
        server.shutdown()
    filter_shards(os.path.join(work, "raw"), os.path.join(work, "filtered"))
    encoder = build_tiny_t5(os.path.join(work, "t5"))
    emb = embed_shards(os.path.join(work, "filtered"), os.path.join(work, "emb"), encoder)["output"]
    return os.path.join(work, "filtered"), emb


def bench_tiny(work: str, *extra: str, steps: int = 60) -> dict:
    """The trainer's own summary of a tiny run, plus its wall time (start-up and compile included)."""
    data, emb = os.path.join(work, "filtered"), os.path.join(work, "emb")
    emb = os.path.join(emb, os.listdir(emb)[0])
    ckpt = os.path.join(work, "ckpt-" + "-".join(x.strip("-") for x in extra))
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "base64", "--preset", "tiny", "--data", data,
           "--embeddings", emb, "--checkpoint-dir", ckpt, "--max-steps", str(steps),
           "--global-batch", "16", "--log-every", "10", "--checkpoint-every", "1000", "--sample-every", "0",
           "--num-workers", "1", "--tracking-uri", "off", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0}


def bench_base64(steps: int = 2) -> tuple[float | None, str]:
    import psutil
    import torch

    from imagen.config import preset
    from imagen.diffusion import GaussianDiffusion
    from imagen.unet import UNet

    avail = psutil.virtual_memory().available
    if avail < 20 * 2**30:
        return None, f"skipped: {avail / 2**30:.1f} GiB free, the 2B model needs ~20 GiB on a CPU"
    cfg = preset("base64")
    torch.manual_seed(0)
    model = UNet(cfg.unet).train()
    model.gradient_checkpointing = True
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion(cfg.diffusion)
    x0 = torch.rand(1, 3, 64, 64) * 2 - 1
    text, mask = torch.randn(1, 16, 4096), torch.ones(1, 16, dtype=torch.bool)
    times = []
    for _ in range(steps + 1):  # one warm-up step
        t0 = time.perf_counter()
        t, noise = torch.rand(1), torch.randn_like(x0)
        loss = diffusion.loss(model(diffusion.q_sample(x0, t, noise), t, text, mask), x0, noise, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1.0 / min(times[1:]), "batch 1, Adafactor, gradient checkpointing, fp32, CPU"


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        tiny_data(work)
        tiny = bench_tiny(work)
        # torch.compile (inductor, C++ on the CPU) against eager, in the same run: steady-state
        # images/s after the first logging interval, and the wall time the compile adds
        eager, compiled = bench_tiny(work, steps=200), bench_tiny(work, "--compile", steps=200)
    print(f"tiny: {tiny['images_per_s']:.1f} img/s, data wait {100 * tiny['data_wait_fraction']:.2f}% "
          "of step time", flush=True)
    compile_speedup = compiled["images_per_s"] / eager["images_per_s"]
    print(f"torch.compile: {compiled['images_per_s']:.1f} vs {eager['images_per_s']:.1f} img/s eager "
          f"(x{compile_speedup:.2f}); 200 steps took {compiled['wall_s']:.0f} s vs {eager['wall_s']:.0f} s",
          flush=True)
    base, how = bench_base64()
    print(f"base64 (2B): {base if base is None else round(base, 4)} img/s ({how})", flush=True)
    print(json.dumps({"tiny_img_s": tiny["images_per_s"], "base64_img_s": base,
                      "data_wait_fraction": tiny["data_wait_fraction"], "compile_speedup": compile_speedup,
                      "compile_wall_ratio_200_steps": compiled["wall_s"] / eager["wall_s"]}))


if __name__ == "__main__":
    main()
