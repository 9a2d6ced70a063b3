"""Issue 24 items 2 and 8 (first two bullets): every remote read goes through pipeline.storage.

- A walk of the source (``ast``, nothing imported) finds every call into a network library
  (fsspec, urllib.request, requests, ...) outside ``pipeline/storage.py``, ``pipeline/netguard.py``
  and ``pipeline/data/fetch_guard.py``, the way test_import_graph walks imports.
- Checkpoint folders (``evaluate``/``register --checkpoint``) and ``plan --url-list`` on a
  loopback server get zero requests without an allow setting; plan's list follows no redirect to
  a host the setting does not allow.
- ``hdfs://HOST:PORT`` names any namenode: refused like other unguarded network protocols,
  while ``hdfs:///path`` (the deployment's fs.defaultFS) passes.
- A compressed URL list is bounded by what it inflates to, not by its compressed size.

Every real connection goes to 127.0.0.1; other addresses appear only in URIs that are refused.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import os
import socket
import threading

import pytest

from pipeline import cli, storage
from pipeline.netguard import (
    ENV_ALLOW_HOSTS,
    ENV_ALLOW_PRIVATE,
    FetchPolicy,
    RemoteReadRefused,
)
from tests.unit.source_walk import import_aliases, python_files
from tests.unit.test_fetch_guard_everywhere import recording

SOURCE_DIRS = ("imagen", "pipeline", "dags", "infra", "bench")
# Libraries that open network connections or remote files. A call into any of them (after import
# aliases are resolved) outside the three modules below is a read that skips the fetch guard.
NETWORK = ("fsspec", "urllib.request", "requests", "httpx", "urllib3", "http.client", "aiohttp",
           "pycurl", "smart_open", "pyarrow.fs")
GUARDED = {"pipeline/storage.py", "pipeline/netguard.py", "pipeline/data/fetch_guard.py"}
# (file, call) pairs that may stay, each with the reason. Keep this short.
ALLOWED = {
    # MLflow's /health on the tracking server the operator configured (MLFLOW_TRACKING_URI or
    # --tracking-uri; no DAG Param sets it): the MLflow client talks to the same server anyway.
    ("pipeline/tracking.py", "urllib.request.urlopen"),
    # The dev services (tests, demo) start MLflow/Airflow on this machine and poll their loopback ports.
    ("pipeline/dev/services.py", "urllib.request.urlopen"),
    ("pipeline/dev/services.py", "urllib.request.Request"),
}
LIST = b"url,caption\nhttp://93.184.216.34/a.png,a red circle\nhttp://93.184.216.34/b.png,a blue square\n"


@pytest.fixture(autouse=True)
def default_settings(monkeypatch):
    monkeypatch.delenv(ENV_ALLOW_PRIVATE, raising=False)
    monkeypatch.delenv(ENV_ALLOW_HOSTS, raising=False)


# --- the walk ----------------------------------------------------------------------------------

def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def network_calls(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, resolved call) for each call into a NETWORK library in ``source``."""
    tree = ast.parse(source, filename)
    aliases = import_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or (name := _dotted(node.func)) is None:
            continue
        head, _, rest = name.partition(".")
        resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
        if any(resolved == m or resolved.startswith(m + ".") for m in NETWORK) and head in aliases:
            found.append((node.lineno, resolved))
    return sorted(found)


def test_the_walk_resolves_aliases_and_names_the_line():
    source = ("import fsspec\nimport urllib.request as ur\nfrom fsspec.core import url_to_fs as split\n"
              "import requests\n\ndef f(u):\n    fsspec.open(u)\n    ur.urlopen(u)\n    split(u)\n"
              "    requests.get(u)\n    from urllib.request import urlopen\n    urlopen(u)\n    open(u)\n")
    assert network_calls(source, "x.py") == [
        (7, "fsspec.open"), (8, "urllib.request.urlopen"), (9, "fsspec.core.url_to_fs"), (10, "requests.get"),
        (12, "urllib.request.urlopen")]


def test_no_network_call_outside_storage_and_the_fetch_guard():
    found, used = [], set()
    for rel, path in python_files(SOURCE_DIRS):
        if rel in GUARDED:
            continue
        with open(path) as f:
            source = f.read()
        for line, call in network_calls(source, path):
            if (rel, call) in ALLOWED:
                used.add((rel, call))
            else:
                found.append(f"{rel}:{line} {call}")
    assert not found, ("remote reads that skip pipeline.storage (and so the fetch guard): " + ", ".join(found)
                       + "; read through storage.open / storage.url_to_fs instead")
    assert used == ALLOWED, f"stale ALLOWED entries: {sorted(ALLOWED - used)}"


def test_imagen_opens_no_remote_file_itself():
    for rel, path in python_files(SOURCE_DIRS):
        if rel.startswith("imagen/"):
            with open(path) as f:
                assert "fsspec" not in f.read(), f"{rel} mentions fsspec: imagen/ reads URIs only through storage="


# --- checkpoint folders and plan's URL list on loopback ------------------------------------------

@pytest.fixture
def internal():
    """An internal service on loopback holding a checkpoint folder and a URL list."""
    ckpt = b'{"stage": "base64", "unet": {}, "diffusion": {}, "train": {}, "metadata": {}}'
    with recording({"/ckpt/config.json": (200, {}, ckpt), "/ckpt/model.safetensors": (200, {}, b"x"),
                    "/urls.csv": (200, {"Content-Type": "text/csv"}, LIST)}) as server:
        yield server


