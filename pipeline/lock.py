"""The run lock: one run at a time writes a step's output folder under a data root.

    from pipeline.lock import Holder, hold
    with hold("s3://bucket/run/raw", Holder("download")):    # leases in s3://bucket/run/_locks/raw/
        download(url_list, "s3://bucket/run/raw")

Two runs on one root at once (two DAG triggers, or a trigger and a CLI run) would write the same
shards, markers and lists. A second run of a step that writes the same folder fails at once with
:class:`LockHeld`, whose message names the holder (step, host, pid, when it started, its Airflow
task) and what to do. The CLI verbs and the DAG tasks take the lock (pipeline/cli.py,
dags/imagen_common.py); the library functions (download, filter_shards, embed_shards) stay
lock-free.

A lock is a folder of lease files, ``RunLayout(root).locks(<folder>)``, one JSON file per holder,
read and written through :mod:`pipeline.storage`, so the same code works on local disk and object
stores. Taking it:

1. list the folder (a fresh listing) and read every lease; a lease past its ``expires`` is stale
   (its holder died without releasing it) and is deleted;
2. a live lease that does not share with ours: :class:`LockHeld`;
3. write our lease, then list again: a conflicting lease that appeared meanwhile (a run that
   started at the same moment) makes us delete ours and fail as well.

Step 3 stands in for an atomic create-if-absent, which object stores do not all offer (s3fs's
exclusive mode, S3's ``If-None-Match``, is documented for AWS S3 only) and which could not express
holders that share a lock. Of two runs starting together, the later writer sees the other's lease
on its second listing, so both never proceed; at worst both fail, and running again succeeds.
The residual race: a store whose listings can lag a completed write (an eventually consistent
one; local disk, S3, GCS and MinIO list after write consistently) could let both through, and
expiry compares the holder's clock with the reader's, so hosts' clocks must agree to well within
the lease's length.

A holder renews its lease from a daemon thread every third of its length
(``IMAGEN_LOCK_TTL_SECONDS``, default 300 s), so a lease outlives a crashed holder by at most that
long; a clean exit, an error included, deletes it at once.

Sharing (:class:`Holder`): holders of one ``group`` run side by side on disjoint ``part``s (the
mapped embed tasks of one DAG run, CLI embed workers of one ``--num-workers`` split); the same
part twice is refused. A holder whose ``task`` matches a live lease replaces it: Airflow runs one
try of a task instance at a time, so that lease is an earlier try killed before it could release.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline import storage

TTL_ENV = "IMAGEN_LOCK_TTL_SECONDS"
DEFAULT_TTL = 300.0
LEASE_NAME = r"[0-9a-f]{32}\.json"  # atomic_write's hidden temporary names never match


class LockHeld(RuntimeError):
    """Another run holds the lock on a folder this run would write (a RuntimeError: the CLI
    prints it as one line and exits 2)."""


@dataclass(frozen=True)
class Holder:
    """Who takes a lock: the step, and whether (and with whom) it may share the folder."""

    step: str  # download, filter, embed: named to whoever is refused
    group: str | None = None  # holders of one group share the folder, each on its own part
    part: str | None = None  # which disjoint part of the group's work (a map index, a worker)
    task: str | None = None  # an orchestrator's task instance: a live lease of it is an earlier try

    def shares_with(self, lease: dict[str, Any]) -> bool:
        return self.group is not None and lease.get("group") == self.group and lease.get("part") != self.part

    def is_earlier_try(self, lease: dict[str, Any]) -> bool:
        return self.task is not None and lease.get("task") == self.task


def ttl_seconds() -> float:
    """The lease length: ``IMAGEN_LOCK_TTL_SECONDS``, else 300 s."""
    text = os.environ.get(TTL_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TTL
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{TTL_ENV}={text!r}: give the run lock's lease length in seconds, e.g. 300")
    return value


def lease_folder(output: str) -> str:
    """The lock folder of a step's output folder: ``RunLayout(<its parent>).locks(<its name>)``."""
    from pipeline.layout import RunLayout

    output = storage.normalize(output)
    return RunLayout.around(output).locks(storage.basename(output))


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _read(uri: str) -> dict[str, Any] | None:
    """A lease's record, or None when it is gone (released meanwhile) or not a lease."""
    try:
        record = storage.read_json(uri)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("expires"), int | float)
    return record if ok else None


