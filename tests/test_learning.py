"""The model library learns: the tiny base stage, trained for a few minutes on the tiny synthetic
dataset, draws the colour it is asked for far more often than chance when sampled with
classifier-free guidance.

Everything runs through the production path: `python -m pipeline.train` on the filtered shards
and their T5 embeddings, then `pipeline.evaluate.evaluate`, whose deterministic checker
(pipeline/metrics.py) reads the dominant colour of each sample against the palette of
attributes.json. One prompt per colour x shape: 24 samples, 8 colours, chance 1/8.
"""

import json
import os
import subprocess
import sys

import pytest

STEPS = 600  # ~2.5 min at ~63 img/s (bench/train.py, tiny preset, batch 16, 2 cores)


@pytest.mark.slow
def test_tiny_base_follows_colour_prompts_with_guidance(filtered_shards, tiny_embeddings, tiny_dataset,
                                                        tmp_path):
    from pipeline.evaluate import evaluate

    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "base64", "--preset", "tiny",
           "--data", filtered_shards, "--embeddings", tiny_embeddings, "--checkpoint-dir", str(ckpt),
           "--max-steps", str(STEPS), "--batch-size", "16", "--log-every", "100",
           "--checkpoint-every", "100000", "--sample-every", "0", "--tracking-uri", "off"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == STEPS

    out = evaluate(str(ckpt / "final"), attributes=os.path.join(tiny_dataset.root, "attributes.json"),
                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", output=str(tmp_path / "eval"))
    m = out["metrics"]
    print("learning:", {k: m[k] for k in ("alignment_color_guided", "alignment_color_unguided",
                                          "alignment_guided", "chance_alignment_color")})
    chance = m["chance_alignment_color"]
    assert chance == pytest.approx(1 / 8)
    # Under chance, 24 samples reach >= 9 right with probability ~0.3%; measured here: see the
    # note on issue 5 (guided well above this bar, and above the unguided samples).
    assert m["alignment_color_guided"] >= 3 * chance, m
    assert m["alignment_color_guided"] > m["alignment_color_unguided"], m
