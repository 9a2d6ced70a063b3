"""`make demo`: a tiny text-to-image cascade, trained here in minutes, that follows its prompts.

    make demo                        # or: python infra/demo.py [--workdir demo] [--quick]
    python infra/demo.py --score-only --seeds 48    # score demo/'s cascade again on 1,152 samples

On the tiny synthetic dataset (coloured shapes, pipeline/dev/tinydata.py) it runs the real steps:
download through the fetch guard from a loopback server, filter, T5 embeddings (a tiny random
T5 built here), then trains the tiny base stage (32 px) and the tiny 32 -> 64 px SR stage
through the same launcher as the DAG (torchrun, MLflow tracking under ``WORKDIR/data``),
registers the two-stage cascade in the MLflow Model Registry, and scores it:

- prompt alignment of 192 samples (8 colours x 3 shapes x 8 seeds), guided and unguided, by
  the deterministic colour and shape checker of pipeline/release/metrics.py;
- the same 192 guided samples drawn by the fast solver (DPM-Solver++ 2M SDE, ``FAST_STEPS`` steps,
  against the base stage's default ``ddpm`` at 32): alignment, and the base stage's speedup
  (timed seed by seed, the runs in turn);
- the SR stage's PSNR gain over bicubic upsampling of the same low-res input, on held-out
  renders (new shapes and positions) downsampled by area averaging, as the loader does, with the
  guidance weight and augmentation level chosen for it first by evaluate's sweep
  (pipeline/release/sweep.py) on other held-out renders and stored with the stage.

It writes ``WORKDIR/grid.png`` (one row per prompt, its text under the images: guided samples,
unguided samples, then bicubic and SR of the same low-res image), every sample as a PNG with
``WORKDIR/samples.json`` (prompt, seed, guidance weight, path), and prints a JSON summary
last. Everything is local; nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("base64", "sr256")  # the tiny base stage (32 px) and the tiny 32 -> 64 px SR stage
PRESETS = {stage: "tiny" for stage in STAGES}
# Optimizer steps per stage (the tiny recipe in imagen/config.py; --quick: a smoke run).
STEPS = {"base64": 2000, "sr256": 1000}
SAMPLE_EVERY = 500  # steps between the trainers' validation grids (the tiny preset's 100 cost the base ~1.4 min)
QUICK_STEPS = {"base64": 30, "sr256": 20}
SEEDS = 8
GRID_SEEDS = 4  # samples per prompt and guidance weight shown in the grid
# The fast solver (why SDE: imagen/samplers/dpmpp_2m_sde.py) at 14 steps, under half the tiny base's
# 32 ancestral ones: 16 would be exactly half the network evaluations, a speedup of 2 less the
# per-sample overhead. Measured on the demo base over 1,152 samples (24 prompts x 48 seeds), colour
# and shape both right, against ddpm-32's 0.785: 16 steps 0.774, 15 0.764, 14 0.762 (paired gap
# 0.023, standard error 0.014), 12 0.743.
FAST_SAMPLER, FAST_STEPS = "dpmpp_2m_sde", 14
SWEEP_SEED, SCORE_SEED = 54321, 12345  # renders the SR sampling is chosen on, and those it is scored on


def log(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def prepare_data(work: str) -> dict:
    """Tiny dataset served on loopback -> raw -> filtered shards -> embeddings."""
    from pipeline.data.download import download
    from pipeline.data.embed import embed_shards
    from pipeline.data.filters import filter_shards, format_reject_table, stage_config
    from pipeline.dev.tinydata import OWN_SERVER_POLITENESS, make_tiny_dataset, serve
    from pipeline.dev.tinymodels import build_tiny_t5
    from pipeline.layout import RunLayout

    tiny, layout = os.path.join(work, "tiny"), RunLayout(os.path.join(work, "data"))
    os.makedirs(tiny, exist_ok=True)
    server = serve(tiny, 0)  # bound first: the URL list names its port
    port = server.server_address[1]
    try:
        log(f"tiny dataset served on 127.0.0.1:{port}")
        info = make_tiny_dataset(tiny, port=port)
        encoder = build_tiny_t5(os.path.join(tiny, "t5-tiny"))
        log("download (img2dataset through the fetch guard)")
        download(info["urls"], layout.raw, stages=STAGES, presets=PRESETS,
                 allow_hosts=(f"127.0.0.1:{port}",), processes=1, threads=8, number_sample_per_shard=100,
                 **OWN_SERVER_POLITENESS)
    finally:
        server.shutdown()
        server.server_close()
    log("filter")
    manifest = filter_shards(layout.raw, layout.filtered,
                             # no held-out split: the README's figures were measured on all 240 images
                             stage_config(PRESETS, STAGES, val_fraction=0), samples_per_shard=100)
    print(format_reject_table(manifest))
    log("T5 embeddings")
    embedded = embed_shards(layout.filtered, layout.embeddings_root, encoder)
    return {"root": layout.root, "tiny": tiny, "encoder": encoder, "embeddings": embedded["output"],
            "attributes": os.path.join(tiny, "attributes.json")}


def train(data: dict, steps: dict[str, int]) -> tuple[dict[str, dict], dict]:
    """Both stages at once, as imagen_full trains its stages (they are independent: each
    learns from the data at its own resolution). One thread each: on this 2-core machine two
    one-thread trainers together make ~35% more images/s than one two-thread trainer. The SR
    stage trains fewer, costlier steps and ends first; its sampling sweep then runs on the core
    it frees while the base stage finishes. Returns (summaries, the SR stage's chosen sampling)."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    import mlflow
    import torch

    from pipeline.layout import RunLayout
    from pipeline.train.launch import stage_job, train_stage
    from pipeline.train.launchers import make_launcher

    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(STAGES)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process only sweeps, beside a trainer
    # Create the SQLite tracking store before the stages start together: MLflow's schema
    # migration is not safe to run from two processes at once on a fresh database.
    mlflow.MlflowClient().search_experiments(max_results=1)

    def one(stage: str) -> dict:
        log(f"train {stage} ({steps[stage]} steps, tiny preset)")
        # the job imagen_full's task builds (launch.run_stage), with fewer validation grids
        job = stage_job(RunLayout(data["root"]), stage, PRESETS[stage], data["embeddings"], steps[stage])
        return train_stage(replace(job, sample_every=SAMPLE_EVERY), make_launcher("local"))

    with ThreadPoolExecutor(len(STAGES)) as pool:
        futures = {stage: pool.submit(one, stage) for stage in STAGES}
        sr = futures["sr256"].result()
        log("choose the SR stage's guidance weight and augmentation level on held-out renders")
        chosen = choose_sr_sampling(data, sr["checkpoint"])
        trained = {stage: f.result() for stage, f in futures.items()}
    torch.set_num_threads(threads)  # scoring has the machine to itself
    return trained, chosen


def held_out_sr(data: dict, cfg, seed: int):
    """Renders of the prompt set's (colour, shape) pairs at new random boxes, drawn at 96 px and
    brought to the SR stage's size: (target uint8, low-res uint8, low-res in [-1, 1], text, mask)."""
    import torch

    from imagen.text import open_encoder
    from pipeline.release.evaluate import EvalOptions, prompt_set
    from pipeline.release.metrics import render_references, resize

    specs = prompt_set(EvalOptions(attributes=data["attributes"]))[1]
    target = render_references(specs, cfg.image_size, seed=seed)
    low = resize(target, cfg.lowres_size, "area")
    text, mask = open_encoder(data["encoder"]).encode([f"a {c} {s} on a white background" for c, s in specs])
    lowres = torch.from_numpy(low).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return target, low, lowres, text.float(), mask.bool()


def choose_sr_sampling(data: dict, checkpoint: str) -> dict:
    """What `evaluate` does for an SR stage: sweep (augmentation level, guidance weight) on
    held-out renders, store the best pair with the stage (sampling.json). Returns the pair."""
    from imagen.checkpoint import load_model, save_sampling
    from pipeline.release import sweep

    model, cfg, _ = load_model(checkpoint)
    target, _, lowres, text, mask = held_out_sr(data, cfg, SWEEP_SEED)
    found = sweep.sweep_sr(model, cfg, lowres, target, text, mask, seed=0)
    for row in found.table:
        print(f"  aug {row['lowres_aug']:.2f} guidance {row['guidance_scale']:.1f}: "
              f"PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}")
    save_sampling(checkpoint, found.values, found.record("held-out renders", len(target), 0))
    return found.values


def score(data: dict, checkpoints: list[str], out: str, seeds: int = SEEDS) -> tuple[dict, list[dict], dict]:
    """24 x ``seeds`` (192) guided and unguided cascade samples scored for colour and shape, the
    guided ones again with the fast solver, and the SR stage's PSNR over bicubic on held-out
    references. Returns (metrics, sample records, images)."""
    import numpy as np
    import torch
    from PIL import Image

    from imagen.cascade import Cascade, StageOptions, run_stage, to_uint8
    from imagen.text import open_encoder
    from pipeline.release.evaluate import EvalOptions, prompt_set
    from pipeline.release.metrics import alignment_flags, paired_gain, psnr_ssim, resize

    prompts, specs, palette = prompt_set(EvalOptions(attributes=data["attributes"]))
    cascade = Cascade.from_dirs(checkpoints, encoder=open_encoder(data["encoder"]))
    base_cfg = cascade.stages[0][1]
    guided = base_cfg.diffusion.guidance_scale
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    records, images, metrics, flags = [], {}, {}, {}
    runs = (("guided", StageOptions(guidance_scale=guided)), ("unguided", StageOptions(guidance_scale=1.0)),
            ("guided_fast", StageOptions(guidance_scale=guided, sampler=FAST_SAMPLER, steps=FAST_STEPS)))
    batches = {label: [] for label, _ in runs}
    base_seconds = dict.fromkeys(batches, 0.0)
    # Seed by seed, the three runs in turn: a machine that slows down part-way slows all three
    # alike, so the speedup's ratio of times stays fair. Each run is seeded on its own, so the
    # images do not depend on this order.
    for seed in range(seeds):
        for label, opt in runs:
            run = cascade.run(prompts, seed=seed, options=[opt])
            base_seconds[label] += run.seconds[0]
            batches[label].append(run.images)
            for i, (prompt, img) in enumerate(zip(prompts, run.images, strict=True)):
                path = os.path.join(out, "samples", f"{label}-seed{seed}-{i:02d}.png")
                Image.fromarray(img).save(path)
                records.append({"prompt": prompt, "seed": seed, "index_in_batch": i,
                                "guidance_weight": opt.guidance_scale,
                                "sampler": opt.sampler or base_cfg.diffusion.sampler,
                                "steps": opt.steps or base_cfg.diffusion.sample_steps,
                                "stages": len(checkpoints), "png": os.path.relpath(path, out)})
    for label, _ in runs:
        images[label] = np.stack(batches[label], axis=1)  # [prompt, seed, H, W, 3]
        flat = images[label].reshape(-1, *images[label].shape[2:])
        flags[label] = alignment_flags(flat, [s for s in specs for _ in range(seeds)], palette)
        for what in ("color", "shape", "both"):
            metrics[f"alignment_{what}_{label}"] = float(flags[label][what].mean())
    # guided and unguided samples share prompt and seed (the same starting noise): paired
    paired = paired_gain(flags["guided"]["both"], flags["unguided"]["both"])
    metrics["guidance_gain_both"] = paired["gain"]
    metrics["guidance_gain_p_value"] = paired["p_value"]
    # the fast solver against the default on the same prompts and seeds: the gap and its paired
    # standard error (192 samples resolve about +-0.03)
    gap = np.asarray(flags["guided"]["both"], float) - np.asarray(flags["guided_fast"]["both"], float)
    metrics["fast_gap_both"] = float(gap.mean())
    metrics["fast_gap_stderr"] = float(gap.std(ddof=1) / np.sqrt(len(gap)))
    # the base stage's own sampling time (the SR stage samples the same way in both)
    metrics["sampling_speedup_fast"] = base_seconds["guided"] / base_seconds["guided_fast"]

    # SR on held-out references: new random boxes (not those the sampling was chosen on),
    # drawn at 96 px and brought to 64 px, sampled as the stage now samples (sampling.json)
    sr_model, sr_cfg = cascade.stages[1]
    target, low, lowres, text, mask = held_out_sr(data, sr_cfg, SCORE_SEED)
    with torch.no_grad():
        sr = to_uint8(run_stage(sr_model, sr_cfg, StageOptions(), text, mask, lowres,
                                torch.Generator().manual_seed(0)))
    bicubic = resize(low, sr_cfg.image_size)
    ours, theirs = psnr_ssim(sr, target), psnr_ssim(bicubic, target)
    metrics.update({"sr_psnr_db": ours["psnr"], "bicubic_psnr_db": theirs["psnr"],
                    "sr_psnr_gain_db": ours["psnr"] - theirs["psnr"], "sr_ssim": ours["ssim"],
                    "bicubic_ssim": theirs["ssim"], "sr_guidance_scale": sr_cfg.diffusion.guidance_scale,
                    "sr_lowres_aug": sr_cfg.diffusion.lowres_aug_sample})
    images.update({"sr": sr, "bicubic": bicubic, "sr_target": target, "sr_low": low})
    return metrics, records, images


def draw_grid(prompts: list[str], images: dict, path: str) -> None:
    """One row per prompt, its text under it: guided samples | unguided samples | bicubic | SR."""
    import numpy as np
    from PIL import Image, ImageDraw

    tile, pad, text_h = images["guided"].shape[2], 4, 14
    cols = [("guided", images["guided"][:, s]) for s in range(GRID_SEEDS)] + \
           [("unguided", images["unguided"][:, s]) for s in range(GRID_SEEDS)] + \
           [("bicubic", images["bicubic"]), ("SR", images["sr"])]
    gap = 3 * pad  # between the groups
    width = len(cols) * (tile + pad) + 2 * gap + pad
    head = 16
    height = head + len(prompts) * (tile + text_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    xs, x = [], pad
    for j in range(len(cols)):
        if j in (GRID_SEEDS, 2 * GRID_SEEDS):
            x += gap
        xs.append(x)
        x += tile + pad
    for label, first in (("guided", 0), ("unguided", GRID_SEEDS), ("bicubic", 2 * GRID_SEEDS),
                         ("SR", 2 * GRID_SEEDS + 1)):
        draw.text((xs[first], 2), label, fill=(0, 0, 0))
    for r, prompt in enumerate(prompts):
        y = head + r * (tile + text_h + pad)
        for (_, column), x in zip(cols, xs, strict=True):
            img = np.asarray(column[r])
            if img.shape[0] != tile:
                img = np.asarray(Image.fromarray(img).resize((tile, tile), Image.Resampling.NEAREST))
            canvas.paste(Image.fromarray(img), (x, y))
        draw.text((pad, y + tile + 1), prompt, fill=(40, 40, 40))
    canvas.save(path)


def write_scores(data: dict, out: str, images: dict, records: list[dict]) -> tuple[str, str]:
    """``out/grid.png`` and ``out/samples.json`` of what :func:`score` drew; returns both paths."""
    from pipeline.release.evaluate import EvalOptions, prompt_set

    grid, samples = os.path.join(out, "grid.png"), os.path.join(out, "samples.json")
    draw_grid(prompt_set(EvalOptions(attributes=data["attributes"]))[0], images, grid)
    with open(samples, "w") as f:
        json.dump(records, f, indent=1)
    return grid, samples


def trained_checkpoints(work: str) -> list[str]:
    """The final checkpoint of each stage an earlier run trained under ``work``."""
    import glob

    found = []
    for stage in STAGES:
        finals = sorted(glob.glob(os.path.join(work, "data", "checkpoints", stage, "*", "final")))
        if len(finals) != 1:
            raise SystemExit(f"{work}: expected one trained {stage} (data/checkpoints/{stage}/*/final), found "
                             f"{len(finals)}; run `python infra/demo.py --workdir {work}` first")
        found.append(finals[0])
    return found


def score_only(work: str, seeds: int, t0: float) -> int:
    """``--score-only``: score WORKDIR's trained cascade again with ``seeds`` seeds."""
    tiny = os.path.join(work, "tiny")
    data = {"encoder": os.path.join(tiny, "t5-tiny"), "attributes": os.path.join(tiny, "attributes.json")}
    checkpoints = trained_checkpoints(work)
    out = os.path.join(work, f"scores-seeds{seeds}")
    shutil.rmtree(out, ignore_errors=True)
    log(f"score {', '.join(checkpoints)} with {seeds} seeds per prompt -> {out}")
    metrics, records, images = score(data, checkpoints, out, seeds)
    write_scores(data, out, images, records)
    summary = {**{k: round(v, 4) for k, v in metrics.items()}, "seeds": seeds,
               "minutes": round((time.monotonic() - t0) / 60, 2), "scores": out}
    print(json.dumps(summary))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(REPO, "demo"), help="outputs (default: ./demo)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the plumbing only")
    p.add_argument("--seeds", type=int, default=SEEDS,
                   help=f"samples per prompt and sampler (default {SEEDS}: 192 per figure, which resolve "
                        "a fast-solver gap to about +-0.03; 48 resolve it to about +-0.014)")
    p.add_argument("--score-only", action="store_true",
                   help="score the cascade an earlier run trained in WORKDIR again (no download, training "
                        "or registering), e.g. with more --seeds; writes WORKDIR/scores-seedsN/")
    args = p.parse_args()
    if args.seeds < GRID_SEEDS:
        p.error(f"--seeds must be at least {GRID_SEEDS} (the grid shows {GRID_SEEDS} per prompt)")
    t0 = time.monotonic()
    work = os.path.abspath(args.workdir)
    if args.score_only:
        return score_only(work, args.seeds, t0)
    shutil.rmtree(work, ignore_errors=True)  # a demo starts from nothing
    os.makedirs(work, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{os.path.join(work, 'data', 'mlflow.db')}")

    data = prepare_data(work)
    trained, chosen = train(data, QUICK_STEPS if args.quick else STEPS)
    checkpoints = [trained[s]["checkpoint"] for s in STAGES]
    print(f"sr256 samples with guidance {chosen['guidance_scale']:g} at augmentation level "
          f"{chosen['lowres_aug_sample']:g} (stored in its sampling.json)")

    log("register the cascade")
    from pipeline.release.registry import register

    registered = register(checkpoints, "demo-cascade")
    print(f"registered {registered['uri']} (version {registered['version']})")

    log(f"sample {args.seeds} seeds per prompt, guided, unguided and guided with the fast solver, and score them")
    metrics, records, images = score(data, checkpoints, work, args.seeds)
    grid, samples = write_scores(data, work, images, records)

    import mlflow

    with mlflow.start_run(run_id=registered["run_id"]) if registered.get("run_id") else mlflow.start_run(
            run_name="demo"):
        mlflow.log_metrics({f"demo/{k}": v for k, v in metrics.items()})
        mlflow.log_artifact(grid, "demo")

    minutes = (time.monotonic() - t0) / 60
    summary = {**{k: round(v, 4) for k, v in metrics.items()}, "minutes": round(minutes, 2),
               "samples": samples, "grid": grid, "model": registered["uri"]}
    print(f"""
Demo done in {minutes:.1f} min: {grid}
  colour right in {metrics['alignment_color_guided']:.0%} of guided samples ({metrics['alignment_color_unguided']:.0%} \
unguided), shape in {metrics['alignment_shape_guided']:.0%} ({metrics['alignment_shape_unguided']:.0%} unguided)
  fast solver ({FAST_SAMPLER}, {FAST_STEPS} steps): colour and shape right in \
{metrics['alignment_both_guided_fast']:.0%} of guided samples ({metrics['alignment_both_guided']:.0%} with \
the default sampler), {metrics['sampling_speedup_fast']:.1f}x faster
  SR: {metrics['sr_psnr_db']:.2f} dB PSNR vs {metrics['bicubic_psnr_db']:.2f} dB for bicubic \
({metrics['sr_psnr_gain_db']:+.2f} dB; guidance {metrics['sr_guidance_scale']:g}, augmentation \
level {metrics['sr_lowres_aug']:g})
  MLflow: {os.environ['MLFLOW_TRACKING_URI']} (registered {registered['uri']})""")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
