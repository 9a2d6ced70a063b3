"""The model library learns text-to-image, and classifier-free guidance makes it follow the
prompt more: the tiny base stage, trained for a few minutes on the tiny synthetic dataset, draws
the colour it is asked for far more often than chance, and more often with guidance than
without. Shape is measured and printed; at this scale it is not yet learned (see the end).

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

STEPS = 1500  # ~4-6 min at 70-110 img/s (tiny preset, batch 16, 2 idle cores)
SEEDS = 4  # 24 prompts x 4 seeds = 96 samples per guidance weight


@pytest.mark.timeout(1800)  # ~6 min on 2 idle cores; more when the machine is shared
def test_tiny_base_follows_colour_prompts_and_guidance_helps(filtered_shards, tiny_embeddings, tiny_dataset,
                                                               tiny_encoder_dir, tmp_path):
    from imagen.cascade import Cascade, StageOptions
    from imagen.text import T5TextEncoder
    from pipeline.release.evaluate import EvalOptions, prompt_set
    from pipeline.release.metrics import alignment_flags, paired_gain

    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "base64", "--preset", "tiny",
           "--data", filtered_shards, "--embeddings", tiny_embeddings, "--checkpoint-dir", str(ckpt),
           "--max-steps", str(STEPS), "--batch-size", "16", "--log-every", "100",
           "--checkpoint-every", "100000", "--sample-every", "0", "--tracking-uri", "off"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == STEPS

    prompts, specs, palette = prompt_set(EvalOptions(attributes=os.path.join(tiny_dataset.root,
                                                                             "attributes.json")))
    cascade = Cascade.from_dirs([str(ckpt / "final")], encoder=T5TextEncoder(tiny_encoder_dir))
    flags = {}
    for label, weight in (("guided", None), ("unguided", 1.0)):  # None: the config's weight (3.0)
        images = np.concatenate([cascade.generate(prompts, seed=seed, options=[StageOptions(guidance_scale=weight)])
                                 for seed in range(SEEDS)])
        flags[label] = alignment_flags(images, specs * SEEDS, palette)
    rates = {label: {k: round(float(v.mean()), 3) for k, v in f.items()} for label, f in flags.items()}
    paired = paired_gain(flags["guided"]["both"], flags["unguided"]["both"])  # reported
    print(f"learning ({STEPS} steps, {len(specs) * SEEDS} samples per weight): guided {rates['guided']}, "
          f"unguided {rates['unguided']}; guidance fixes {paired['wins']} and breaks {paired['losses']} "
          f"(p = {paired['p_value']:.2g})")
    assert (len(palette), len({s for _, s in specs})) == (8, 3)
    # Chance is 1/8 for colour. Under chance, 96 samples reach 48 right colours (4x chance)
    # with probability 6e-19. Measured here at 1500 steps: 0.958 guided, 0.844 unguided.
    assert rates["guided"]["color"] >= 0.5, rates
    # Guidance helps: on the same prompts and starting noise it fixes significantly more
    # colours than it breaks (measured: 11 fixed, 0 broken, p = 5e-4).
    colour = paired_gain(flags["guided"]["color"], flags["unguided"]["color"])
    assert colour["gain"] > 0 and colour["p_value"] < 0.01, colour
    # Shape is reported, not asserted: at this scale (1500 steps on 120 images) it is still
    # near chance (measured 0.41 guided, 0.44 unguided; chance 1/3). `make demo` (2000 steps on
    # 240 images) reaches 0.86 guided, 0.62 unguided.
