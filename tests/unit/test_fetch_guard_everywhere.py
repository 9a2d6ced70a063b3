"""Every remote read goes through the fetch guard, not only image fetches: URL lists, encoders,
attribute files and http(s) locations, and the guard's deadline bounds a whole exchange.

Recording servers on 127.0.0.1 show that, with default settings, a loopback URL given as a URL
list, an encoder or an attributes file gets zero requests; that a redirect to a loopback port
that is not allowlisted is refused before it is followed; and that servers trickling headers or
body one byte at a time (plain or TLS) are cut off within the timeout plus 1 s. Other addresses
appear only as resolver-stub answers and in URLs that are never fetched: every real connection
goes to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import cli, storage
from pipeline.data.download import download, normalize_error, read_url_list
from pipeline.data.fetch_guard import guarded_download_image
from pipeline.netguard import (
    ENV_ALLOW_HOSTS,
    ENV_ALLOW_PRIVATE,
    FetchPolicy,
    RemoteReadRefused,
    allowing,
    build_opener,
    deployment_policy,
    refuse_model_url,
)

URL_LIST = b"url,caption\nhttp://93.184.216.34/secret-1.png,internal secret one\n"
ATTRIBUTES = json.dumps({"colors": {"red": [255, 0, 0]}, "shapes": ["circle"]}).encode()
TIMEOUT = 2.0  # seconds; the tricklers send a byte every TRICKLE_INTERVAL, far below it
TRICKLE_INTERVAL = 0.25


@pytest.fixture(autouse=True)
def default_settings(monkeypatch):
    """No deployment exemption leaks in from the environment running the tests."""
    monkeypatch.delenv(ENV_ALLOW_PRIVATE, raising=False)
    monkeypatch.delenv(ENV_ALLOW_HOSTS, raising=False)


class _Recording(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.requests.append(self.path)
        status, headers, body = self.server.routes.get(self.path, (404, {}, b"not found"))
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def recording(routes: dict | None = None):
    """A loopback HTTP server that records every request path in ``server.requests``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    server.daemon_threads = True
    server.routes, server.requests = dict(routes or {}), []
    server.host = f"127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def secret():
    """What an attacker would point the pipeline at: files on an internal loopback service."""
    with recording({"/urls.csv": (200, {"Content-Type": "text/csv"}, URL_LIST),
                    "/attributes.json": (200, {"Content-Type": "application/json"}, ATTRIBUTES),
                    "/t5/config.json": (200, {}, b"{}")}) as server:
        yield server


def _cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


# --- zero requests with default settings -------------------------------------------------

def test_url_list_on_loopback_is_never_requested(secret, tmp_path, capsys):
    for host in (secret.host, f"localhost:{secret.server_address[1]}", f"[::ffff:127.0.0.1]:{secret.server_address[1]}"):
        url = f"http://{host}/urls.csv"
        with pytest.raises(RemoteReadRefused, match="loopback_address") as err:
            download(url, str(tmp_path / "raw"))
        assert url in str(err.value) and "IMAGEN_ALLOW_PRIVATE_NETWORKS" in str(err.value)
        code, stderr = _cli(["download", "--url-list", url, "--output", str(tmp_path / "raw")], capsys)
        assert code == 2 and "loopback_address" in stderr and len(stderr.strip().splitlines()) == 1
    assert secret.requests == []
    assert not (tmp_path / "raw" / "refused.parquet").exists()  # nothing of the list was copied anywhere


def test_encoder_url_on_loopback_is_never_requested(secret, tmp_path, capsys):
    (tmp_path / "filtered").mkdir()
    (tmp_path / "filtered" / "000000.tar").write_bytes(b"")
    for encoder in (f"http://{secret.host}/t5", f"t5:http://{secret.host}/t5", f"https://{secret.host}/t5"):
        code, stderr = _cli(["embed", "--input", str(tmp_path / "filtered"), "--output", str(tmp_path / "emb"),
                             "--encoder", encoder], capsys)
        assert code == 2 and "loopback_address" in stderr and "local directory" in stderr, stderr
    assert secret.requests == []
    # A URL never reaches a loader, even where private networks are allowed; names and paths do.
    with pytest.raises(RemoteReadRefused, match="unsupported_scheme"):
        refuse_model_url(f"http://{secret.host}/t5", policy=FetchPolicy(allow_private_networks=True))
    with pytest.raises(RemoteReadRefused, match="unsupported_scheme"):
        refuse_model_url("s3://bucket/t5")
    for name in ("google/t5-v1_1-xxl", "t5:google/t5-v1_1-xxl", str(tmp_path / "t5-tiny"), "t5-small"):
        refuse_model_url(name)


