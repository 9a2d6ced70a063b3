"""The retry pass for real: img2dataset downloads from loopback servers whose URLs fail
transiently (429, 503, a reset connection, a timeout) the first N times and then answer, or fail
for good (404, an undecodable body, a 500 that never ends); the pass recovers every URL that can
be recovered, duplicates no key, counts every failure once before and after, fetches nothing
again on a rerun, and the filter reads its shards (pipeline.data.retry)."""

from __future__ import annotations

import collections
import functools
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.download import download, retry_download, summarize
from pipeline.data.filters import filter_shards, sample_fates, stage_config
from tests.tinychain import TINY_PRESETS

TIMEOUT = 3.0  # the download's per-request timeout (generous: a loaded machine); "timeout" routes sleep past it
BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
# (route kind, failures before it answers, how many URLs, the reason it fails for)
PLAN = [("ok", 0, 8, None), ("429", 1, 3, "http_429"), ("503", 2, 3, "http_503"), ("reset", 1, 2, "connection_reset"),
        ("timeout", 1, 2, "timeout"), ("404", 99, 2, "http_404"), ("garbage", 99, 1, "unsupported_format"),
        ("500", 99, 1, "http_500")]


@functools.cache
def _png(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (96, 96))
    img.putdata([(rng.randrange(256), (x * 3 + seed * 40) % 256, (y * 5) % 256)
                 for y in range(96) for x in range(96)])
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


class FlakyServer:
    """Loopback servers, one per URL on its own address (127.0.0.2, .3, ...: the politeness limiter
    backs off a host after 3 failures in a row, which one shared host would reach at once):
    ``/KIND/FAILS/ID.png`` fails as KIND for its first FAILS requests, then serves a distinct PNG;
    ``hits`` counts the requests per path (robots.txt is a 404: everything allowed, not counted)."""

    def __init__(self) -> None:
        self.hits: collections.Counter = collections.Counter()
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/robots.txt":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with lock:
                    outer.hits[self.path] += 1
                    n = outer.hits[self.path]
                kind, fails, ident = self.path.strip("/").split("/")
                if kind not in ("ok", "garbage") and n <= int(fails):  # garbage: always a body no decoder takes
                    return self.fail(kind)
                body = b"\x00not an image\x01" * 8 if kind == "garbage" else _png(int(ident.split(".")[0]))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def fail(self, kind: str) -> None:
                if kind == "reset":  # RST instead of an answer
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                if kind == "timeout":
                    time.sleep(TIMEOUT + 0.5)
                code = 200 if kind == "timeout" else int(kind)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.servers = []
        for i in range(sum(count for _, _, count, _ in PLAN)):
            server = ThreadingHTTPServer((f"127.0.0.{i + 2}", 0), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)

    def url_list(self, directory: str) -> tuple[str, list[dict]]:
        rows, ident = [], 0
        for kind, fails, count, reason in PLAN:
            for _ in range(count):
                host, port = self.servers[ident].server_address
                rows.append({"url": f"http://{host}:{port}/{kind}/{fails}/{ident}.png",
                             "caption": f"a picture of test object number {ident} on a table",
                             "kind": kind, "fails": fails, "reason": reason})
                ident += 1
        path = os.path.join(directory, "urls.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path, rows

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEN_POLITENESS_DIR", str(tmp_path / "politeness"))  # no host state of other runs
    server = FlakyServer()
    yield server
    server.close()


KWARGS = {"presets": TINY_PRESETS, "allow_private_networks": True, "timeout": TIMEOUT, "threads": 16,
          "number_sample_per_shard": 10, "save_additional_columns": ["kind"], "retry_base_delay": 0.05,
          "retry_max_delay": 0.2}


def _rows(raw: str) -> list[dict]:
    found = []
    for name in sorted(os.listdir(raw)):
        if name[:5].isdigit() and name.endswith(".parquet"):
            found += [{**r, "shard": name} for r in pq.read_table(os.path.join(raw, name)).to_pylist()]
    return found


def _tar_keys(raw: str) -> list[str]:
    keys = []
    for name in sorted(os.listdir(raw)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(raw, name)) as tar:
                keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".png")]
    return keys


def _expected(rows: list[dict], attempts: int) -> tuple[int, collections.Counter, collections.Counter]:
    """Recoverable URLs within ``attempts`` retries, the failures before, the failures after."""
    before = collections.Counter(r["reason"] for r in rows if r["reason"])
    after = collections.Counter(r["reason"] for r in rows if r["reason"] and r["fails"] > attempts)
    return sum(r["fails"] <= attempts for r in rows), before, after


