"""A multi-host loopback web for politeness tests: several hosts (127.0.0.x addresses), each
counting its peak of concurrent requests and logging every request's arrival time.

What a host answers is spelled in the path, so a URL list says what each URL will meet::

    /ok/<delay>/<name>.png         a small PNG after <delay> seconds (concurrency builds up)
    /flaky429/<ra>/<name>.png      429 with Retry-After: <ra> the first time, then the PNG
    /flaky503/<ra>/<name>.png      503 (Retry-After: <ra> unless 0) the first time, then the PNG
    /reset/0/<name>.png            the connection reset (RST) the first time, then the PNG
    /404/0/<name>.png              404, always
    /noai/0/<name>.png             X-Robots-Tag: noai, then a large body trickled out (the bytes
                                   the client let through are counted: it should read none)
    /robots.txt                    the host's ``robots`` text (404 when None; ``robots_status``)

A request counts as in flight from its arrival to just before its response is written: a client
cannot see the end of a response before the count has dropped, so a peak above a client's cap is
the client's doing, never the server's timing. ``quiet_until`` is when a host's last Retry-After
ends (server clock = client clock: one machine). Used by tests/unit/test_politeness.py's
multi-process case and tests/integration/test_polite_download.py::

    with WebHosts(4) as web:
        url = web.url(0, "flaky429", 2, "a")     # http://127.0.0.10:PORT/flaky429/2/a.png
        ... web.hosts[0].peak, web.hosts[0].log, web.hosts[0].violations ...
"""

from __future__ import annotations

import dataclasses
import io
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 80), ((seed * 37) % 256, (seed * 91) % 256, 128)).save(buf, "PNG")
    return buf.getvalue()


@dataclasses.dataclass
class Host:
    """One host's counters (read them after its requests are done) and its robots.txt."""

    address: str
    robots: str | None = None
    robots_status: int = 200
    inflight: int = 0
    peak: int = 0
    quiet_from: float = 0.0  # when the last Retry-After was sent
    quiet_until: float = 0.0  # and when it ends
    log: list[tuple[float, str, int]] = dataclasses.field(default_factory=list)  # (arrival, path, status)
    # (arrival, path, quiet_from) of requests that arrived inside a Retry-After
    violations: list[tuple[float, str, float]] = dataclasses.field(default_factory=list)
    noai_bytes_sent: int = 0
    seen: set[str] = dataclasses.field(default_factory=set)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    server: _Server | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def paths(self) -> list[str]:
        with self.lock:
            return [p for _, p, _ in self.log]


NOAI_BODY = 8 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    host: Host  # set per server

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        h = self.host
        now = self.server.accepted.pop(id(self.request), time.time())
        with h.lock:
            if now < h.quiet_until:
                h.violations.append((now, self.path, h.quiet_from))
            h.inflight += 1
            h.peak = max(h.peak, h.inflight)
            first = self.path not in h.seen
            h.seen.add(self.path)
        status = 0
        try:
            status = self._answer(first)
        finally:
            with h.lock:
                h.log.append((now, self.path, status))

    def _done(self) -> None:
        with self.host.lock:
            self.host.inflight -= 1

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> int:
        self._done()  # before the first byte: see the module docstring
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        return status

    def _answer(self, first: bool) -> int:
        h = self.host
        if self.path == "/robots.txt":
            if h.robots is None:
                return self._send(404)
            return self._send(h.robots_status, h.robots.encode(), {"Content-Type": "text/plain"})
        parts = self.path.strip("/").split("/")
        if len(parts) != 3:
            return self._send(404)
        kind, arg, name = parts
        png = {"Content-Type": "image/png"}
        if kind == "ok":
            time.sleep(float(arg))
        elif kind in ("flaky429", "flaky503") and first:
            ra = int(arg)
            if ra:
                with h.lock:
                    h.quiet_from = time.time()
                    h.quiet_until = max(h.quiet_until, h.quiet_from + ra)
            return self._send(int(kind[-3:]), b"busy", {"Retry-After": str(ra)} if ra else {})
        elif kind == "reset" and first:
            self._done()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # RST, no response
            return -1
        elif kind == "404":
            return self._send(404, b"gone")
        elif kind == "noai":
            return self._trickle()
        return self._send(200, _png(sum(map(ord, name))), png)

    def _trickle(self) -> int:
        self._done()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("X-Robots-Tag", "noai")
        self.send_header("Content-Length", str(NOAI_BODY))
        self.end_headers()
        self.wfile.flush()
        chunk = b"\0" * 65536
        try:
            for _ in range(NOAI_BODY // len(chunk)):
                self.wfile.write(chunk)
                with self.host.lock:
                    self.host.noai_bytes_sent += len(chunk)
                time.sleep(0.01)
        except OSError:  # the client hung up: what it wanted to know was in the headers
            pass
        return 200


class _Server(ThreadingHTTPServer):
    """Stamps each connection when it is accepted: a request's arrival is when it reached the
    host, not when a thread of a busy test machine got round to reading it."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, *args):
        super().__init__(*args)
        self.accepted: dict[int, float] = {}

    def process_request(self, request, client_address) -> None:
        self.accepted[id(request)] = time.time()
        super().process_request(request, client_address)


class WebHosts:
    """``n`` loopback hosts, 127.0.0.10 + i, each on its own free port; a context manager."""

    def __init__(self, n: int, robots: dict[int, str] | None = None):
        self.hosts = [Host(f"127.0.0.{10 + i}", robots=(robots or {}).get(i)) for i in range(n)]

    def __enter__(self) -> WebHosts:
        for h in self.hosts:
            handler = type("Handler", (_Handler,), {"host": h})
            h.server = _Server((h.address, 0), handler)
            threading.Thread(target=h.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hosts:
            h.server.shutdown()
            h.server.server_close()

    def url(self, i: int, kind: str, arg: float | int, name: str) -> str:
        h = self.hosts[i]
        return f"http://{h.address}:{h.port}/{kind}/{arg}/{name}.png"

    @property
    def allow_hosts(self) -> tuple[str, ...]:
        return tuple(f"{h.address}:{h.port}" for h in self.hosts)
