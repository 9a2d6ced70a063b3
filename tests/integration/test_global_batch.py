"""The global batch over two processes (gloo, torchrun): world 2 with micro-batch 4 and
accumulation 2 learns the same weights as one process with micro-batch 16 (and 4 x 4, in
tests/unit/test_global_batch.py) on the same global batches with per-sample draws."""

from __future__ import annotations

import os
import subprocess
import sys

from safetensors.torch import load_file

from tests.unit.test_global_batch import assert_same_weights, train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}


def test_two_processes_learn_what_one_learns(tmp_path):
    out = tmp_path / "world2.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.unit.test_global_batch", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **LOOPBACK})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    worst = assert_same_weights(train(micro=16), load_file(out))
    print(f"world 2 x micro 4 x accumulation 2 vs world 1 x micro 16: largest weight difference {worst:.2e}")
