"""One training process: what ``python -m pipeline.train`` (and each ``torchrun`` rank) runs.

    python -m pipeline.train --stage base64 --preset tiny --data ROOT/filtered ...   # flags: job.py
    run(job)  ->  {"checkpoint": final weights dir, "step", "loss", "run_id", "stage"}

``run`` joins the process group (when torchrun started it), picks the device and hands the
job to the :class:`~pipeline.train.trainer.Trainer`; ``main`` parses the flags of
:func:`pipeline.train.job.add_arguments` and prints the summary of each node's first process
(local rank 0) as its last line, which is what the launchers (pipeline/train/launch.py) read
back: node 0's is global rank 0's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from pipeline.train import job as train_job
from pipeline.train.job import TrainJob, add_arguments, job_from_args


def run(job: TrainJob) -> dict[str, Any]:
    """Train; returns {"checkpoint": final weights dir, "step", "loss", "run_id", ...}."""
    import torch

    from pipeline.train.parallel import init_distributed, shutdown

    device_type = "cuda" if (job.device or "").startswith("cuda") or (
        job.device is None and torch.cuda.is_available()) else "cpu"
    rank, world, local_rank = init_distributed(device_type)
    device = torch.device(job.device or (f"cuda:{local_rank}" if device_type == "cuda" else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        from pipeline.train.trainer import Trainer

        return Trainer(job, rank, world, device).fit()
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``torchrun -m pipeline.train`` / ``python -m pipeline.train``."""
    p = argparse.ArgumentParser(prog="pipeline.train", description=train_job.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(job_from_args(p.parse_args(argv)))
    # the first process of each node prints its own summary (the others' would interleave):
    # node 0's is the job's (run_id), another node's reports its own weights' checksums
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(json.dumps(result))

