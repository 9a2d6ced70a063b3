"""One training process: what ``python -m pipeline.train`` (and each ``torchrun`` rank) runs.

    python -m pipeline.train --stage base64 --preset tiny --data ROOT/filtered ...   # flags: job.py
    run(job)  ->  {"checkpoint": final weights dir, "step", "loss", "run_id", "stage"}

``run`` joins the process group (when torchrun started it), picks the device and hands the
job to the :class:`~pipeline.train.trainer.Trainer`; ``main`` parses the flags of
:func:`pipeline.train.job.add_arguments` and prints the summary of each node's first process
(local rank 0) as its last line, which is what the launchers (pipeline/train/launch.py) read
back: node 0's is global rank 0's. Stopped by SIGINT/SIGTERM, it prints that summary with
``"stopped": true`` (pipeline/train/stopping.py) and exits 130 (0 under torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pipeline.train import job as train_job
from pipeline.train.job import TrainJob, add_arguments, job_from_args
from pipeline.train.stopping import EXIT_STOPPED, TrainingStopped, resume_command


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
    from pipeline import logs

    logs.setup()  # information on stdout, warnings and errors on stderr (an Airflow task's ERROR lines)
    args = sys.argv[1:] if argv is None else argv
    job = job_from_args(p.parse_args(args))
    first_of_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    try:
        result = run(job)
    except TrainingStopped as e:  # a signal: checkpointed at a step boundary (stopping.py)
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        if first_of_node:
            if not under_torchrun:  # under torchrun the launcher (or its user) says how to resume
                e.summary["resume"] = resume_command(f"{sys.executable} -m pipeline.train", args)
                print(e.line(), file=sys.stderr, flush=True)
            print(json.dumps(e.summary), flush=True)
        # torchrun reports a non-zero worker as a failure (a page of output): there the summary
        # says "stopped", and the launcher reading it exits 130
        sys.exit(0 if under_torchrun else EXIT_STOPPED)
    # the first process of each node prints its own summary (the others' would interleave):
    # node 0's is the job's (run_id), another node's reports its own weights' checksums
    if first_of_node:
        print(json.dumps(result))

