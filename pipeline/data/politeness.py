"""Politeness per host, shared by every download thread and process of a machine, and robots.txt.

A LAION-style list puts millions of URLs on a handful of hosts; img2dataset alone would open
``processes x threads`` connections to one of them and never wait. :class:`Politeness` sits in
front of every guarded fetch (:func:`pipeline.data.fetch_guard.guarded_download_image`):

- **connections**: at most ``connections`` requests in flight per host (``host:port``). The slots
  are byte-range locks (``fcntl.lockf``) on one small file per host in the lock dir
  (``$IMAGEN_POLITENESS_DIR``, default ``/tmp/imagen-politeness-$UID``): slot *i* is byte
  ``SLOTS + i``. POSIX locks exclude other processes, and the kernel drops a crashed process's
  locks, so a killed worker never leaks a slot; threads of one process share its locks, so a set
  of held slots per process (under a condition variable) excludes them from each other.
- **rate**: a token bucket per host (``rate`` requests/s, ``burst`` at once) in the same file,
  read and written through an ``mmap`` under a lock on byte ``STATE``. A request takes a token or
  reserves the next one and sleeps until it is due, so waiting threads are served in order.
- **Retry-After** on a 429 or 503 (seconds or an HTTP date) is written to the host's file; every
  worker of the machine sleeps until it has elapsed before its next request to that host.
- **backoff**: after ``failures_before_backoff`` failures in a row (429, 5xx, reset, timeout),
  the host is left alone for ``backoff_base * 2**k`` seconds, at most ``backoff_cap``; a success
  resets the count. A URL whose host asks for a wait longer than ``max_wait`` is not fetched:
  it fails as ``host_backoff`` (a transient reason: the retry pass fetches it again later).
- **robots.txt** (RFC 9309), on by default: fetched once per origin through the same guarded
  opener (and under the same caps), cached per process and on disk in the lock dir for
  ``robots_ttl`` (24 h, the RFC's limit). Our group is the one naming ``user_agent_token``
  (img2dataset's token, which ``X-Robots-Tag`` opt-outs also name), else ``*``; the longest
  matching rule wins, ``Allow`` on a tie; ``*`` and ``$`` are understood. A disallowed URL is
  never requested and fails as ``robots_disallowed`` (permanent). A 4xx robots.txt allows all
  (RFC 9309 2.3.1.3); a 5xx or 429 disallows the whole origin for ``robots_retry`` seconds
  (2.3.1.4), counted as ``host_backoff`` so the retry pass comes back; an unreachable one
  (connection refused, timeout) allows: the image request that follows meets the same host and
  fails on its own if it is down, and a site that cannot serve robots.txt has published no rule.

The caps and robots.txt are those of the URL's own host: a redirect to another host is followed
under the first host's slot (the guard still checks every hop's address).

A thread waits for a busy host in place (img2dataset hands each thread the next URL of the list):
a shard whose URLs crowd onto one host runs at that host's pace, so a list sorted by host is
slower than a shuffled one.

The caps hold per machine: each process on it opens the same lock dir. On Spark each executor
machine has its own, so a cluster of M executor machines may open ``connections x M`` connections
and send ``rate x M`` requests/s to one host: divide the caps by M for a per-cluster budget.
``connections`` or ``rate`` 0 turns that cap off. Not a script; see :mod:`pipeline.data.fetch_guard`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import email.utils
import fcntl
import hashlib
import json
import mmap
import os
import re
import struct
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable

from pipeline.netguard import (  # reason names: netguard owns them all
    HOST_BACKOFF,
    ROBOTS_DISALLOWED,
)

ENV_DIR = "IMAGEN_POLITENESS_DIR"

# host file: [0, 40) the state below; locks on bytes far past it (a lock may lie beyond EOF)
_STATE = struct.Struct("<ddddq")  # tokens, bucket stamp, retry_after_until, backoff_until, failures
STATE = 1 << 16
SLOTS = STATE + 1
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309 2.5: parse at least 500 KiB
# A list may name millions of hosts: each process keeps at most this many host files open (idle
# ones are closed past it) and this many origins' robots.txt in memory (the disk copy stays).
MAX_OPEN_HOSTS = 256
MAX_ROBOTS_CACHED = 4096


@dataclasses.dataclass(frozen=True)
class PolitenessConfig:
    """How polite a machine's downloads are to each host (see the module docstring)."""

    connections: int = 4  # requests in flight per host and machine; 0: no cap
    rate: float = 5.0  # requests/s per host and machine; 0: no cap
    burst: int = 10  # requests a rested host gets at once
    robots_txt: bool = True
    user_agent_token: str | None = "img2dataset"
    lock_dir: str | None = None  # None: $IMAGEN_POLITENESS_DIR, else /tmp/imagen-politeness-$UID
    failures_before_backoff: int = 3
    backoff_base: float = 2.0
    backoff_cap: float = 300.0
    max_wait: float = 60.0  # a host asking for a longer wait: its URLs fail as host_backoff
    robots_timeout: float = 5.0
    robots_ttl: float = 24 * 3600.0
    robots_retry: float = 600.0  # a 5xx robots.txt is asked again after this long


