"""Issue 24 item 1 through the CLI: a config.json widened from 32 to 1024 channels is refused by
`sample` and `evaluate` at no more memory than a config.json refused for a wrong type.

Before, the U-Net was built and initialised on the CPU before the weight shapes were checked:
`sample` peaked at 1.5 GB at 512 channels and 4.7 GB at 1024 (0.55 GB normally). Each run here is
one fresh interpreter calling the CLI's ``main()`` per case and printing its peak resident size.
"""

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from imagen.checkpoint import save_weights
from imagen.config import preset
from imagen.unet import UNet

DRIVER = r"""
import json, os, resource, sys, tempfile
from pipeline.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        out.append((code, err.read().decode(errors="replace")))
print(json.dumps({"results": out, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _stage(path: str, edit=None) -> str:
    cfg = preset("tiny", "base64")
    torch.manual_seed(0)
    state = UNet(cfg.unet).state_dict()
    save_weights(path, state, cfg, ema=state, metadata={"step": 1})
    if edit is not None:
        with open(os.path.join(path, "config.json")) as f:
            doc = json.load(f)
        edit(doc)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(doc, f)
    return path


def _run(argvs) -> tuple[list, int]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc["results"], doc["maxrss_kb"] * (1 if sys.platform != "darwin" else 1 / 1024)


@pytest.mark.skipif(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss <= 0, reason="no peak-RSS accounting")
def test_a_widened_config_is_refused_without_building_it(tmp_path):
    def wrong_type(doc):
        doc["image_size"] = "big"

    def widen(doc):
        doc["unet"]["channels"] = 1024

    bad, wide = _stage(str(tmp_path / "bad"), wrong_type), _stage(str(tmp_path / "wide"), widen)
    out = ["--output", str(tmp_path / "out")]

    def argvs(ckpt):
        return [["sample", "a red circle", "--no-progress", "--steps", "1", *out, "--model", ckpt],
                ["evaluate", "--steps", "1", *out, "--checkpoint", ckpt]]

    baseline, base_kb = _run(argvs(bad))
    results, wide_kb = _run(argvs(wide))
    assert [code for code, _ in baseline] == [2, 2]
    for (code, err), verb in zip(results, ("sample", "evaluate"), strict=True):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"imagen-pipeline {verb}: error: {os.path.join(wide, 'ema.safetensors')} "
                                   "does not fit its config.json"), lines
    # the widened U-Net would hold about 1.1 GB of float32 parameters (4.7 GB peak before the fix)
    assert wide_kb - base_kb < 300 * 1024, f"peak {wide_kb / 1024:.0f} MB against {base_kb / 1024:.0f} MB"
