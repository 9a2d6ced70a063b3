"""Stopping a training run on SIGINT or SIGTERM: at a step boundary, checkpointed, resumable.

    with StopSignals() as stop:                      # the trainer's loop (trainer.py)
        ... one optimizer step ...
        if stop_agreed(stop.signum is not None, world, group):
            raise TrainingStopped({"step": ..., "checkpoint": ..., ...})

The first Ctrl-C (SIGINT) or SIGTERM only sets a flag; the loop looks at it between optimizer
steps, where the state is whole, saves a checkpoint of that step, marks the MLflow run KILLED
and raises :class:`TrainingStopped`. A second signal aborts at once (KeyboardInterrupt), for a
step that hangs. Every rank stops at the same step: the flag is OR-ed over the ranks at each
step boundary (:func:`pipeline.train.parallel.any_rank`), so a signal that reaches one rank
first (or only one node) never leaves the others waiting in a collective.

Who turns the exception into an exit: ``python -m pipeline.train`` (worker.py) prints its summary
with ``"stopped": true`` and exits :data:`EXIT_STOPPED` (0 under torchrun, whose agent would
report a non-zero worker as a failure with a page of output); the local launcher reads that
summary back and raises :class:`TrainingStopped` in the caller; the CLI's ``train`` verb prints
one line, ``stopped at step N; resume with `imagen-pipeline train ... --resume latest```
(:func:`resume_command`), and exits 130. Imports nothing heavy (the CLI imports it to catch it).
"""

from __future__ import annotations

import shlex
import signal
import threading
from typing import Any

EXIT_STOPPED = 130  # 128 + SIGINT: what a shell reports for a command stopped with Ctrl-C
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training stopped on a signal after saving the checkpoint of the step it reached.

    ``summary``: ``{"stopped": True, "signal", "step", "checkpoint" (the step-N dir),
    "checkpoint_dir", "run_id", "stage"}``, plus ``"resume"`` (the command) once the CLI knows it.
    """

    def __init__(self, summary: dict[str, Any]):
        self.summary = {**summary, "stopped": True}
        super().__init__(self.line())

    def line(self) -> str:
        s = self.summary
        how = f"; resume with `{s['resume']}`" if s.get("resume") else " (resume with --resume latest)"
        return f"stopped at step {s['step']}{how}"


class StopSignals:
    """While active (main thread only), SIGINT and SIGTERM set ``signum`` instead of killing the
    process; a second one restores the previous handlers and raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum  # no print here: a handler may run inside another print
            return
        self._restore()
        raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None


def resume_command(prog: str, argv: list[str], checkpoint_dir: str | None = None) -> str:
    """``prog argv`` as a command that resumes the run: ``--resume latest`` in place of any
    ``--resume X``, no ``--new-run`` (the run to resume is the one just stopped), and
    ``--checkpoint-dir`` set to ``checkpoint_dir`` (the folder ``--new-run`` chose)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name == "--new-run":
            continue
        if name in ("--resume", "--checkpoint-dir"):
            skip = "=" not in arg and i + 1 < len(argv)
            continue
        out.append(arg)
    if checkpoint_dir:
        out += ["--checkpoint-dir", checkpoint_dir]
    return shlex.join([*shlex.split(prog), *out, "--resume", "latest"])
