"""Issue 24 item 10: the run lock (pipeline/lock.py) on a local folder and on S3 (moto's server on
127.0.0.1): a second holder is refused naming the first, a release frees it at once, a crashed
holder's lease expires, a live holder's lease is renewed, holders of one group share it, and of
two runs starting together never both proceed.

Before, nothing stopped two runs writing one root at once (two triggers, or a trigger and a CLI run).
"""

import json
import os
import re
import socket
import time

import pytest

from pipeline import lock, storage
from pipeline.layout import RunLayout
from pipeline.lock import Holder, LockHeld


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("moto.server", reason="needs the dev extra: moto[server]")
    pytest.importorskip("s3fs", reason="needs the dev extra: s3fs")
    from tests.s3server import moto_s3

    with moto_s3("locks"):
        yield "s3://locks"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh run root: a local folder, or a prefix in the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('s3_server')}/{tmp_path.name}"


def _leases(folder: str) -> list[str]:
    return storage.list_files(folder, lock.LEASE_NAME)


def _crash(lease: lock.Lease) -> None:
    """What a SIGKILL leaves: the heartbeat stops, the lease file stays."""
    lease._stop.set()
    lease._thread.join()


def test_the_lease_folder_is_named_by_the_layout(tmp_path):
    run = str(tmp_path / "run")
    assert lock.lease_folder(f"{run}/raw") == RunLayout(run).locks("raw") == f"{run}/_locks/raw"
    assert lock.lease_folder("s3://b/run/embeddings/") == "s3://b/run/_locks/embeddings"


def test_a_second_run_is_refused_naming_the_holder_until_released(root):
    raw = f"{root}/raw"
    first = lock.acquire(raw, Holder("download"), ttl=60)
    try:
        assert [storage.basename(u) for u in _leases(first.folder)] == [f"{first.token}.json"]
        record = storage.read_json(first.uri)
        assert (record["step"], record["pid"], record["host"]) == ("download", os.getpid(), socket.gethostname())
        t0 = time.monotonic()
        with pytest.raises(LockHeld) as refused:
            lock.acquire(raw, Holder("download"), ttl=60)
        assert time.monotonic() - t0 < 10  # at once, not after a wait
        text = str(refused.value)
        assert text.startswith(f"{storage.normalize(raw)} is in use: another run is running, step download started ")
        for part in (f"by pid {os.getpid()} on host {socket.gethostname()}", first.uri, record["started"]):
            assert part in text, text
        assert "\n" not in text
        assert _leases(first.folder) == [first.uri]  # the refused run left nothing behind
        assert not _leases(RunLayout(root).locks("filtered"))
        lock.acquire(f"{root}/filtered", Holder("filter"), ttl=60).release()  # another folder: not locked
    finally:
        first.release()
    assert not _leases(first.folder)
    with lock.hold(raw, Holder("download"), ttl=60):  # free again at once
        pass


def test_an_error_in_the_step_releases_the_lock(root):
    with pytest.raises(RuntimeError, match="the step failed"), \
            lock.hold(f"{root}/filtered", Holder("filter"), ttl=60) as held:
        raise RuntimeError("the step failed")
    assert not _leases(held.folder)


def test_a_crashed_holders_lease_expires(root):
    raw = f"{root}/raw"
    crashed = lock.acquire(raw, Holder("download"), ttl=1.0)
    _crash(crashed)
    with pytest.raises(LockHeld):
        lock.acquire(raw, Holder("download"), ttl=60)
    time.sleep(1.2)
    with lock.hold(raw, Holder("download"), ttl=60) as second:
        assert _leases(raw.rsplit("/", 1)[0] + "/_locks/raw") == [second.uri]  # the stale lease was deleted


def test_a_running_holders_lease_is_renewed(root):
    raw = f"{root}/raw"
    with lock.hold(raw, Holder("download"), ttl=0.9) as held:
        expires = storage.read_json(held.uri)["expires"]
        time.sleep(2.5)  # almost three lease lengths: alive only because the heartbeat renewed it
        with pytest.raises(LockHeld, match="another run is running"):
            lock.acquire(raw, Holder("download"), ttl=60)
        assert storage.read_json(held.uri)["expires"] > expires + 1
        assert not held.lost


def test_holders_of_one_group_share_it_on_their_own_parts(root):
    emb = f"{root}/embeddings"
    with lock.hold(emb, Holder("embed", group="dag/run1", part="0")), \
            lock.hold(emb, Holder("embed", group="dag/run1", part="1")) as second:
        assert len(_leases(second.folder)) == 2
        with pytest.raises(LockHeld, match="step embed"):
            lock.acquire(emb, Holder("embed", group="dag/run1", part="1"))  # the same part twice
        with pytest.raises(LockHeld):
            lock.acquire(emb, Holder("embed", group="dag/run2", part="2"))  # another run
        with pytest.raises(LockHeld):
            lock.acquire(emb, Holder("embed"))  # an exclusive holder (a CLI run)
    with lock.hold(emb, Holder("embed")), pytest.raises(LockHeld):
        lock.acquire(emb, Holder("embed", group="dag/run1", part="0"))


def test_a_retry_of_the_same_task_replaces_its_earlier_tries_lease(root):
    raw = f"{root}/raw"
    task = "Airflow task imagen_full/manual__1/download"
    killed = lock.acquire(raw, Holder("download", task=task), ttl=60)
    _crash(killed)  # Airflow runs one try at a time: this try is gone
    with pytest.raises(LockHeld, match=re.escape(f"({task})")):
        lock.acquire(raw, Holder("download", task="Airflow task imagen_full/manual__2/download"))
    with lock.hold(raw, Holder("download", task=task)) as retry:
        assert _leases(retry.folder) == [retry.uri]


def test_of_two_runs_starting_together_never_both_proceed(root, monkeypatch):
    """B's first listing misses A (A writes its lease just after it); B's second listing sees A, so B
    withdraws its lease and fails, while A's own second check passes."""
    raw = f"{root}/raw"
    a = lock.Lease(raw, Holder("download"), ttl=60)
    check = lock._check

    def a_writes_after_b_looked(lease, racing):
        check(lease, racing)
        if not racing:
            a.write()

    monkeypatch.setattr(lock, "_check", a_writes_after_b_looked)
    with pytest.raises(LockHeld, match="started at the same moment as this one"):
        lock.acquire(raw, Holder("download"), ttl=60)
    monkeypatch.setattr(lock, "_check", check)
    assert _leases(a.folder) == [a.uri]  # B withdrew
    check(a, racing=True)  # A proceeds
    storage.remove(a.uri)


def test_lease_length_from_the_environment(monkeypatch):
    monkeypatch.setenv(lock.TTL_ENV, "42")
    assert lock.ttl_seconds() == 42
    for bad in ("0", "-5", "nan", "five"):
        monkeypatch.setenv(lock.TTL_ENV, bad)
        with pytest.raises(ValueError, match=lock.TTL_ENV):
            lock.ttl_seconds()


def test_a_foreign_file_in_the_lock_folder_is_ignored(tmp_path):
    raw = str(tmp_path / "run" / "raw")
    folder = lock.lease_folder(raw)
    storage.write_bytes(f"{folder}/{'0' * 32}.json", b"not json")
    storage.write_bytes(f"{folder}/notes.json", json.dumps({"expires": time.time() + 999}).encode())
    with lock.hold(raw, Holder("download"), ttl=60):
        pass
