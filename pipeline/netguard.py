"""The network guard: what a remote read may reach, and the one opener that reaches it (SSRF guard).

Every http(s) request the pipeline makes goes through :func:`build_opener`'s opener, which

- refuses non-HTTP(S) URLs, and URLs whose host is, or resolves to, a loopback, private,
  link-local, multicast or reserved address (:func:`address_reason`, :func:`literal_reason`,
  :func:`resolve_checked`), on the first request and after every redirect;
- connects to exactly the addresses it checked (a second DNS answer cannot slip in between the
  check and the connection: no DNS rebinding), ignores proxy settings (a proxy would do its own
  DNS), and never sends a byte to a refused host;
- enforces a total time budget per request, name resolution included (a slow DNS server or a
  server that trickles bytes cannot hold a thread forever); :func:`read_limited` adds a maximum
  body size.

Who uses it: :mod:`pipeline.storage` reads http(s) URIs (URL lists, attribute files) with
:func:`build_opener` and refuses unguarded network protocols; :mod:`pipeline.data.fetch_guard`
installs it in img2dataset's download processes (and adds the image body checks there);
:func:`refuse_model_url` keeps a model given as a URL (``--encoder http://...``) from any loader.
This module sits below ``storage`` and imports nothing of the pipeline.

Every error message starts with a stable reason (``"loopback_address: ..."``); see
:func:`pipeline.data.download.normalize_error`. ``FetchPolicy.allow_private_networks`` lets private
addresses through (the tiny dataset on 127.0.0.1 needs it); ``allow_hosts`` lets through only
the listed ``host:port`` pairs (tests run a loopback server with the guard otherwise on). Both
are deployment settings, read from the environment of the process by :func:`deployment_policy`:
``IMAGEN_ALLOW_PRIVATE_NETWORKS=1`` and ``IMAGEN_ALLOW_HOSTS="127.0.0.1:8799,other:443"``
(the CLI's ``--allow-private-networks`` / ``--allow-host`` add to them for one command, through
:func:`allowing`)::

    from pipeline import netguard
    policy = netguard.deployment_policy()
    with netguard.build_opener(policy).open(request, timeout=30) as r:   # request.deadline optional
        body = netguard.read_limited(r, policy.max_bytes, deadline)

Not a script.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import http.client
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator

ALLOWED_SCHEMES = ("http", "https")
# Reasons that mean "never contacted": the manifest counts them under "refused".
# Politeness (pipeline.data.politeness): a URL robots.txt disallows is never requested (permanent);
# one whose host asked for quiet (Retry-After, repeated failures) is put off (transient).
ROBOTS_DISALLOWED = "robots_disallowed"
HOST_BACKOFF = "host_backoff"
REFUSAL_REASONS = ("invalid_url", "unsupported_scheme", "loopback_address", "private_address",
                   "link_local_address", "multicast_address", "reserved_address", ROBOTS_DISALLOWED)
# Reasons for a fetched body we would not hand to a decoder. unsized_format: an image format
# some decoder reads but the guard cannot size (so cannot bound); unsupported_format: one no
# decoder of the chain reads; hdr_unreadable: HDR/float data that could not be tone-mapped.
BODY_REASONS = ("timeout", "response_too_large", "empty_body", "not_an_image", "decompression_bomb",
                "unsized_format", "unsupported_format", "hdr_unreadable")
# The entries of IANA's IPv4 and IPv6 special-purpose address registries that are not globally
# reachable (RFC 6890 and its updates), with the reason a fetch is refused under. First match wins.
_V4_SPECIAL = tuple((ipaddress.IPv4Network(n), r) for n, r in (
    ("0.0.0.0/8", "reserved_address"),  # "this network"
    ("10.0.0.0/8", "private_address"), ("172.16.0.0/12", "private_address"),
    ("192.168.0.0/16", "private_address"),  # RFC 1918
    ("100.64.0.0/10", "private_address"),  # carrier-grade NAT, RFC 6598: someone's internal network
    ("127.0.0.0/8", "loopback_address"),
    ("169.254.0.0/16", "link_local_address"),  # includes 169.254.169.254, the cloud metadata service
    ("192.0.0.0/24", "reserved_address"),  # IETF protocol assignments (DS-Lite, NAT64 discovery ...)
    ("192.0.2.0/24", "reserved_address"), ("198.51.100.0/24", "reserved_address"),
    ("203.0.113.0/24", "reserved_address"),  # documentation
    ("192.88.99.0/24", "reserved_address"),  # 6to4 relay anycast, deprecated (RFC 7526)
    ("198.18.0.0/15", "reserved_address"),  # benchmarking
    ("224.0.0.0/4", "multicast_address"),
    ("240.0.0.0/4", "reserved_address"),  # future use, and 255.255.255.255 limited broadcast
))
_V6_SPECIAL = tuple((ipaddress.IPv6Network(n), r) for n, r in (
    ("::/128", "reserved_address"), ("::1/128", "loopback_address"),
    ("64:ff9b:1::/48", "reserved_address"),  # local-use NAT64 (RFC 8215): a private translator
    ("100::/64", "reserved_address"),  # discard-only
    ("2001::/23", "reserved_address"),  # IETF protocol assignments: Teredo, benchmarking, ORCHID ...
    ("2001:db8::/32", "reserved_address"), ("3fff::/20", "reserved_address"),  # documentation
    ("5f00::/16", "reserved_address"),  # SRv6 SIDs
    ("fc00::/7", "private_address"),  # unique local addresses
    ("fec0::/10", "private_address"),  # site-local, deprecated: still routed inside some sites
    ("fe80::/10", "link_local_address"),
    ("ff00::/8", "multicast_address"),
))
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # ::a.b.c.d, deprecated (RFC 4291)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)

Resolver = Callable[..., list]
# getaddrinfo cannot be interrupted: a lookup under a deadline runs in a daemon thread, which
# the caller leaves behind at the deadline. At most this many such threads per process; a lookup
# that finds none free within its deadline times out without starting one.
RESOLVER_THREADS = 64
RESOLVER_THREAD_NAME = "fetch-guard-resolve"
_resolver_slots: dict[int, threading.BoundedSemaphore] = {}  # by process id: a forked child gets its own


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """What the download processes may fetch. Defaults are safe for the open internet."""

    allow_private_networks: bool = False
    allow_hosts: tuple[str, ...] = ()  # exact "host:port" (or "host") pairs exempt from the address check
    max_bytes: int = 32 * 1024 * 1024  # larger bodies are refused: no web image worth training on is bigger
    max_pixels: int = 64_000_000  # declared width*height above this is a decompression bomb


# OpenCV's own cap on the pixels one decode may declare (its default is 2**30): the download
# workers get the policy's, a second wall behind the guard's header check. OpenCV reads it once,
# when it loads, so it is set in the environment the workers start with.
ENV_OPENCV_MAX_PIXELS = "OPENCV_IO_MAX_IMAGE_PIXELS"


def decoder_env(policy: FetchPolicy) -> dict[str, str]:
    """Environment variables for a process that decodes fetched images under ``policy``."""
    return {ENV_OPENCV_MAX_PIXELS: str(policy.max_pixels)}


class FetchRejected(OSError):
    """A URL or response refused by the guard; ``str()`` is ``"reason: detail"``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _ipv4_reason(ip: ipaddress.IPv4Address) -> str | None:
    for net, reason in _V4_SPECIAL:
        if ip in net:
            return reason
    return None if ip.is_global else "reserved_address"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[list[ipaddress.IPv4Address], bool]:
    """The IPv4 addresses an IPv6 address carries, and whether the IPv6 form itself is usable.

    A mapped address (``::ffff:a.b.c.d``) is a.b.c.d on a dual-stack socket; the well-known
    NAT64 prefix and 6to4 reach a.b.c.d through a translator or relay: these stand or fall with
    a.b.c.d (public NAT64 is how IPv6-only clusters reach IPv4 sites). IPv4-compatible ``::a.b.c.d``
    (deprecated) and Teredo (inside 2001::/23) are refused whatever they carry; the carried
    address only names the reason.
    """
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped], True
    if ip in _NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)], True
    if ip.sixtofour is not None:
        return [ip.sixtofour], True
    if ip.teredo is not None:
        return list(ip.teredo), False  # (server, client)
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # not :: nor ::1
        return [ipaddress.IPv4Address(int(ip))], False
    return [], True


