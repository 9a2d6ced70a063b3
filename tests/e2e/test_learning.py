"""The model library learns text-to-image, and classifier-free guidance makes it follow the
prompt more: the tiny base stage, trained for a few minutes on 240 tiny synthetic images, draws
the colour and the shape it is asked for far more often than chance, and more often with
guidance than without.

Everything runs through the production path: `python -m pipeline.train` on the filtered shards
and their T5 embeddings, the trained checkpoint loaded into a `Cascade` with the same encoder,
and the deterministic checker of pipeline/release/metrics.py (tested on known images in
tests/unit/test_metrics.py), which reads each sample's dominant colour against the palette and
its shape from the foreground's outline. Prompts are evaluate's tiny-data set (8 colours x 3
shapes), SEEDS samples each, with and without guidance.

Guided and unguided samples of one prompt and seed start from the same noise, so they are
compared in pairs: the exact one-sided McNemar test asks whether guidance fixes more samples
than it breaks (metrics.paired_gain). That is far more sensitive than comparing two rates.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# The demo's base stage: 2000 steps on the demo's 240 images. Shape is learned late, and the
# shared fixtures' 120 images are too few for guidance to help reliably. Measured, guided shape
# and guidance's paired gain on colour and shape together (192 samples):
# - 120 images, 1500 steps: 0.41 and 0.44 (training seed 0, two data layouts): not yet learned;
# - 120 images, 2500 steps, six training runs: shape 0.74-0.96, but in one run (the shared
#   fixtures' layout, seed 0) guidance fixed 22 samples and broke 23;
# - 240 images, 2000 steps, training seeds 0/1/2: shape 0.76/0.81/0.57, guidance fixed 42/36/47
#   and broke 6/8/18 (p = 5e-8/1e-5/2e-4). This test runs seed 0.
N_IMAGES = 240
STEPS = 2000  # ~5 min at ~110 img/s (tiny preset, batch 16, 2 idle cores)
SEEDS = 8  # 24 prompts x 8 seeds = 192 samples per guidance weight, as `make demo` scores


def build_learning_data(work: str, encoder_dir: str) -> dict:
    """The demo's tiny dataset (240 images), served on loopback, downloaded, filtered and
    embedded as the shared fixtures do it: {"filtered", "embeddings", "attributes"}."""
    from pipeline.data.download import download
    from pipeline.data.embed import embed_shards
    from pipeline.data.filters import filter_shards, stage_config
    from pipeline.dev.tinydata import make_tiny_dataset, serve
    from tests.tinychain import RAW_DOWNLOAD_KWARGS, TINY_PRESETS, TINY_ROWS_PER_SHARD

    tiny = os.path.join(work, "tiny")
    os.makedirs(tiny, exist_ok=True)
    server = serve(tiny, 0)
    try:
        info = make_tiny_dataset(tiny, n=N_IMAGES, seed=0, port=server.server_address[1])
        download(info["urls"], os.path.join(work, "raw"), **RAW_DOWNLOAD_KWARGS)
    finally:
        server.shutdown()
        server.server_close()
    filtered = os.path.join(work, "filtered")
    # all 240 images train, no held-out split: the figures below were measured on all of them
    # (the split and the validation loss are the smoke test's and test_promotion_dag's)
    filter_shards(os.path.join(work, "raw"), filtered, stage_config(TINY_PRESETS, val_fraction=0),
                  samples_per_shard=TINY_ROWS_PER_SHARD)
    embeddings = embed_shards(filtered, os.path.join(work, "embeddings"), encoder_dir)["output"]
    return {"filtered": filtered, "embeddings": embeddings, "attributes": os.path.join(tiny, "attributes.json")}


@pytest.mark.timeout(2400)  # ~6.5 min on 2 idle cores; more when the machine is shared
def test_tiny_base_follows_colour_and_shape_prompts_and_guidance_helps(tiny_encoder_dir, tmp_path):
    from imagen.cascade import Cascade, StageOptions
    from imagen.text import T5TextEncoder
    from pipeline.release.evaluate import EvalOptions, prompt_set
    from pipeline.release.metrics import alignment_flags, paired_gain

    data = build_learning_data(str(tmp_path / "data"), tiny_encoder_dir)
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "base64", "--preset", "tiny",
           "--data", data["filtered"], "--embeddings", data["embeddings"], "--checkpoint-dir", str(ckpt),
           "--max-steps", str(STEPS), "--global-batch", "16", "--log-every", "100",
           "--checkpoint-every", "100000", "--sample-every", "0", "--tracking-uri", "off"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2100, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == STEPS

    prompts, specs, palette = prompt_set(EvalOptions(attributes=data["attributes"]))
    cascade = Cascade.from_dirs([str(ckpt / "final")], encoder=T5TextEncoder(tiny_encoder_dir))
    flags = {}
    for label, weight in (("guided", None), ("unguided", 1.0)):  # None: the config's weight (3.0)
        images = np.concatenate([cascade.generate(prompts, seed=seed, options=[StageOptions(guidance_scale=weight)])
                                 for seed in range(SEEDS)])
        flags[label] = alignment_flags(images, specs * SEEDS, palette)
    rates = {label: {k: round(float(v.mean()), 3) for k, v in f.items()} for label, f in flags.items()}
    paired = paired_gain(flags["guided"]["both"], flags["unguided"]["both"])
    print(f"learning ({STEPS} steps, {len(specs) * SEEDS} samples per weight): guided {rates['guided']}, "
          f"unguided {rates['unguided']}; on colour and shape together guidance fixes {paired['wins']} "
          f"and breaks {paired['losses']} (p = {paired['p_value']:.2g})")
    assert (len(palette), len({s for _, s in specs})) == (8, 3)
    # Chance is 1/8 for colour and 1/3 for shape. Under chance, 192 samples reach 96 right
    # colours (4x chance) with probability below 1e-30, and 96 right shapes (1.5x chance)
    # below 2e-6. Measured, training seeds 0/1/2: guided colour 0.94/0.99/0.98 (unguided
    # 0.79/0.94/0.94), guided shape 0.76/0.81/0.57 (unguided 0.66/0.68/0.42).
    assert rates["guided"]["color"] >= 0.5, rates
    assert rates["guided"]["shape"] >= 0.5, rates
    # Guidance helps: on the same prompts and starting noise it fixes significantly more
    # samples (colour and shape both right) than it breaks (figures above).
    assert paired["gain"] > 0 and paired["p_value"] < 0.01, paired
