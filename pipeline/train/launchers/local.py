"""The ``local`` launcher: ``torchrun`` (or one plain ``python -m pipeline.train``) on this machine.

    from pipeline.train.launchers.local import LocalLauncher
    LocalLauncher().launch(job, nodes=1, procs_per_node=2)

The trainer runs as a subprocess whose output streams line by line (into the Airflow task log
when called from a task); a failure raises with the trainer's last lines. Keeping training out
of the caller's process keeps DataLoader workers and torch threads out of the Airflow task
process. ``nodes > 1`` starts that many torchrun agents on this machine, as the nodes of one
job (pipeline/train/torchrun.py). It refuses more processes (``nodes x procs_per_node``) than
this machine has devices (CUDA devices, else CPU cores) unless ``IMAGEN_LOCAL_MAX_PROCESSES`` in
the environment of the launching process, or ``LocalLauncher(max_processes=N)``, allows more.

Options: none from a trigger form (``OPTION_SCHEMA`` is empty); ``in_process``, ``runner`` and
``max_processes`` are for Python callers (the CLI, tests). The helpers below are also the CLI's
``train --nnodes`` road (:func:`train_node`).

SIGINT/SIGTERM while a trainer subprocess runs is passed on to its workers (torchrun's too), which
checkpoint at a step boundary and stop; the launch then raises
:class:`~pipeline.train.stopping.TrainingStopped` (pipeline/train/stopping.py).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.proc import run_streaming

if TYPE_CHECKING:
    from pipeline.train.job import TrainJob
    from pipeline.train.torchrun import Torchrun


def last_json(lines: list[str]) -> dict[str, Any]:
    """The JSON summary a trainer prints as its last line; TrainingStopped when it says the
    trainer stopped on a signal (pipeline/train/stopping.py), so no caller takes it for a
    finished run."""
    from pipeline.train.stopping import TrainingStopped

    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            summary = json.loads(line)
            if summary.get("stopped"):
                raise TrainingStopped(summary)
            return summary
    raise RuntimeError("the child process printed no JSON summary; see its output above")


def torchrun_train(train_args: list[str], nproc_per_node: int = 1, max_processes: int | None = None) -> dict[str, Any]:
    """``torchrun --standalone`` over ``python -m pipeline.train``; returns rank 0's summary.
    Refuses more processes than this machine has devices (see :class:`LocalLauncher`)."""
    from pipeline.train.torchrun import Torchrun, check_local_processes, device_of, torchrun_command

    check_local_processes(1, nproc_per_node, device_of(train_args), max_processes)
    cmd = torchrun_command(Torchrun(1, nproc_per_node, standalone=True), train_args)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if nproc_per_node > 1 else {}
    return last_json(run_streaming(cmd, env=env, forward_signals=True))


def train_subprocess(train_args: list[str], nproc_per_node: int = 1, max_processes: int | None = None
                     ) -> dict[str, Any]:
    """Single process without torchrun, or torchrun for several."""
    if nproc_per_node > 1:
        return torchrun_train(train_args, nproc_per_node, max_processes)
    return last_json(run_streaming([sys.executable, "-m", "pipeline.train", *train_args], forward_signals=True))


def train_node(train_args: list[str], spec: Torchrun, max_processes: int | None = None) -> dict[str, Any]:
    """This machine's node of a multi-node job (``imagen-pipeline train --nnodes N --node-rank R
    --master-addr HOST``): one torchrun agent, killed with its workers if this call is stopped;
    returns the summary this node's first process prints. Its ``nproc_per_node`` processes
    must fit this machine's devices (see :class:`LocalLauncher`)."""
    from pipeline.train.torchrun import (
        check_local_processes,
        device_of,
        run_agents,
        torchrun_command,
    )

    check_local_processes(1, spec.nproc_per_node, device_of(train_args), max_processes)
    (lines,) = run_agents([torchrun_command(spec, train_args)])
    return last_json(lines)


def train_local_nodes(train_args: list[str], nodes: int, procs_per_node: int,
                      runner: Callable[..., list[list[str]]] | None = None,
                      max_processes: int | None = None) -> dict[str, Any]:
    """``nodes`` torchrun agents on this machine as the nodes of one job (127.0.0.1, a free
    port, node ranks 0..nodes-1, each with its own GPUs); waits for all, kills every agent's
    process group when one fails, and returns node 0's summary (global rank 0's). Refuses
    more processes than this machine has devices (see :class:`LocalLauncher`)."""
    from pipeline.train.torchrun import (
        check_local_processes,
        device_of,
        local_node_commands,
        local_node_envs,
        run_agents,
    )

    check_local_processes(nodes, procs_per_node, device_of(train_args), max_processes)
    cmds = local_node_commands(train_args, nodes, procs_per_node)
    lines = (runner or run_agents)(cmds, local_node_envs(nodes, procs_per_node, os.environ))
    return last_json(lines[0])


class LocalLauncher:
    """``torchrun`` on this machine: ``--standalone`` for one node, and for ``nodes > 1`` that
    many agents, one per node, meeting on 127.0.0.1 (tests, a workstation with several GPUs:
    agent ``i`` gets GPUs ``i*procs_per_node ..``). For nodes on several machines, use the
    ``kubernetes`` launcher, or ``imagen-pipeline train --nnodes`` on each machine.

    ``in_process=True`` (the CLI's ``train`` verb; never a trigger-form option) trains a
    one-process job in the caller's process instead of a child ``python -m pipeline.train``;
    several processes always run under torchrun. ``runner`` (tests) replaces
    :func:`pipeline.train.torchrun.run_agents` for several nodes.

    ``nodes x procs_per_node`` processes all run here, so at most one per device: the visible
    CUDA devices, or the CPU cores for a CPU job or a machine without GPUs. More is refused
    before anything starts, unless ``max_processes=N`` (Python only, not a trigger-form option)
    or ``IMAGEN_LOCAL_MAX_PROCESSES=N`` in the environment of the launching process (the
    deployment's Airflow workers, or the shell of ``imagen-pipeline train``) allows N.
    """

    # What a trigger form may set: nothing (the machine's own devices decide; see above).
    OPTION_SCHEMA: dict[str, dict[str, Any]] = {}

    def __init__(self, *, in_process: bool = False, runner: Callable[..., list[list[str]]] | None = None,
                 max_processes: int | None = None):
        self.in_process = in_process
        self.runner = runner
        self.max_processes = max_processes

    def launch(self, job: TrainJob, nodes: int, procs_per_node: int) -> dict[str, Any]:
        from pipeline.train.job import job_to_argv
        from pipeline.train.torchrun import check_local_processes

        if nodes < 1 or procs_per_node < 1:
            raise ValueError(f"nodes and procs_per_node must be at least 1, got {nodes} and {procs_per_node}")
        check_local_processes(nodes, procs_per_node, job.device, self.max_processes)
        checked = nodes * procs_per_node  # passed on as the limit: no second count of the devices
        if nodes > 1:
            return train_local_nodes(job_to_argv(job), nodes, procs_per_node, self.runner, max_processes=checked)
        if self.in_process and procs_per_node == 1:
            from pipeline.train.worker import run

            return run(job)
        return train_subprocess(job_to_argv(job), procs_per_node, max_processes=checked)
