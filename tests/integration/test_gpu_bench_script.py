"""bench/gpu.sh, the shell wrapper of the one GPU check, as a user runs it (a subprocess)."""

import json
import os
import subprocess

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_the_shell_wrapper_exits_0_without_a_gpu():
    out = subprocess.run([os.path.join(REPO, "bench", "gpu.sh")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["skipped"] == "no CUDA device"