def default_lock_dir() -> str:
    return os.environ.get(ENV_DIR) or os.path.join(tempfile.gettempdir(), f"imagen-politeness-{os.getuid()}")


def host_key(url: str) -> tuple[str, str]:
    """(``host:port``, origin ``scheme://host:port``) of a URL; port defaults by scheme."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"{(parts.hostname or '').lower()}:{port}"
    return host, f"{parts.scheme}://{host}"


def _state_path(lock_dir: str, host: str, suffix: str = "") -> str:
    return os.path.join(lock_dir, hashlib.sha1(host.encode()).hexdigest()[:24] + suffix)


def hosts_quiet_for(config: PolitenessConfig, urls: Iterable[str], now: float | None = None) -> float:
    """Seconds until every host of ``urls`` is past its Retry-After and failure backoff on this
    machine (0 when none holds one), read from the hosts' shared state without creating any: the
    retry pass waits this long, so that its fetches are not refused as ``host_backoff`` again."""
    now = time.time() if now is None else now
    lock_dir, longest = config.lock_dir or default_lock_dir(), 0.0
    for host in {host_key(u)[0] for u in urls}:
        try:
            with open(_state_path(lock_dir, host), "rb") as f:
                data = f.read(_STATE.size)
        except FileNotFoundError:
            continue
        if len(data) == _STATE.size:
            _, _, retry_until, backoff_until, _ = _STATE.unpack(data)
            longest = max(longest, retry_until - now, backoff_until - now)
    return longest


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) as seconds from ``now``; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return max(email.utils.parsedate_to_datetime(value).timestamp() - now, 0.0)
    return None


class _Host:
    """One host's shared file, mapped in this process, and this process's slot bookkeeping."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self.fd).st_size < _STATE.size:
            os.ftruncate(self.fd, _STATE.size)  # zeros: a full bucket, no wait, no failures
        self.mm = mmap.mmap(self.fd, _STATE.size)
        self.lock = threading.Lock()  # POSIX locks do not exclude this process's own threads
        self.freed = threading.Condition(self.lock)
        self.held: set[int] = set()
        self.users = 0  # requests of this process between before() and done(); guarded by Politeness

    def close(self) -> None:
        """Unmap and close (only when no request uses it: closing drops this process's locks)."""
        self.mm.close()
        os.close(self.fd)

    @contextlib.contextmanager
    def state(self):
        """The state tuple, under the machine-wide lock; the caller yields the new one via ``box``."""
        with self.lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, STATE)
            try:
                box = [list(_STATE.unpack_from(self.mm))]
                yield box
                _STATE.pack_into(self.mm, 0, *box[0])
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, STATE)

    def wait_for(self, now: float) -> float:
        """Seconds until Retry-After and backoff allow the next request (a lock-free read:
        8-byte aligned doubles are never torn, and a stale value only costs one more check)."""
        _, _, retry_until, backoff_until, _ = _STATE.unpack_from(self.mm)
        return max(retry_until, backoff_until) - now

    def try_slot(self, n: int) -> int | None:
        """A free slot of ``n`` (caller holds ``self.lock``), locked machine-wide; None when all busy."""
        for i in range(n):
            if i in self.held:
                continue
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SLOTS + i)
            except OSError:  # another process holds it
                continue
            self.held.add(i)
            return i
        return None

    def release(self, slot: int) -> None:
        with self.lock:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, SLOTS + slot)
            self.held.discard(slot)
            self.freed.notify()


