"""The ``torchrun`` command line, built in one place for every launcher, and local node agents.

    spec = Torchrun(nnodes=2, nproc_per_node=8, node_rank=1, master_addr="10.0.0.5", master_port=29500)
    torchrun_command(spec, job_to_argv(job))
    # [python, -m, torch.distributed.run, --nnodes=2, --nproc-per-node=8, --node-rank=1,
    #  --master-addr=10.0.0.5, --master-port=29500, -m, pipeline.train, --stage, ...]

Multi-node jobs use torchrun's *static* rendezvous: every node runs the same command except
``--node-rank``, node 0 hosts the rendezvous store at ``--master-addr:--master-port``, and the
global rank of a process is ``node_rank * nproc_per_node + local_rank``, the same on every
restart. Checkpoints keep one RNG file per global rank (pipeline/train/checkpointing.py), so a
node that restarts with its node rank gets back its processes' random streams and data shards.

Who fills what:

- ``imagen-pipeline train --nnodes N --node-rank R --master-addr HOST --master-port P`` (pipeline/cli.py)
  passes all of them; one node of N, started by hand or by a scheduler on each machine.
- the local launcher with ``nodes > 1`` starts N agents on this machine (127.0.0.1, a free
  port, node ranks 0..N-1), each in its own process group (:func:`run_agents`).
- the Kubernetes launcher renders ``--nnodes`` and ``--nproc-per-node`` and leaves
  ``None`` for the per-pod values (node rank, master address and port): Kubeflow Trainer's
  torch runtime sets ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` on every
  pod, and torchrun reads ``PET_<FLAG>`` for any flag that is not on its command line.

A single-node local job uses ``--standalone`` (torchrun picks a free port itself).

Every process started on this machine needs a device of its own: the local launcher and
``imagen-pipeline train`` refuse more processes than :func:`local_process_limit` gives (the
visible CUDA devices when there are any, else the CPU cores), in one line that says what to pass
(:func:`check_local_processes`). ``IMAGEN_LOCAL_MAX_PROCESSES=N`` in the environment of the
launching process (the Airflow workers', or the shell's) sets another limit, e.g. to run more
CPU processes than cores on purpose; a trigger form cannot set it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

# process_groups: every process group under an agent (its workers')
from pipeline.proc import forwarding_signals, process_groups

LOCAL_PROGRAM = (sys.executable, "-m", "torch.distributed.run")  # this interpreter's torchrun
CLUSTER_PROGRAM = ("torchrun",)  # the image's torchrun (infra/Dockerfile)
TRAIN_MODULE = ("-m", "pipeline.train")
MAX_PROCESSES_ENV = "IMAGEN_LOCAL_MAX_PROCESSES"  # the deployment's limit, instead of the device count


@dataclasses.dataclass(frozen=True)
class Torchrun:
    """torchrun's settings. ``None``: not on the command line (Kubernetes sets ``PET_*``)."""

    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    standalone: bool = False  # one node, rendezvous on a free local port

    def __post_init__(self):
        if self.nnodes < 1 or self.nproc_per_node < 1:
            raise ValueError(f"nnodes and nproc_per_node must be at least 1, got {self.nnodes} and "
                             f"{self.nproc_per_node}")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} is not in [0, --nnodes {self.nnodes})")
        if self.standalone and (self.nnodes != 1 or self.master_addr or self.master_port):
            raise ValueError("a standalone torchrun is one node with its own rendezvous: "
                             "no --nnodes > 1, --master-addr or --master-port")


def torchrun_flags(spec: Torchrun) -> list[str]:
    """torchrun's own flags for ``spec`` (those before ``-m pipeline.train``)."""
    flags = [f"--nnodes={spec.nnodes}", f"--nproc-per-node={spec.nproc_per_node}"]
    if spec.standalone:
        flags.append("--standalone")
    for name in ("node_rank", "master_addr", "master_port"):
        value = getattr(spec, name)
        if value is not None:
            flags.append(f"--{name.replace('_', '-')}={value}")
    return flags