def test_attributes_url_on_loopback_is_never_requested(secret):
    from pipeline.release.evaluate import EvalOptions, prompt_set

    url = f"http://{secret.host}/attributes.json"
    with pytest.raises(RemoteReadRefused, match="loopback_address"):
        prompt_set(EvalOptions(attributes=url))
    assert secret.requests == []
    # The deployer's exemption (the CLI's --allow-host) lets exactly that server through the guard.
    with allowing(hosts=[secret.host]):
        prompts, specs, _ = prompt_set(EvalOptions(attributes=url))
    assert prompts == ["a red circle on a white background"] and specs == [("red", "circle")]
    assert secret.requests == ["/attributes.json"]


def test_http_roots_and_unguarded_protocols_are_refused(secret):
    port = secret.server_address[1]
    root = f"http://{secret.host}/data"
    for call in (lambda: storage.exists(root + "/raw"), lambda: storage.list_shards(root + "/filtered"),
                 lambda: storage.size(root + "/raw/00000.tar"), lambda: storage.makedirs(root + "/raw"),
                 lambda: storage.open(root + "/x.tar", "wb"), lambda: storage.open(root + "/raw/00000.tar"),
                 lambda: storage.read_json(root + "/manifest.json")):
        with pytest.raises(ValueError, match="loopback_address|unsupported_scheme|read-only"):
            call()
    for uri in (f"ftp://127.0.0.1:{port}/urls.csv", f"webdav://127.0.0.1:{port}/x", f"sftp://127.0.0.1:{port}/x",
                f"zip://urls.csv::http://127.0.0.1:{port}/a.zip", f"simplecache::https://127.0.0.1:{port}/a.csv",
                f"reference://::http://127.0.0.1:{port}/refs.json"):
        with pytest.raises(RemoteReadRefused, match="unsupported_scheme"):
            storage.open(uri)
    assert secret.requests == []
    for uri in ("/data/x", "file:///data/x", "memory://x", "s3://bucket/x", "gs://bucket/x",
                "simplecache::s3://bucket/x", "zip://a.csv::/data/a.zip"):
        storage.check_protocols(uri)  # local disk and object stores keep working through fsspec


def test_allowed_http_url_list_is_read_through_the_guard(secret):
    table = read_url_list(f"http://{secret.host}/urls.csv", "csv", policy=FetchPolicy(allow_hosts=(secret.host,)))
    assert table.to_pylist() == [{"url": "http://93.184.216.34/secret-1.png", "caption": "internal secret one"}]
    with pytest.raises(FileNotFoundError, match="HTTP 404"):
        storage.open_url(f"http://{secret.host}/missing.csv", FetchPolicy(allow_hosts=(secret.host,)))
    with pytest.raises(RemoteReadRefused, match="response_too_large"):
        storage.open_url(f"http://{secret.host}/urls.csv", FetchPolicy(allow_hosts=(secret.host,)), max_bytes=10)
    assert secret.requests == ["/urls.csv", "/missing.csv", "/urls.csv"]


# --- redirects ------------------------------------------------------------------------------

def _stub(answers: dict[str, str]):
    def resolver(host, port, type=0):  # noqa: A002 - getaddrinfo's keyword
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers.get(host, host), port))]
    return resolver