def test_checkpoint_folders_on_loopback_are_never_requested(internal, capsys):
    from imagen.checkpoint import check_weights, load_config, load_model

    url = f"http://{internal.host}/ckpt"
    for call in (lambda: load_config(url, storage), lambda: check_weights(url, storage),
                 lambda: load_model(url, storage=storage), lambda: load_model(url)):
        with pytest.raises(ValueError, match=r"unsupported_scheme|is a URI"):
            call()
    for argv in (["evaluate", "--checkpoint", url], ["register", "--checkpoint", url],
                 ["evaluate", "--checkpoint", url, "--allow-host", internal.host]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and url in err[0], err
    assert internal.requests == []


def test_plan_url_list_on_loopback_is_never_requested(internal, capsys):
    from pipeline.data.url_list import read_url_list

    url = f"http://{internal.host}/urls.csv"
    with pytest.raises(RemoteReadRefused, match="loopback_address"):
        read_url_list(url)
    assert cli.main(["plan", "--url-list", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loopback_address" in err[0] and url in err[0], err
    assert internal.requests == []


def test_plan_url_list_follows_no_redirect_past_the_allow_setting(internal, monkeypatch):
    from pipeline.data.url_list import read_url_list

    with recording({"/list.csv": (302, {"Location": f"http://{internal.host}/urls.csv"}, b"")}) as front:
        monkeypatch.setenv(ENV_ALLOW_HOSTS, front.host)  # the operator allows the front server only
        with pytest.raises(RemoteReadRefused, match="loopback_address.*redirected from"):
            read_url_list(f"http://{front.host}/list.csv")
        assert front.requests == ["/list.csv"] and internal.requests == []
        monkeypatch.setenv(ENV_ALLOW_HOSTS, f"{front.host},{internal.host}")
        rows, captions = read_url_list(f"http://{front.host}/list.csv")  # allowed both: read through the guard
    assert (rows, captions) == (2, ["a red circle", "a blue square"])
    assert internal.requests == ["/urls.csv"]


# --- hdfs names its own host -----------------------------------------------------------------------

@contextlib.contextmanager
def listener():
    """A loopback TCP port that counts the connections made to it."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = sock.accept()
                accepted.append(conn)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        sock.close()


def test_hdfs_with_its_own_namenode_is_refused():
    with listener() as (port, accepted):
        for uri in (f"hdfs://127.0.0.1:{port}/run", f"arrow_hdfs://127.0.0.1:{port}/run",
                    "hdfs://10.0.0.5:8020/run", "HDFS://namenode.internal/run", "hdfs://hdfs@/run",
                    f"simplecache::hdfs://127.0.0.1:{port}/run/urls.csv"):
            for call in (storage.check_protocols, storage.exists, storage.open, storage.list_files):
                with pytest.raises(RemoteReadRefused, match="unsupported_scheme.*names its own namenode"):
                    call(uri)
        assert accepted == []
    for uri in ("hdfs:///data/run", "hdfs://default/data/run", "arrow_hdfs:///data/run"):
        storage.check_protocols(uri)  # the cluster the deployment configured (fs.defaultFS)
    storage.check_protocols("hdfs://10.0.0.5:8020/run", FetchPolicy(allow_private_networks=True))


# --- a compressed list is bounded by what it inflates to ------------------------------------------

def _bomb(rows: int) -> bytes:
    return gzip.compress(b"url,caption\n" + b"http://93.184.216.34/a.png,a red circle\n" * rows)


def test_a_gzip_list_is_bounded_by_its_inflated_size(tmp_path, monkeypatch):
    from pipeline.data.download import read_url_list
    from pipeline.data.url_list import read_url_list as plan_rows

    small, big = tmp_path / "small.csv.gz", tmp_path / "big.csv.gz"
    small.write_bytes(_bomb(10))
    big.write_bytes(_bomb(50_000))  # 2 MB of text in about 10 kB
    assert os.path.getsize(big) < 64 << 10
    monkeypatch.setattr(storage, "REMOTE_MAX_BYTES", 1 << 20)
    assert read_url_list(str(small), "csv").num_rows == 10
    assert plan_rows(str(small))[0] == 10
    for call in (lambda: read_url_list(str(big), "csv"), lambda: plan_rows(str(big)),
                 lambda: storage.open(str(big), "rb", compression="infer")):
        with pytest.raises(RemoteReadRefused, match=r"response_too_large.*big\.csv\.gz.*inflates to more than 1048576"):
            call()
    with storage.open(str(big), "rb", compression="gzip", max_bytes=4 << 20) as f:
        assert f.read().count(b"\n") == 50_001


def test_a_gzip_list_over_http_is_bounded_by_its_inflated_size(monkeypatch):
    from pipeline.data.download import read_url_list

    with recording({"/small.csv.gz": (200, {}, _bomb(10)), "/big.csv.gz": (200, {}, _bomb(50_000))}) as server:
        policy = FetchPolicy(allow_hosts=(server.host,))
        monkeypatch.setattr(storage, "REMOTE_MAX_BYTES", 1 << 20)
        assert read_url_list(f"http://{server.host}/small.csv.gz", "csv", policy=policy).num_rows == 10
        with pytest.raises(RemoteReadRefused, match="response_too_large.*inflates to more than"):
            read_url_list(f"http://{server.host}/big.csv.gz", "csv", policy=policy)
        assert server.requests == ["/small.csv.gz", "/big.csv.gz"]