def torchrun_command(spec: Torchrun, train_args: list[str],
                     program: tuple[str, ...] = LOCAL_PROGRAM) -> list[str]:
    """The whole command: ``program`` (torchrun), its flags, ``-m pipeline.train`` and the
    job's flags (:func:`pipeline.train.job.job_to_argv`). Every launcher builds it here."""
    return [*program, *torchrun_flags(spec), *TRAIN_MODULE, *train_args]


def cuda_device_count() -> int:
    """CUDA devices visible to this process (``CUDA_VISIBLE_DEVICES`` applies); 0 without any."""
    import torch  # deferred: only a launch of several processes asks

    return torch.cuda.device_count()


def local_process_limit(device: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """How many training processes this machine can run, and why, in words (``"has 2 CUDA device(s)"``).

    ``IMAGEN_LOCAL_MAX_PROCESSES`` when set; else one per visible CUDA device when there are
    any (unless the job trains on ``device="cpu"``); else one per CPU core (``os.cpu_count()``).
    """
    env = os.environ if environ is None else environ
    told = env.get(MAX_PROCESSES_ENV, "").strip()
    if told:
        if not (told.isascii() and told.isdigit()) or int(told) < 1:
            raise ValueError(f"{MAX_PROCESSES_ENV}={told!r}: set it to a whole number of processes (>= 1), or "
                             "unset it to allow one process per device of this machine")
        return int(told), f"is limited to {int(told)} by {MAX_PROCESSES_ENV}={told}"
    if device != "cpu":
        gpus = cuda_device_count()
        if gpus:
            return gpus, f"has {gpus} CUDA device(s)"
    cores = os.cpu_count() or 1
    return cores, f"has {cores} CPU core(s)"


def check_local_processes(nodes: int, procs_per_node: int, device: str | None = None,
                          max_processes: int | None = None) -> None:
    """Refuse to start ``nodes x procs_per_node`` training processes on this machine when that
    is more than :func:`local_process_limit` (or ``max_processes``, when given) allows."""
    count = nodes * procs_per_node
    if count <= 1:
        return  # one process always has a device: this machine's CPU, if nothing else
    if max_processes is not None:
        limit, why = max_processes, f"is limited to {max_processes} by its caller (max_processes)"
    else:
        limit, why = local_process_limit(device)
    if count > limit:
        raise ValueError(f"{nodes} node(s) x {procs_per_node} process(es) per node = {count} training processes "
                         f"on this machine, which {why}: ask for at most {limit} (the trigger form's nodes x "
                         "gpus_per_node, the CLI's --nproc-per-node), use the kubernetes launcher for more "
                         f"machines, or set {MAX_PROCESSES_ENV}={count} in the launching process's environment "
                         "to start them anyway")


def device_of(train_args: list[str]) -> str | None:
    """The job's ``--device`` in its command line (:func:`pipeline.train.job.job_to_argv`), if any."""
    for i, arg in enumerate(train_args):
        if arg == "--device" and i + 1 < len(train_args):
            return train_args[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the local launcher's rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_node_commands(train_args: list[str], nodes: int, procs_per_node: int,
                        port: int | None = None) -> list[list[str]]:
    """One torchrun agent per node, all on this machine: node ranks 0..nodes-1 meet at
    127.0.0.1:``port`` (a free one by default)."""
    port = port or free_port()
    return [torchrun_command(Torchrun(nodes, procs_per_node, node_rank=i, master_addr="127.0.0.1",
                                      master_port=port), train_args) for i in range(nodes)]


def local_node_envs(nodes: int, procs_per_node: int, environ: Mapping[str, str]) -> list[dict[str, str]]:
    """Each local agent's environment: its own GPUs (the agents' local ranks all count from 0,
    so agent ``i`` sees devices ``i*procs_per_node ..`` of ``CUDA_VISIBLE_DEVICES``, or of
    0..nodes*procs_per_node-1 when it is unset), and one thread per process unless set."""
    base = dict(environ)
    base.setdefault("OMP_NUM_THREADS", "1")
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return [dict(base) for _ in range(nodes)]  # GPUs hidden on purpose: CPU training
    devices = ([d.strip() for d in visible.split(",") if d.strip()] if visible is not None
               else [str(i) for i in range(nodes * procs_per_node)])
    if len(devices) < nodes * procs_per_node:
        raise ValueError(f"CUDA_VISIBLE_DEVICES lists {len(devices)} devices but {nodes} local nodes x "
                         f"{procs_per_node} processes need {nodes * procs_per_node}")
    return [{**base, "CUDA_VISIBLE_DEVICES": ",".join(devices[i * procs_per_node:(i + 1) * procs_per_node])}
            for i in range(nodes)]


def _pump(stream, prefix: str, last: collections.deque) -> None:
    for line in stream:
        print(prefix + line, end="", flush=True)
        last.append(line.rstrip("\n"))


def _stop(procs: list[Any], killpg: Callable[[int, int], None],
          groups: Callable[[int], set[int]]) -> None:
    """SIGKILL every process group of each agent still running: its own, its workers' and
    theirs (DataLoader workers)."""
    for p in procs:
        if p.poll() is None:
            for group in sorted(groups(p.pid)):
                with contextlib.suppress(ProcessLookupError, PermissionError):  # exited since
                    killpg(group, signal.SIGKILL)
    for p in procs:
        p.wait()


def run_agents(cmds: list[list[str]], envs: list[dict[str, str]] | None = None, *, tail: int = 40,
               popen: Callable[..., Any] = subprocess.Popen, killpg: Callable[[int, int], None] = os.killpg,
               groups: Callable[[int], set[int]] = process_groups, poll_seconds: float = 0.2) -> list[list[str]]:
    """Run torchrun agents side by side, each in its own process group, echoing their output
    (``[node i]`` before each line when there are several); return each one's last ``tail``
    lines. When one exits non-zero, the others are killed at once, with every process group
    under them (:func:`process_groups`; they would wait on it in a collective until the
    timeout), and RuntimeError names it with its last lines. A first SIGINT/SIGTERM is passed
    on to the workers, which checkpoint and stop (pipeline/train/stopping.py); on any exception
    here (a second signal) every agent is killed the same way. ``popen``, ``killpg``, ``groups``: hooks
    for tests."""
    envs = envs or [dict(os.environ) for _ in cmds]
    procs: list[Any] = []
    lasts: list[collections.deque] = []
    pumps: list[threading.Thread] = []
    try:
        for i, (cmd, env) in enumerate(zip(cmds, envs, strict=True)):
            proc = popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         bufsize=1, start_new_session=True)
            procs.append(proc)
            lasts.append(collections.deque(maxlen=tail))
            prefix = f"[node {i}] " if len(cmds) > 1 else ""
            pumps.append(threading.Thread(target=_pump, args=(proc.stdout, prefix, lasts[-1]), daemon=True))
            pumps[-1].start()
        forwarded: list[int] = []  # SIGINT/SIGTERM goes to the workers, which checkpoint and stop
        with forwarding_signals([p.pid for p in procs], forwarded):
            _wait_all(procs, pumps, lasts, killpg, groups, poll_seconds)
    finally:
        _stop(procs, killpg, groups)
    for t in pumps:
        t.join(timeout=10)
    return [list(last) for last in lasts]


def _wait_all(procs: list[Any], pumps: list[threading.Thread], lasts: list[collections.deque],
              killpg: Callable[[int, int], None], groups: Callable[[int], set[int]], poll_seconds: float) -> None:
    """Until every agent exits 0; when one fails, stop the others and raise naming it."""
    n = len(procs)
    while True:
        codes = [p.poll() for p in procs]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i = failed[0]
            _stop(procs, killpg, groups)
            for t in pumps:
                t.join(timeout=10)
            others = f"; the other {n - 1} node(s) were stopped" if n > 1 else ""
            joined = "\n".join(lasts[i])
            raise RuntimeError(f"torchrun node {i} of {n} exited with {codes[i]}{others}; "
                               f"its last output:\n{joined}")
        if all(c == 0 for c in codes):
            return
        time.sleep(poll_seconds)
