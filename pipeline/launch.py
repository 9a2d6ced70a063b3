"""Run heavy steps as subprocesses with their output streamed live (into the Airflow task log
when called from a task), and a failure that carries the last lines of the child's output.

    run_streaming([sys.executable, "-m", "pipeline.train", ...])
    torchrun_train(["--stage", "base64", ...], nproc_per_node=2)

Keeping img2dataset and training out of the caller's process keeps spawn-based
multiprocessing, DataLoader workers and torch threads out of the Airflow task process, and
is the same command a Kubernetes job runs.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from typing import Any


def run_streaming(cmd: list[str], env: dict[str, str] | None = None, tail: int = 40) -> list[str]:
    """Run ``cmd``, echo its output line by line, return the last ``tail`` lines; raise
    RuntimeError with those lines if it exits non-zero."""
    last: collections.deque[str] = collections.deque(maxlen=tail)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        last.append(line.rstrip("\n"))
    code = proc.wait()
    if code != 0:
        joined = "\n".join(last)
        raise RuntimeError(f"{os.path.basename(cmd[0])} {' '.join(cmd[1:3])} ... exited with {code}; "
                           f"last output:\n{joined}")
    return list(last)


def last_json(lines: list[str]) -> dict[str, Any]:
    """The JSON summary a verb prints as its last line."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("the child process printed no JSON summary; see its output above")


def torchrun_train(train_args: list[str], nproc_per_node: int = 1) -> dict[str, Any]:
    """``torchrun --standalone`` over ``python -m pipeline.train``; returns rank 0's summary."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc_per_node}", "-m", "pipeline.train", *train_args]
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if nproc_per_node > 1 else {}
    return last_json(run_streaming(cmd, env=env))


def train_subprocess(train_args: list[str], nproc_per_node: int = 1) -> dict[str, Any]:
    """Single process without torchrun, or torchrun for several."""
    if nproc_per_node > 1:
        return torchrun_train(train_args, nproc_per_node)
    return last_json(run_streaming([sys.executable, "-m", "pipeline.train", *train_args]))
