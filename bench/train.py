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
images/s ratio; compile_wall_ratio_200_steps: whole-run wall time ratio, compile included). The
compiled run counts dynamo's graphs (compile_graphs) and recompilations (compile_recompiles,
from the "Recompiling function" records of torch's recompiles log: target 0) over captions of
several token lengths (distinct_caption_lengths), which the loader pads to the preset's length.
host_syncs_per_step: reads of a tensor value to the host (item, tolist, float, int, bool, index,
numpy) per training step between logging steps, counted in the trainer's process while the
DataLoader worker runs apart (target 0). calibrated_vs_trainer_step: the step time of
``plan --calibrate`` (pipeline/calibrate.py, the trainer's step on synthetic batches) over the
trainer's own steady-state step time, same batch, each the best of two runs (target >= 0.9:
the planner does not promise more than training delivers). base64: one timed step, no warm-up
(two to four minutes here), so the whole bench stays under 10 minutes.
Last line: JSON with tiny_img_s, base64_img_s, data_wait_fraction, compile_speedup,
compile_wall_ratio_200_steps, compile_graphs, compile_recompiles, distinct_caption_lengths,
host_syncs_per_step, calibrated_vs_trainer_step.
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


def train_args(work: str, steps: int, *extra: str) -> list[str]:
    data, emb = os.path.join(work, "filtered"), os.path.join(work, "emb")
    emb = os.path.join(emb, os.listdir(emb)[0])
    ckpt = os.path.join(work, "ckpt-" + "-".join(x.strip("-") for x in extra))
    return ["--stage", "base64", "--preset", "tiny", "--data", data, "--embeddings", emb, "--checkpoint-dir", ckpt,
            "--max-steps", str(steps), "--global-batch", "16", "--log-every", "10", "--checkpoint-every", "1000",
            "--sample-every", "0", "--num-workers", "1", "--tracking-uri", "off", *extra]


def bench_tiny(work: str, *extra: str, steps: int = 60) -> dict:
    """The trainer's own summary of a tiny run (in a child: this file's ``--child``), plus its
    wall time (start-up and compile included), dynamo's graph and recompile counts and the host
    reads of its steps."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *train_args(work, steps, *extra)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"training child failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0}


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")


def child(argv: list[str]) -> None:
    """One training run in this process, watched: dynamo's recompiles log and every host read
    of a tensor value, split into reads at logging/checkpoint steps and reads elsewhere."""
    import argparse
    import logging

    import torch

    from pipeline.train import trainer as trainer_mod
    from pipeline.train.job import add_arguments, job_from_args
    from pipeline.train.worker import run

    recompiles: list[str] = []

    class Recompiles(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Recompiling function" in record.getMessage():
                recompiles.append(record.getMessage().splitlines()[0])

    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(Recompiles())
    # reads inside TrainStep.run (the step) and inside read_metrics (the logging read), from the
    # second step on: the first one holds lazy set-up (optimizer state, the compile)
    reads = {"in_step": 0, "at_log": 0, "steps": 0}
    where = {"now": None}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if where["now"]:
                reads[where["now"]] += 1
            return _original(self, *a, **k)

        setattr(torch.Tensor, name, counted)
    step_run, read_metrics = trainer_mod.TrainStep.run, trainer_mod.TrainStep.read_metrics

    def run_step(self, *a, **k):
        reads["steps"] += 1
        where["now"] = "in_step" if reads["steps"] > 1 else None
        try:
            return step_run(self, *a, **k)
        finally:
            where["now"] = None

    def read(self):
        where["now"] = "at_log"
        try:
            return read_metrics(self)
        finally:
            where["now"] = None

    trainer_mod.TrainStep.run, trainer_mod.TrainStep.read_metrics = run_step, read
    p = argparse.ArgumentParser()
    add_arguments(p)
    result = run(job_from_args(p.parse_args(argv)))
    from torch._dynamo.utils import counters

    print(json.dumps({**result, "compile_graphs": counters["stats"]["unique_graphs"],
                      "compile_recompiles": len(recompiles), "host_reads_in_steps": reads["in_step"],
                      "host_reads_at_logs": reads["at_log"], "train_steps": reads["steps"]}))


def bench_base64(steps: int = 1, warmup: int = 0) -> tuple[float | None, str]:
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
    # No warm-up step by default: on a CPU nothing is compiled or autotuned, and a step of the 2B
    # model takes two to four minutes here, so a warm-up would push the bench past 10 minutes
    for _ in range(steps + warmup):
        t0 = time.perf_counter()
        t, noise = torch.rand(1), torch.randn_like(x0)
        loss = diffusion.loss(model(diffusion.q_sample(x0, t, noise), t, text, mask), x0, noise, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return 1.0 / min(times[warmup:]), "batch 1, Adafactor, gradient checkpointing, fp32, CPU, first step"


def caption_lengths(work: str) -> int:
    """How many distinct caption token counts the tiny embeddings hold (the loader pads them all
    to the preset's max_text_len, so a compiled step sees one text shape)."""
    import pyarrow.parquet as pq

    emb = os.path.join(work, "emb")
    emb = os.path.join(emb, os.listdir(emb)[0])
    counts = set()
    for name in os.listdir(emb):
        if name.endswith(".parquet"):
            counts |= set(pq.read_table(os.path.join(emb, name), columns=["num_tokens"]).column(0).to_pylist())
    return len(counts)


def calibrated_step_s(batch: int = 16, seconds: float = 12.0, repeats: int = 2) -> float:
    """Seconds per step of ``plan --calibrate``'s measurement of the tiny base stage, best of
    ``repeats`` (as the trainer's figure is the best of its runs: this machine is noisy)."""
    from pipeline.calibrate import measure_train

    return min(batch / measure_train("base64", "tiny", "cpu", seconds, batch)["images_per_s"]
               for _ in range(repeats))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    with tempfile.TemporaryDirectory() as work:
        tiny_data(work)
        lengths = caption_lengths(work)
        tiny = bench_tiny(work)
        # torch.compile (inductor, C++ on the CPU) against eager, in the same run: steady-state
        # images/s after the first logging interval, and the wall time the compile adds
        eager, compiled = bench_tiny(work, steps=200), bench_tiny(work, "--compile", steps=200)
    calib_s = calibrated_step_s()
    trainer_s = 16 / max(tiny["images_per_s"], eager["images_per_s"])  # best of the two eager runs
    syncs = eager["host_reads_in_steps"] / max(1, eager["train_steps"] - 1)
    print(f"compiled run: {compiled['compile_graphs']} graph(s), {compiled['compile_recompiles']} recompile(s) "
          f"over 200 steps with {lengths} distinct caption lengths", flush=True)
    print(f"host reads: {syncs:.2f} per step inside the step, {eager['host_reads_at_logs']} at the "
          f"{200 // 10} logging steps", flush=True)
    print(f"calibrate: {calib_s * 1000:.0f} ms/step against the trainer's {trainer_s * 1000:.0f} ms/step "
          f"(x{calib_s / trainer_s:.2f})", flush=True)
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
                      "compile_wall_ratio_200_steps": compiled["wall_s"] / eager["wall_s"],
                      "compile_graphs": compiled["compile_graphs"], "compile_recompiles": compiled["compile_recompiles"],
                      "distinct_caption_lengths": lengths, "host_syncs_per_step": syncs,
                      "calibrated_vs_trainer_step": calib_s / trainer_s}))


if __name__ == "__main__":
    main()