def address_reason(address: str) -> str | None:
    """None for a globally reachable unicast address, else why it is refused.

    Refuses every range of IANA's special-purpose registries that is not globally reachable;
    IPv4 addresses embedded in IPv6 (mapped, compatible, NAT64, 6to4, Teredo) are checked as
    IPv4 too, so ``64:ff9b::7f00:1`` is loopback like 127.0.0.1.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 4:
        return _ipv4_reason(ip)
    embedded, usable = _embedded_ipv4(ip)
    for v4 in embedded:
        reason = _ipv4_reason(v4)
        if reason is not None:
            return reason
    if embedded and usable:
        return None
    for net, reason in _V6_SPECIAL:
        if ip in net:
            return reason
    if embedded or not ip.is_global:
        return "reserved_address"
    return None


def _allowed_host(host: str, port: int | None, policy: FetchPolicy) -> bool:
    host = host.lower().strip("[]")
    return host in policy.allow_hosts or f"{host}:{port}" in policy.allow_hosts


def literal_reason(url: str, policy: FetchPolicy) -> str | None:
    """The refusal reason decidable from the URL alone (scheme, literal IP), without DNS."""
    try:
        parts = urllib.parse.urlsplit(url or "")
        host, port = parts.hostname, parts.port
    except ValueError:
        return "invalid_url"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return "unsupported_scheme"
    port = port or (443 if parts.scheme.lower() == "https" else 80)
    if not host:
        return "invalid_url"
    if policy.allow_private_networks or _allowed_host(host, port, policy):
        return None
    try:
        return address_reason(host)
    except ValueError:
        return None  # a name: checked when it is resolved, at fetch time


def _resolve_by(resolver: Resolver, host: str, port: int, deadline: float | None) -> list[tuple]:
    """``resolver(host, port, type=SOCK_STREAM)``, given up at ``deadline`` (``time.monotonic()``).

    Raises TimeoutError (``"timeout: ..."``) when the answer is not there by the deadline; the
    lookup's thread ends when the resolver returns, and holds one of ``RESOLVER_THREADS`` till then.
    """
    if deadline is None:
        return resolver(host, port, type=socket.SOCK_STREAM)
    slots = _resolver_slots.get(os.getpid()) or _resolver_slots.setdefault(
        os.getpid(), threading.BoundedSemaphore(RESOLVER_THREADS))
    if not slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"timeout: resolving {host!r}: all {RESOLVER_THREADS} resolver threads are waiting on "
                           "slow lookups and none came free within the request's time budget")
    done, outcome = threading.Event(), {}

    def lookup() -> None:
        try:
            outcome["infos"] = resolver(host, port, type=socket.SOCK_STREAM)
        except BaseException as err:  # noqa: BLE001 - handed to the caller, if it still waits
            outcome["error"] = err
        finally:
            slots.release()
            done.set()

    threading.Thread(target=lookup, name=RESOLVER_THREAD_NAME, daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"timeout: resolving {host!r} did not finish within the request's time budget")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["infos"]


def resolve_checked(host: str, port: int, policy: FetchPolicy, resolver: Resolver | None = None,
                    deadline: float | None = None) -> list[tuple]:
    """Resolve ``host`` and return the ``getaddrinfo`` entries to connect to.

    Raises :class:`FetchRejected` when any answer is refused: a name that resolves to both a
    public and a private address is refused, so which one a connection picks cannot matter.
    ``resolver`` defaults to ``socket.getaddrinfo`` (looked up at call time); with a
    ``deadline`` (``time.monotonic()``) the lookup counts against it (TimeoutError).
    """
    try:
        infos = _resolve_by(resolver or socket.getaddrinfo, host, port, deadline)
    except (socket.gaierror, UnicodeError) as err:
        raise OSError(f"dns_error: cannot resolve {host!r}: {err}") from err
    if policy.allow_private_networks or _allowed_host(host, port, policy):
        return infos
    for info in infos:
        reason = address_reason(info[4][0])
        if reason is not None:
            raise FetchRejected(reason, f"{host}:{port} resolves to {info[4][0]}")
    return infos


class _DeadlineMixin:
    """A socket whose every operation is bounded by what is left of one wall-clock budget.

    Socket timeouts count per call: a server sending one byte a second never trips a 3 s one.
    Re-arming the timeout to the time left before each call makes the budget bound the whole
    exchange (connect, TLS, headers, body), however the bytes trickle in.
    """

    deadline: float | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out: the request's time budget is spent")
            self.settimeout(left)

    def connect(self, address):
        self._arm()
        return super().connect(address)

    def recv(self, *args, **kwargs):
        self._arm()
        return super().recv(*args, **kwargs)

    def recv_into(self, *args, **kwargs):
        self._arm()
        return super().recv_into(*args, **kwargs)

    def send(self, *args, **kwargs):
        self._arm()
        return super().send(*args, **kwargs)

    def sendall(self, *args, **kwargs):
        self._arm()
        return super().sendall(*args, **kwargs)


class _DeadlineSocket(_DeadlineMixin, socket.socket):
    pass


class _DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    pass  # SSLContext.sslsocket_class; the handshake runs under the timeout left at connect


def _connect_pinned(infos: list[tuple], timeout: float | None, source_address=None,
                    deadline: float | None = None) -> socket.socket:
    """``socket.create_connection`` over already-checked addresses (no second DNS lookup)."""
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in infos:
        sock = _DeadlineSocket(family, type_, proto)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            sock.deadline = deadline
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last = err
    raise last or OSError("no address to connect to")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, infos: list[tuple], deadline: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_pinned, infos, deadline)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    # The TLS handshake still uses self.host for SNI and certificate checks.
    def __init__(self, *args, infos: list[tuple], deadline: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_pinned, infos, deadline)
        self._deadline = deadline

    def connect(self):
        super().connect()
        self.sock.deadline = self._deadline  # a _DeadlineSSLSocket: see _GuardedHTTPSHandler


def _pinned(infos, deadline, _address, timeout, source_address):
    return _connect_pinned(infos, timeout, source_address, deadline)


def _deadline_of(req: urllib.request.Request) -> float | None:
    """The request's wall-clock deadline, set on its first connection and kept across redirects."""
    if getattr(req, "deadline", None) is None and isinstance(req.timeout, (int, float)):
        req.deadline = time.monotonic() + req.timeout
    return getattr(req, "deadline", None)