def test_public_name_redirecting_to_loopback_is_refused(secret, tmp_path, capsys):
    targets = {"/to-ip": f"http://{secret.host}/urls.csv",
               "/to-name": f"http://localhost:{secret.server_address[1]}/attributes.json"}
    with recording({p: (302, {"Location": t}, b"") for p, t in targets.items()}) as front:
        # "cdn.example" stands for a public name: the stub resolves it to the front server, the one
        # exempt host:port. Its redirect to the internal server must be refused before it is followed.
        resolver = _stub({"cdn.example": "127.0.0.1", "localhost": "127.0.0.1"})
        policy = FetchPolicy(allow_hosts=(f"cdn.example:{front.server_address[1]}",))
        for path in targets:
            with pytest.raises(RemoteReadRefused, match="loopback_address.*redirected from") as err:
                storage.open_url(f"http://cdn.example:{front.server_address[1]}{path}", policy, resolver=resolver)
            assert "cdn.example" in str(err.value)
        # The same through the CLI: --allow-host reaches the front server, not what it redirects to.
        code, stderr = _cli(["download", "--url-list", f"http://{front.host}/to-ip", "--input-format", "csv",
                             "--output", str(tmp_path / "raw"), "--allow-host", front.host], capsys)
        assert code == 2 and "loopback_address" in stderr and "redirected from" in stderr
        assert front.requests == ["/to-ip", "/to-name", "/to-ip"]
    assert secret.requests == []


# --- the deadline bounds the whole exchange ----------------------------------------------------

class Trickler:
    """Accepts HTTP connections on 127.0.0.1 and answers one byte every ``TRICKLE_INTERVAL``:
    the header lines (``mode="headers"``), or a body after complete headers (``mode="body"``).
    Each byte arrives long before a per-recv socket timeout would fire."""

    def __init__(self, mode: str, tls: ssl.SSLContext | None = None):
        self.mode, self.tls, self.stop = mode, tls, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self) -> Trickler:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.sock.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while not self.stop.is_set():
                conn, _ = self.sock.accept()
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
        with conn, contextlib.suppress(OSError):
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            conn.recv(65536)
            if self.mode == "headers":
                slow, fast = head + b"X-Pad: " + b"a" * 4000 + b"\r\n\r\n", b""
            else:
                fast, slow = head + b"Content-Length: 4000\r\n\r\n", b"\x89PNG" + b"a" * 3996
            conn.sendall(fast)
            for i in range(len(slow)):
                if self.stop.wait(TRICKLE_INTERVAL):
                    return
                conn.sendall(slow[i:i + 1])


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_trickling_image_server_is_cut_off_at_the_deadline(mode):
    with Trickler(mode) as server:
        policy = FetchPolicy(allow_hosts=(server.host,))
        start = time.monotonic()
        _, stream, err = guarded_download_image((0, f"http://{server.host}/a.png"), TIMEOUT, None, None,
                                                opener=build_opener(policy), policy=policy)
        elapsed = time.monotonic() - start
    print(f"image fetch, trickled {mode}: cut off after {elapsed:.2f} s (timeout {TIMEOUT} s)")
    assert stream is None and normalize_error(err) == "timeout", err
    assert TIMEOUT - 0.1 < elapsed < TIMEOUT + 1


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_trickling_remote_file_is_cut_off_at_the_deadline(mode):
    with Trickler(mode) as server:
        start = time.monotonic()
        with pytest.raises(OSError, match="timed out"):
            storage.open_url(f"http://{server.host}/urls.csv", FetchPolicy(allow_hosts=(server.host,)),
                             timeout=TIMEOUT)
        elapsed = time.monotonic() - start
    print(f"remote file read, trickled {mode}: cut off after {elapsed:.2f} s (timeout {TIMEOUT} s)")
    assert TIMEOUT - 0.1 < elapsed < TIMEOUT + 1


def _self_signed(tmp_path) -> tuple[ssl.SSLContext, str]:
    """A server context for 127.0.0.1 and the CA file a client needs to trust it."""
    pytest.importorskip("cryptography")
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return server, str(tmp_path / "cert.pem")


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_trickling_tls_server_is_cut_off_at_the_deadline(mode, tmp_path):
    server_context, ca = _self_signed(tmp_path)
    with Trickler(mode, tls=server_context) as server:
        policy = FetchPolicy(allow_hosts=(server.host,))
        opener = build_opener(policy)
        for handler in opener.handlers:  # trust the test certificate, as a deployment's CA bundle would
            if getattr(handler, "_context", None) is not None:
                handler._context.load_verify_locations(ca)
        start = time.monotonic()
        _, stream, err = guarded_download_image((0, f"https://{server.host}/a.png"), TIMEOUT, None, None,
                                                opener=opener, policy=policy)
        elapsed = time.monotonic() - start
    print(f"image fetch over TLS, trickled {mode}: cut off after {elapsed:.2f} s (timeout {TIMEOUT} s)")
    assert stream is None and normalize_error(err) == "timeout", err
    assert TIMEOUT - 0.1 < elapsed < TIMEOUT + 1


