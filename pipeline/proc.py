"""Child processes of the pipeline steps: run one, stream its output, never leave it behind.

    from pipeline.proc import run_streaming
    last = run_streaming([sys.executable, "-m", "pipeline.train", ...])   # the last 40 lines

The download step (img2dataset under the fetch guard) and the local training launcher
(``torchrun`` or ``python -m pipeline.train``) both run their work this way: the child's
stdout and stderr are copied to ours line by line (into the Airflow task log when a task
calls it), a non-zero exit is a RuntimeError carrying its last lines, and the child runs in
its own process group, which is killed when we stop (Ctrl-C, a task timeout) together with
every process group under it (torchrun puts each worker in a session of its own), so no
orphaned downloader or torchrun worker keeps writing into a folder a re-run starts on.
Imports nothing from ``pipeline`` (both wings use it).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
from typing import NoReturn


def command_name(cmd: list[str]) -> str:
    """What an error calls ``cmd``: the module of ``python -m MODULE``, else the program."""
    if cmd[1:2] == ["-m"] and len(cmd) > 2:
        return cmd[2]
    return os.path.basename(cmd[1] if len(cmd) > 1 and cmd[0] == sys.executable else cmd[0])


def process_groups(pid: int) -> set[int]:
    """The process groups of ``pid`` and of all its descendants (Linux ``/proc``). torchrun
    starts each worker in a session of its own, so killing the agent's group alone would
    leave its workers running, waiting on the other nodes in a collective."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {pid}
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children[ppid].append(int(entry))
    groups, todo = {pid}, list(children[pid])
    while todo:
        child = todo.pop()
        todo += children[child]
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(child))
    return groups


def kill_process_tree(pid: int) -> None:
    """SIGKILL the process group of ``pid`` (started with ``start_new_session``) and every
    group under it (torchrun's workers, their DataLoader workers); never our own group."""
    for group in sorted(process_groups(pid) - {os.getpgrp()}):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # exited since
            os.killpg(group, signal.SIGKILL)


def run_streaming(cmd: list[str], env: dict[str, str] | None = None, tail: int = 40) -> list[str]:
    """Run ``cmd``, copy its stdout+stderr to ours line by line, return its last ``tail`` lines.

    Args:
        cmd: the command (no shell).
        env: variables set on top of this process's environment.
        tail: how many of the last lines to keep for the result and for the error.

    Raises:
        RuntimeError: the child exited non-zero; the message names it, its exit code and
            its last ``tail`` lines.
    """
    last: collections.deque[str] = collections.deque(maxlen=tail)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                          text=True, errors="replace", bufsize=1, start_new_session=True) as proc:
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                last.append(line.rstrip("\n"))
            rc = proc.wait()
        except BaseException:
            # Killed or timed out while streaming: take the child's whole tree down with us.
            kill_process_tree(proc.pid)
            raise
    if rc != 0:
        raise RuntimeError(f"{command_name(cmd)} exited with code {rc}; last output:\n" + "\n".join(last))
    return list(last)


def exit_now(code: int) -> NoReturn:
    """Exit this process with ``code`` once its work is written and closed, skipping the
    interpreter's teardown: the exit handlers img2dataset's imports register (wandb, ...: 1-2 s
    per download child), and pyarrow's Parquet thread pool, which can abort a finished process
    there ("terminate called without an active exception", apache/arrow#34314; seen once on
    ``imagen-pipeline download`` after it had printed its result). Flushes stdout and stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
