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
import threading
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


def signal_workers(pid: int, signum: int) -> None:
    """Send ``signum`` to the innermost process groups under ``pid``: its descendants' own
    groups (torchrun's workers, each in a session of its own) when there are any, else the
    group of ``pid`` itself (a single worker, with its DataLoader workers). An agent such as
    torchrun would answer the signal by signalling its workers again and then raising."""
    groups = process_groups(pid) - {pid, os.getpgrp()}
    for group in sorted(groups or {pid}):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # exited since
            os.killpg(group, signum)


@contextlib.contextmanager
def forwarding_signals(pids: list[int], forwarded: list[int]):
    """While active (main thread only): the first SIGINT/SIGTERM is passed on to the workers
    of each child in ``pids`` (:func:`signal_workers`) and appended to ``forwarded``; a second
    raises KeyboardInterrupt (the caller then kills the trees)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame) -> None:
        if forwarded:
            raise KeyboardInterrupt
        forwarded.append(signum)
        for pid in pids:
            signal_workers(pid, signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_streaming(cmd: list[str], env: dict[str, str] | None = None, tail: int = 40,
                  forward_signals: bool = False) -> list[str]:
    """Run ``cmd``, copy its stdout+stderr to ours line by line, return its last ``tail`` lines.

    Args:
        cmd: the command (no shell).
        env: variables set on top of this process's environment.
        tail: how many of the last lines to keep for the result and for the error.
        forward_signals: a SIGINT/SIGTERM to us is passed on to the child's workers, which
            stop on their own (the trainer checkpoints first); we wait for them, and an exit
            with 130 then returns the lines like a success (the child's summary says it
            stopped). A second signal kills the tree. Off: any exception here kills it.

    Raises:
        RuntimeError: the child exited non-zero; the message names it, its exit code and
            its last ``tail`` lines.
    """
    last: collections.deque[str] = collections.deque(maxlen=tail)
    forwarded: list[int] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                          text=True, errors="replace", bufsize=1, start_new_session=True) as proc:
        try:
            with forwarding_signals([proc.pid], forwarded) if forward_signals else contextlib.nullcontext():
                for line in proc.stdout:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    last.append(line.rstrip("\n"))
                rc = proc.wait()
        except BaseException:
            # Killed or timed out while streaming: take the child's whole tree down with us.
            kill_process_tree(proc.pid)
            raise
    if forwarded and rc == 130:  # stopped as asked (128 + SIGINT)
        return list(last)
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