def _checked_infos(req: urllib.request.Request, policy: FetchPolicy, resolver: Resolver | None) -> list[tuple]:
    parts = urllib.parse.urlsplit(req.full_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        return resolve_checked(parts.hostname or "", port, policy, resolver, _deadline_of(req))
    except FetchRejected as err:
        origin = getattr(req, "redirected_from", None)
        if origin:  # say where the redirect came from: that URL is the one to report or drop
            raise FetchRejected(err.reason, f"{err.args[0].split(': ', 1)[1]} (redirected from {origin})") from None
        raise


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicy, resolver: Resolver | None):
        super().__init__()
        self.policy, self.resolver = policy, resolver

    def http_open(self, req):
        deadline = _deadline_of(req)
        infos = _checked_infos(req, self.policy, self.resolver)
        return self.do_open(functools.partial(_PinnedHTTPConnection, infos=infos, deadline=deadline), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicy, resolver: Resolver | None):
        context = ssl.create_default_context()
        context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(context=context)
        self.policy, self.resolver = policy, resolver

    def https_open(self, req):
        deadline = _deadline_of(req)
        infos = _checked_infos(req, self.policy, self.resolver)
        return self.do_open(functools.partial(_PinnedHTTPSConnection, infos=infos, deadline=deadline), req,
                            context=self._context)


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    def http_error_302(self, req, fp, code, msg, headers):
        # Checked before urllib's own rule, which lets ftp:// through and words other refusals as HTTP errors.
        location = headers.get("location") or headers.get("uri")
        if location:
            target = urllib.parse.urljoin(req.full_url, location)
            if urllib.parse.urlsplit(target).scheme.lower() not in ALLOWED_SCHEMES:
                fp.close()
                raise FetchRejected("unsupported_scheme", f"redirect from {req.full_url} to {target}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.redirected_from = getattr(req, "redirected_from", None) or req.full_url
            new.deadline = getattr(req, "deadline", None)  # one budget for the whole chain
        return new


def build_opener(policy: FetchPolicy, resolver: Resolver | None = None) -> urllib.request.OpenerDirector:
    """An opener that speaks only HTTP(S), without proxies, through the address guard.

    ``resolver``: ``getaddrinfo``'s signature (default: ``socket.getaddrinfo`` at call time); a
    request's timeout covers its lookups too (:func:`resolve_checked`)."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.UnknownHandler(), _GuardedHTTPHandler(policy, resolver),
                    _GuardedHTTPSHandler(policy, resolver), urllib.request.HTTPDefaultErrorHandler(),
                    _GuardedRedirectHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


ENV_ALLOW_PRIVATE = "IMAGEN_ALLOW_PRIVATE_NETWORKS"
ENV_ALLOW_HOSTS = "IMAGEN_ALLOW_HOSTS"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


# What a CLI command's --allow-private-networks / --allow-host add for its duration (see allowing).
_WIDENED: contextvars.ContextVar[tuple[bool, tuple[str, ...]]] = contextvars.ContextVar(
    "imagen_fetch_widened", default=(False, ()))


def deployment_policy(environ: dict | None = None, **fields) -> FetchPolicy:
    """The deployment's policy: ``IMAGEN_ALLOW_PRIVATE_NETWORKS`` and ``IMAGEN_ALLOW_HOSTS`` from
    the environment of the services (never from a trigger form), widened by :func:`allowing`
    and by ``fields`` (``allow_private_networks=True``, ``allow_hosts=(...)``, other fields)."""
    env = os.environ if environ is None else environ
    flag = env.get(ENV_ALLOW_PRIVATE, "").strip().lower()
    if flag not in _TRUE + _FALSE:
        raise ValueError(f"{ENV_ALLOW_PRIVATE}={env[ENV_ALLOW_PRIVATE]!r}: set it to 1 (allow) or 0 (refuse)")
    widened_private, widened_hosts = _WIDENED.get()
    hosts = [*re.split(r"[\s,]+", env.get(ENV_ALLOW_HOSTS, "")), *widened_hosts, *fields.pop("allow_hosts", ())]
    # Pop before the `or`: a short-circuit would leave the field in `fields` and pass it twice.
    asked_private = bool(fields.pop("allow_private_networks", False))
    private = flag in _TRUE or widened_private or asked_private
    return FetchPolicy(allow_private_networks=private,
                       allow_hosts=tuple(dict.fromkeys(h.lower() for h in hosts if h)), **fields)


@contextlib.contextmanager
def allowing(private_networks: bool = False, hosts: Iterable[str] | None = ()) -> Iterator[None]:
    """Widen :func:`deployment_policy` for the reads inside the block (one CLI command's flags:
    whoever runs the CLI deploys it)."""
    token = _WIDENED.set((bool(private_networks), tuple(hosts or ())))
    try:
        yield
    finally:
        _WIDENED.reset(token)


class RemoteReadRefused(FetchRejected, ValueError):
    """A remote file (URL list, attributes, encoder) the guard refused: one line says what to do."""

    def __init__(self, reason: str, what: str, detail: str, hint: bool = True):
        if hint and reason.endswith("_address"):
            detail += (f"; private, loopback and link-local addresses are refused unless the deployment sets "
                       f"{ENV_ALLOW_PRIVATE}=1 or {ENV_ALLOW_HOSTS}=HOST:PORT (CLI: --allow-private-networks, "
                       "--allow-host HOST:PORT)")
        super().__init__(reason, f"{what}: {detail}")


_URL_IN_SPEC = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def refuse_model_url(spec: str, what: str = "text encoder", policy: FetchPolicy | None = None) -> None:
    """Refuse a model given as a URL before any loader sees it (no request is made).

    transformers loads hub names and local directories; anything else would be fetched without
    the guard. A hub name (``google/t5-v1_1-xxl``, ``t5:google/...``) or a path passes.
    """
    match = _URL_IN_SPEC.search(str(spec))
    if match is None:
        return
    reason = literal_reason(match.group(0), policy or deployment_policy()) or "unsupported_scheme"
    raise RemoteReadRefused(reason, f"{what} {spec}", "models load from a hub name or a local directory, "
                            "never from a URL; download it and pass the directory", hint=False)


def read_limited(response, max_bytes: int, deadline: float) -> bytes:
    """Read the body in chunks, within a size limit and a wall-clock deadline."""
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        raise FetchRejected("response_too_large", f"Content-Length {length} > {max_bytes} bytes")
    chunks, total = [], 0
    while chunk := response.read(256 * 1024):
        total += len(chunk)
        if total > max_bytes:
            raise FetchRejected("response_too_large", f"body over {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise FetchRejected("timeout", "body not read within the timeout")
        chunks.append(chunk)
    return b"".join(chunks)
