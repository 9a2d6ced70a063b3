"""The model library learns: the tiny base stage, trained for a few minutes on the tiny synthetic
dataset, draws the colour it is asked for far more often than chance when sampled with
classifier-free guidance.

Everything runs through the production path: `python -m pipeline.train` on the filtered shards
and their T5 embeddings, the trained checkpoint loaded into a `Cascade` with the same encoder,
and the deterministic checker of pipeline/metrics.py, which reads the dominant colour of each
sample against the palette of attributes.json. Prompts are evaluate's tiny-data set (one per
colour x shape), three samples each: 72 samples, 8 colours, chance 1/8.
"""

import json
import os
import subprocess
import sys

import pytest

STEPS = 600  # ~2.5-3 min at 50-63 img/s (bench/train.py, tiny preset, batch 16, 2 cores)
REPEATS = 3


@pytest.mark.slow
def test_tiny_base_follows_colour_prompts_with_guidance(filtered_shards, tiny_embeddings, tiny_dataset,
                                                        tiny_encoder_dir, tmp_path):
    from imagen.cascade import Cascade, StageOptions
    from imagen.text import T5TextEncoder
    from pipeline.evaluate import EvalOptions, prompt_set
    from pipeline.metrics import alignment

    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "base64", "--preset", "tiny",
           "--data", filtered_shards, "--embeddings", tiny_embeddings, "--checkpoint-dir", str(ckpt),
           "--max-steps", str(STEPS), "--batch-size", "16", "--log-every", "100",
           "--checkpoint-every", "100000", "--sample-every", "0", "--tracking-uri", "off"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == STEPS

    prompts, specs, palette = prompt_set(EvalOptions(attributes=os.path.join(tiny_dataset.root,
                                                                             "attributes.json")))
    cascade = Cascade.from_dirs([str(ckpt / "final")], encoder=T5TextEncoder(tiny_encoder_dir))
    rates = {}
    for label, weight in (("guided", None), ("unguided", 1.0)):  # None: the config's weight (3.0)
        images = cascade.generate(prompts * REPEATS, seed=0, options=[StageOptions(guidance_scale=weight)])
        rates[label] = alignment(images, specs * REPEATS, palette)["color"]
    chance = 1 / len(palette)
    print(f"learning: colour matches the prompt in {rates['guided']:.3f} of guided samples, "
          f"{rates['unguided']:.3f} unguided, chance {chance:.3f}")
    assert len(palette) == 8
    # Under chance (p = 1/8), 72 samples reach 27 right (3x chance) with probability < 1e-7.
    # Measured here: see the note on issue 5.
    assert rates["guided"] >= 3 * chance, rates