# --- deployment settings, missing captions ----------------------------------------------------

def test_deployment_policy_comes_from_the_environment():
    assert deployment_policy({}) == FetchPolicy()
    policy = deployment_policy({ENV_ALLOW_PRIVATE: "1", ENV_ALLOW_HOSTS: "127.0.0.1:8799, Data.Local:443"})
    assert policy.allow_private_networks and policy.allow_hosts == ("127.0.0.1:8799", "data.local:443")
    assert not deployment_policy({ENV_ALLOW_PRIVATE: "0"}).allow_private_networks
    with pytest.raises(ValueError, match="IMAGEN_ALLOW_PRIVATE_NETWORKS='maybe'"):
        deployment_policy({ENV_ALLOW_PRIVATE: "maybe"})
    widened = deployment_policy({ENV_ALLOW_HOSTS: "a:1"}, allow_hosts=("b:2",), max_bytes=5)
    assert widened.allow_hosts == ("a:1", "b:2") and widened.max_bytes == 5
    with allowing(True, ["c:3"]):
        assert deployment_policy({}) == FetchPolicy(allow_private_networks=True, allow_hosts=("c:3",))
    assert deployment_policy({}) == FetchPolicy()  # only for the block


def test_environment_flag_beside_a_field_is_passed_once():
    """Issue 24 item 0: with IMAGEN_ALLOW_PRIVATE_NETWORKS=1 set, the `or` short-circuited before the
    field was popped, and FetchPolicy got allow_private_networks twice (every download died)."""
    for flag in ("1", "0"):
        for asked in (True, False):
            policy = deployment_policy({ENV_ALLOW_PRIVATE: flag}, allow_private_networks=asked, max_bytes=7)
            assert policy.allow_private_networks == (flag == "1" or asked) and policy.max_bytes == 7


def test_environment_exemption_reaches_remote_reads(secret, monkeypatch):
    monkeypatch.setenv(ENV_ALLOW_HOSTS, secret.host)
    with storage.open(f"http://{secret.host}/attributes.json", "r") as f:
        assert json.load(f)["shapes"] == ["circle"]
    monkeypatch.setenv(ENV_ALLOW_HOSTS, "")
    monkeypatch.setenv(ENV_ALLOW_PRIVATE, "1")
    assert storage.open(f"http://{secret.host}/urls.csv").read() == URL_LIST
    assert secret.requests == ["/attributes.json", "/urls.csv"]


def test_nan_and_none_captions_are_missing_captions(tmp_path):
    from pipeline.data.filter_registry import CaptionLengthFilter, Sample

    urls = ["http://93.184.216.34/a.png", "http://93.184.216.34/b.png", "http://93.184.216.34/c.png"]
    pq.write_table(pa.table({"url": urls, "caption": pa.array([float("nan")] * 3)}), tmp_path / "nan.parquet")
    pq.write_table(pa.table({"url": urls, "caption": ["a cat", None, None]}), tmp_path / "none.parquet")
    rows = [f'{{"url": "{u}", "caption": {c}}}' for u, c in zip(urls, ("NaN", "null", '"a dog"'), strict=True)]
    (tmp_path / "nan.json").write_text("[" + ", ".join(rows) + "]")  # Python's json writes a bare NaN
    (tmp_path / "empty.csv").write_text("url,caption\n" + "".join(f"{u},\n" for u in urls))
    cases = {"nan.parquet": ["", "", ""], "none.parquet": ["a cat", "", ""], "nan.json": ["", "", "a dog"],
             "empty.csv": ["", "", ""]}
    for name, captions in cases.items():
        table = read_url_list(str(tmp_path / name), name.rsplit(".", 1)[1])
        assert table["caption"].type == pa.string() and table["caption"].to_pylist() == captions, name
    check = CaptionLengthFilter(3, 512).check
    assert check(Sample(key="0", caption="", image_bytes=None)) == "caption_too_short"