def _discard(uri: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        storage.remove(uri)


def describe(lease: dict[str, Any], uri: str) -> str:
    """Who holds ``lease``, for a refusal message."""
    who = (f"step {lease.get('step')} started {lease.get('started')} by pid {lease.get('pid')} on host "
           f"{lease.get('host')}")
    if lease.get("task"):
        who += f" ({lease['task']})"
    return f"{who}; lease {uri}, renewed until {_utc(float(lease['expires']))}"


class Lease:
    """One holder's lease file, renewed by a daemon thread until :meth:`release`."""

    def __init__(self, output: str, holder: Holder, ttl: float):
        self.folder, self.holder, self.ttl = lease_folder(output), holder, ttl
        self.token = uuid.uuid4().hex
        self.uri = storage.join(self.folder, f"{self.token}.json")
        now = time.time()
        self.record: dict[str, Any] = {
            "token": self.token, "step": holder.step, "output": storage.normalize(output),
            "host": socket.gethostname(), "pid": os.getpid(), "started": _utc(now), "group": holder.group,
            "part": holder.part, "task": holder.task, "ttl_seconds": ttl}
        self.lost = False  # our lease was found deleted at a renewal (another run may have taken over)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self) -> None:
        now = time.time()
        storage.write_json(self.uri, {**self.record, "renewed": _utc(now), "expires": now + self.ttl})

    def renew(self) -> None:
        """Push the expiry out by one lease length; notes (and says) if the lease was deleted."""
        if not storage.list_files(self.folder, re.escape(f"{self.token}.json")):
            self.lost = True
            print(f"run lock: {self.uri} was deleted while {self.holder.step} ran (expired while this process "
                  "stalled, or removed by hand); another run may be writing the same folder", file=sys.stderr)
        self.write()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception as e:  # a storage hiccup: the next beat tries again before expiry
                print(f"run lock: could not renew {self.uri}: {e}", file=sys.stderr)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease (best effort: otherwise it expires by itself)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            _discard(self.uri)
        except Exception as e:
            print(f"run lock: could not delete {self.uri} ({e}); it expires at "
                  f"{_utc(time.time() + self.ttl)}", file=sys.stderr)


def _check(lease: Lease, racing: bool) -> None:
    """Raise LockHeld for a live lease in the folder that ours may not run beside."""
    holder = lease.holder
    for uri in storage.list_files(lease.folder, LEASE_NAME):
        if storage.basename(uri) == storage.basename(lease.uri):
            continue
        other = _read(uri)
        if other is None:
            continue
        if float(other["expires"]) < time.time() or holder.is_earlier_try(other):
            _discard(uri)  # its holder is gone: crashed, or an earlier try of this very task
            continue
        if holder.shares_with(other):
            continue
        when = "started at the same moment as this one" if racing else "is running"
        raise LockHeld(
            f"{lease.record['output']} is in use: another run {when}, {describe(other, uri)}. Wait for it to "
            f"finish (or run this again if both started together); if that process is gone, its lease expires "
            f"by itself, or delete {uri} to take over now")


def acquire(output: str, holder: Holder, ttl: float | None = None) -> Lease:
    """Take the run lock on ``output`` (a step's output folder) for ``holder``, or raise
    :class:`LockHeld` naming the run that holds it. Call :meth:`Lease.release` when done
    (:func:`hold` does)."""
    lease = Lease(output, holder, ttl or ttl_seconds())
    _check(lease, racing=False)
    lease.write()
    try:
        _check(lease, racing=True)
    except BaseException:
        _discard(lease.uri)
        raise
    lease.start()
    return lease


@contextlib.contextmanager
def hold(output: str, holder: Holder, ttl: float | None = None) -> Iterator[Lease]:
    """Hold the run lock on ``output`` while the block runs (released on any exit)."""
    lease = acquire(output, holder, ttl)
    try:
        yield lease
    finally:
        lease.release()