@dataclasses.dataclass
class Ticket:
    """Leave to send one request to a host; give it back with :meth:`Politeness.done`."""

    host: _Host | None
    slot: int | None


class Politeness:
    """The per-host caps of one process (one per process and config; see :func:`politeness_for`)."""

    def __init__(self, config: PolitenessConfig, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        self.config, self.clock, self.sleep = config, clock, sleep
        self.dir = config.lock_dir or default_lock_dir()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._hosts: dict[str, _Host] = {}
        self._hosts_lock = threading.Lock()
        # origin -> (expires, rules or verdict), oldest first
        self._robots: collections.OrderedDict[str, tuple[float, object]] = collections.OrderedDict()
        self._robots_locks: dict[str, threading.Lock] = {}

    def _host(self, host: str, use: bool = False) -> _Host:
        """``host``'s open file (opened if need be); ``use``: held by a request until
        :meth:`_checkin`, so it is not closed meanwhile."""
        with self._hosts_lock:
            h = self._hosts.get(host)
            if h is None:
                if len(self._hosts) >= MAX_OPEN_HOSTS:
                    for name, idle in [(k, v) for k, v in self._hosts.items() if v.users == 0]:
                        idle.close()  # no request of ours holds its slots: no lock is lost
                        del self._hosts[name]
                h = self._hosts[host] = _Host(self._path(host, ""))
            h.users += use
            return h

    def _checkin(self, h: _Host) -> None:
        with self._hosts_lock:
            h.users -= 1

    def _path(self, host: str, suffix: str) -> str:
        return _state_path(self.dir, host, suffix)

    def before(self, url: str) -> Ticket | str:
        """Wait until ``url``'s host may be sent a request and take a slot and a token; or the
        error message (``host_backoff: ...``) when that would take longer than ``max_wait``."""
        host, _ = host_key(url)
        h = self._host(host, use=True)
        ticket = None
        try:
            ticket = self._admit(h, host)
            return ticket
        finally:
            if not isinstance(ticket, Ticket):
                self._checkin(h)

    def _admit(self, h: _Host, host: str) -> Ticket | str:
        c = self.config
        refusal = self._wait_or_refuse(h, host)
        if refusal is not None:
            return refusal
        slot = None
        if c.connections > 0:
            slot = self._take_slot(h)
            if slot is None:
                return f"{HOST_BACKOFF}: {host}: no connection slot free in {c.max_wait:g} s"
        try:
            # Another worker may have been told to wait while this one waited for its slot; and
            # again after the token's wait, right before the request.
            refusal = self._wait_or_refuse(h, host)
            if refusal is None and c.rate > 0 and self._take_token(h):
                refusal = self._wait_or_refuse(h, host)
        except BaseException:
            if slot is not None:
                h.release(slot)
            raise
        if refusal is not None:
            if slot is not None:
                h.release(slot)
            return refusal
        return Ticket(h, slot)

    def _take_token(self, h: _Host) -> bool:
        """Take a token of ``h``'s bucket, or reserve the next and sleep until it is due;
        whether it slept."""
        c = self.config
        with h.state() as box:
            tokens, stamp, *rest = box[0]
            now = self.clock()
            tokens = min(float(c.burst), tokens + max(now - stamp, 0.0) * c.rate) - 1.0
            box[0] = [tokens, now, *rest]
        if tokens >= 0:
            return False
        self.sleep(-tokens / c.rate)  # the reserved token is due in -tokens/rate seconds
        return True

    def _wait_or_refuse(self, h: _Host, host: str) -> str | None:
        """Sleep out the host's Retry-After and backoff; or refuse when longer than ``max_wait``.
        Read again after each sleep: another worker may have been given a later Retry-After
        meanwhile (a request in flight when the first 429 went out gets its own, a few ms later),
        and sending at the first one's end would land inside the second's."""
        waited = 0.0
        while (wait := h.wait_for(self.clock())) > 0:
            if waited + wait > self.config.max_wait:
                return (f"{HOST_BACKOFF}: {host} asked for {waited + wait:.0f} s of quiet (Retry-After or "
                        "repeated failures)")
            self.sleep(wait)
            waited += wait
        return None

    def _take_slot(self, h: _Host) -> int | None:
        n, give_up = self.config.connections, time.monotonic() + self.config.max_wait
        pause = 0.002
        with h.lock:
            while True:
                slot = h.try_slot(n)
                left = give_up - time.monotonic()
                if slot is not None or left <= 0:
                    return slot
                if len(h.held) >= n:  # all ours: a release here wakes us
                    h.freed.wait(left)
                else:  # some held by other processes: poll, backing off to 50 ms
                    h.freed.wait(min(pause, left))
                    pause = min(pause * 2, 0.05)

    def done(self, ticket: Ticket, status: int | None, retry_after: str | None = None,
             failed: bool = False) -> None:
        """The response (``status``, None when none came) or failure of a request ``ticket`` allowed."""
        h = ticket.host
        try:
            self._record(h, ticket.slot, status, retry_after, failed)
        finally:
            self._checkin(h)

    def _record(self, h: _Host, slot: int | None, status: int | None, retry_after: str | None,
                failed: bool) -> None:
        try:
            self._record_state(h, status, retry_after, failed)
        finally:
            # only now: a worker waiting for this slot must find this answer's Retry-After
            # or backoff already recorded when it takes the slot
            if slot is not None:
                h.release(slot)

    def _record_state(self, h: _Host, status: int | None, retry_after: str | None, failed: bool) -> None:
        transient = failed or status == 429 or (status is not None and status >= 500)
        if not transient and not _STATE.unpack_from(h.mm)[4]:
            return  # the common case, a success after a success: nothing to write, no lock taken
        with h.state() as box:
            tokens, stamp, retry_until, backoff_until, failures = box[0]
            now = self.clock()
            if status in (429, 503):
                delay = retry_after_seconds(retry_after, now)
                if delay is not None:
                    retry_until = max(retry_until, now + delay)
            if transient:
                failures += 1
                k = failures - self.config.failures_before_backoff
                if k >= 0:
                    delay = min(self.config.backoff_cap, self.config.backoff_base * 2.0 ** min(k, 30))
                    backoff_until = max(backoff_until, now + delay)
            else:
                failures = 0
            box[0] = [tokens, stamp, retry_until, backoff_until, failures]

    # --- robots.txt -------------------------------------------------------------------------

    def robots_verdict(self, url: str, fetch: Callable[[str, float], tuple[int, bytes]]) -> str | None:
        """None when robots.txt lets us fetch ``url``, else the error message (``robots_disallowed``
        or, while the origin's robots.txt answers 5xx, ``host_backoff``). ``fetch(url, timeout)``
        returns (status, body) through the fetch guard, and raises OSError when nothing answered."""
        if not self.config.robots_txt:
            return None
        _, origin = host_key(url)
        parts = urllib.parse.urlsplit(url)
        # asked as the URL names its host (a Host header with ":80" can miss a virtual host)
        robots_url = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}/robots.txt"
        rules = self._rules(origin, lambda: self._fetch_robots(robots_url, fetch))
        if rules is None:
            return None
        if rules == "unavailable":
            return (f"{HOST_BACKOFF}: {origin}/robots.txt unavailable (a server error, or the host asked for "
                    "quiet); nothing fetched there for now")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if is_allowed(rules, path):
            return None
        return f"{ROBOTS_DISALLOWED}: {url} (robots.txt of {origin}, agent {self.config.user_agent_token})"

    def _rules(self, origin: str, fetch) -> object:
        entry = self._robots.get(origin)
        if entry is not None and entry[0] > self.clock():
            return entry[1]
        with self._hosts_lock:
            if len(self._robots) >= MAX_ROBOTS_CACHED:
                self._robots.popitem(last=False)
            if len(self._robots_locks) >= MAX_ROBOTS_CACHED:  # a holder keeps its own; at worst one more fetch
                self._robots_locks.clear()
            lock = self._robots_locks.setdefault(origin, threading.Lock())
        with lock:  # one fetch per origin and process; the others wait for its answer
            entry = self._robots.get(origin)
            if entry is None or entry[0] <= self.clock():
                entry = self._load_robots(origin, fetch)
                self._robots[origin] = entry
        return entry[1]

    def _load_robots(self, origin: str, fetch) -> tuple[float, object]:
        path = self._path(origin, ".robots.json")
        now = self.clock()
        try:
            with open(path) as f:
                cached = json.load(f)
            if cached["origin"] == origin and cached["expires"] > now:
                return cached["expires"], self._parse(cached["status"], cached["text"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no cache yet, or a torn one: fetch
        status, text = fetch()
        if status == 0:  # not asked: the host is in backoff; ask again once it is over
            return now, "unavailable"
        ttl = self.config.robots_retry if status is None or status == 429 or status >= 500 else self.config.robots_ttl
        expires = now + ttl
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}"
        with contextlib.suppress(OSError):
            with open(tmp, "w") as f:
                json.dump({"origin": origin, "expires": expires, "status": status, "text": text}, f)
            os.replace(tmp, path)
        return expires, self._parse(status, text)

    def _fetch_robots(self, robots_url: str, fetch) -> tuple[int | None, str]:
        ticket = self.before(robots_url)
        if isinstance(ticket, str):
            return 0, ""
        status = None
        try:
            status, body = fetch(robots_url, self.config.robots_timeout)
            return status, body.decode("utf-8", "replace") if 200 <= status < 300 else ""
        except OSError:
            return None, ""  # unreachable: allowed (see the module docstring)
        finally:
            self.done(ticket, status, failed=status is None)

    def _parse(self, status: int | None, text: str) -> object:
        if status is not None and (status == 429 or status >= 500):
            return "unavailable"
        if status is None or not 200 <= status < 300:
            return None  # unreachable or 4xx: no rules
        return parse_robots(text, self.config.user_agent_token or "*")


def parse_robots(text: str, token: str) -> list[tuple[int, bool, re.Pattern]]:
    """The rules of robots.txt ``text`` that apply to product token ``token`` (RFC 9309 2.2.1):
    the groups naming it (case-insensitive), else the ``*`` groups; as (length, allow, regex)."""
    token = token.lower()
    groups: list[tuple[set[str], list[tuple[bool, str]]]] = []
    in_agents = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        key = key.lower()
        if key == "user-agent":
            if not in_agents:
                groups.append((set(), []))
                in_agents = True
            groups[-1][0].add(value.split("/", 1)[0].strip().lower())
        elif key in ("allow", "disallow") and groups:
            in_agents = False
            if value:  # an empty Disallow allows everything: no rule
                groups[-1][1].append((key == "allow", value))
    mine = [rules for agents, rules in groups if token in agents]
    chosen = mine or [rules for agents, rules in groups if "*" in agents]
    return [(len(pattern), allow, _compile(pattern)) for rules in chosen for allow, pattern in rules]


def _compile(pattern: str) -> re.Pattern:
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    body = urllib.parse.quote(urllib.parse.unquote(body), safe="/*?=&;:@$,+!~'()%")
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + ("$" if anchored else ""))


def is_allowed(rules: list[tuple[int, bool, re.Pattern]], path: str) -> bool:
    """RFC 9309 2.2.2: the longest matching rule decides, Allow on a tie; no match allows.
    /robots.txt itself is always allowed."""
    if path == "/robots.txt":
        return True
    path = urllib.parse.quote(urllib.parse.unquote(path), safe="/*?=&;:@$,+!~'()%")
    best: tuple[int, bool] | None = None
    for length, allow, regex in rules:
        if regex.match(path) and (best is None or (length, allow) > best):
            best = (length, allow)
    return best is None or best[1]


_by_pid: dict[tuple[int, PolitenessConfig], Politeness] = {}


def politeness_for(config: PolitenessConfig) -> Politeness:
    """This process's :class:`Politeness` for ``config`` (a forked child gets its own: its
    parent's locks are not its own)."""
    key = (os.getpid(), config)
    p = _by_pid.get(key)
    if p is None:
        p = _by_pid[key] = Politeness(config)
    return p