def test_retry_pass_recovers_every_transient_failure(flaky, tmp_path):
    url_list, rows = flaky.url_list(str(tmp_path))
    raw, filtered = str(tmp_path / "raw"), str(tmp_path / "filtered")
    summary = download(url_list, raw, retry_attempts=2, **KWARGS)

    recoverable, before, after = _expected(rows, 2)
    assert summary["input_rows"] == summary["total"] == len(rows)
    assert summary["successes"] == recoverable == 18
    assert summary["errors"] == dict(after) == {"http_404": 2, "unsupported_format": 1, "http_500": 1}
    assert summary["transient"] == 1  # the 500 that never ends: a later pass may still get it
    stats = summary["retry"]
    assert stats["before"] == dict(before) and stats["after"] == dict(after)
    assert stats["recovered"] == {"http_429": 3, "http_503": 3, "connection_reset": 2, "timeout": 2}
    assert [a["rows"] for a in stats["attempts"]] == [11, 4]  # 3 of 503 and the 500 fail twice
    # every sample once: the tars hold exactly the success rows, no key twice
    shard_rows = _rows(raw)
    successes = [r["key"] for r in shard_rows if r["status"] == "success"]
    assert sorted(_tar_keys(raw)) == sorted(successes) and len(set(successes)) == len(successes) == 18
    urls = collections.Counter(r["url"] for r in shard_rows if r["status"] == "success")
    assert max(urls.values()) == 1
    recovered = {r["key"]: r for r in shard_rows if r["status"] == "recovered"}
    assert len(recovered) == 10
    retried = {r["retry_of"]: r for r in shard_rows if r.get("retry_of") and r["status"] == "success"}
    assert set(retried) == set(recovered)
    assert all(retried[k]["key"] == r["recovered_as"] and retried[k]["url"] == r["url"] for k, r in recovered.items())
    # permanent failures were asked once, transient ones until they answered, the endless 500 three times
    hits = {"/" + r["url"].split("/", 3)[3]: r for r in rows}
    for path, r in hits.items():
        want = 1 if r["kind"] in ("ok", "404", "garbage") else (3 if r["kind"] == "500" else r["fails"] + 1)
        assert flaky.hits[path] == want, (path, flaky.hits[path])

    # the filter reads the retry shards like any raw shard and counts no recovered row as a reject
    manifest = filter_shards(raw, filtered, stage_config(TINY_PRESETS, val_fraction=0), samples_per_shard=100)
    assert manifest["input_rows"] == len(rows) and manifest["kept"] == 18
    assert manifest["rejects"]["download"] == dict(sorted(after.items()))
    assert manifest["kept"] + manifest["rejected"] == len(rows)
    fates = sample_fates(raw, filtered).to_pylist()
    assert len(fates) == len(rows) and len({f["url"] for f in fates}) == len(rows)
    assert collections.Counter(f["stage"] for f in fates) == {"kept": 18, "download": 4}

    # a rerun of the pass fetches nothing recovered: only the endless 500, at most twice more (its
    # host failed 3 times in a row: the politeness limiter may hold it back, as host_backoff)
    seen = collections.Counter(flaky.hits)
    again = retry_download(raw, attempts=2, base_delay=0.01, max_delay=0.02)["retry"]
    assert again["recovered"] == stats["recovered"] and again["transient_after"] == 1
    assert {r: n for r, n in again["after"].items() if r not in ("http_500", "host_backoff")} == {
        "http_404": 2, "unsupported_format": 1}
    endless = [path for path, r in hits.items() if r["kind"] == "500"]
    assert set(flaky.hits - seen) <= set(endless) and (flaky.hits - seen)[endless[0]] <= 2
    assert summarize(raw)["successes"] == 18 and summarize(raw)["input_rows"] == len(rows)


def test_cli_retry_failed_on_a_finished_output(flaky, tmp_path):
    url_list, rows = flaky.url_list(str(tmp_path))
    raw = str(tmp_path / "raw")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    common = ["--allow-private-networks", "--timeout", str(TIMEOUT), "--samples-per-shard", "10"]
    first = subprocess.run([BIN, "download", "--url-list", url_list, "--output", raw, "--preset", "tiny",
                            "--retry-attempts", "0", *common], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    _, before, _ = _expected(rows, 0)
    assert summary["successes"] == 8 and summary["errors"] == dict(before) and "retry" not in summary
    second = subprocess.run([BIN, "download", "--retry-failed", "--output", raw, "--retry-attempts", "3",
                             "--retry-base-delay", "0.05"], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    recoverable, before, after = _expected(rows, 3)
    assert summary["successes"] == recoverable and summary["errors"] == dict(after)
    assert summary["retry"]["before"] == dict(before) and summary["retry"]["after"] == dict(after)
    assert len(set(_tar_keys(raw))) == len(_tar_keys(raw)) == recoverable
