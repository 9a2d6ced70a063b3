"""img2dataset under the network guard: the download child process and the image body checks.

img2dataset fetches with a bare ``urllib.request.urlopen``: it follows redirects anywhere, resolves
names at fetch time and reads bodies of any size. This module replaces its ``download_image`` in
every download process with :func:`guarded_download_image`, which fetches through
:func:`pipeline.netguard.build_opener` (address checks on every request and redirect, pinned
connections, no proxies, one wall-clock budget per request: see :mod:`pipeline.netguard`, which
owns the policy) and then

- enforces a maximum body size, and a maximum declared pixel count read from the image header
  before any decoder allocates memory for it (decompression bombs), in every format it passes
  on (:mod:`pipeline.data.image_headers`; a format it cannot size is refused);
- turns empty bodies and HTML/JSON served as images into specific errors;
- hands img2dataset's decoder only images it decodes right: 16-bit, CMYK, float, EXIF-rotated and
  other bodies its OpenCV decode mishandles are re-encoded first as 8-bit RGB PNG
  (:func:`pipeline.data.images.normalize_for_img2dataset`), HDR and PFM tone-mapped to 8 bits;
  everything else passes byte for byte, decided from the header alone in the common case.

With a :class:`~pipeline.data.politeness.PolitenessConfig` (the spec's ``"politeness"``), each
fetch first asks the origin's robots.txt (fetched through the same guarded opener) and takes a
connection slot and a rate token of its host, machine-wide (:mod:`pipeline.data.politeness`);
the slot is given back with the response's status and ``Retry-After`` as soon as the body is in.

Every error message starts with a stable reason (``"loopback_address: ..."``); :func:`normalize_error`
turns any row's error message into one (the reject table's ``download`` and ``refused`` reasons).

img2dataset reports a shard only when it is finished (its ``_stats.json``). While one is in flight,
:class:`ShardProgress` counts the fetches here, in the download process, and prints a line every
``progress_every`` seconds: done/total, rate, and the failures so far by reason.

Run img2dataset under the guard (``pipeline.data.download`` does this in a subprocess):

    python -m pipeline.data.fetch_guard '{"download": {img2dataset kwargs}, "policy": {FetchPolicy fields},
                                          "politeness": {PolitenessConfig fields}, "progress_every": 10,
                                          "start_shard_id": 0}'
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request

from pipeline.data.image_headers import Header, Unsized, read_header
from pipeline.data.politeness import ROBOTS_MAX_BYTES, Politeness, PolitenessConfig, politeness_for
from pipeline.netguard import (
    BODY_REASONS,
    HOST_BACKOFF,
    REFUSAL_REASONS,
    FetchPolicy,
    FetchRejected,
    build_opener,
    literal_reason,
    read_limited,
)

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


# Network failures a later try can get past (the server or the path to it was busy, down or slow), by
# reason; "host_backoff" is a fetch the politeness limiter put off because its host kept failing.
# With http_429 and the 5xx codes but 501/505 (:func:`is_transient`) they are what the retry pass
# (:mod:`pipeline.data.retry`) fetches again; every other reason is permanent: 404/403/410, bodies
# no decoder takes, the guard's refusals, filter rejects.
TRANSIENT_REASONS = ("timeout", "connection_reset", "connection_refused", "connection_closed", "incomplete_read",
                     "network_unreachable", "dns_temporary_failure", "http_429", HOST_BACKOFF)
# 5xx codes that say the request itself will never work on this server.
PERMANENT_5XX = ("http_501", "http_505")
# Substrings of the errors urllib, http.client and the socket layer raise, mapped to a reason (first match).
_NEEDLES = (("temporary failure in name resolution", "dns_temporary_failure"),  # EAI_AGAIN: may resolve later
            ("timed out", "timeout"), ("connection refused", "connection_refused"),
            ("connection reset", "connection_reset"), ("connection aborted", "connection_reset"),
            ("broken pipe", "connection_reset"),
            ("remote end closed connection", "connection_closed"), ("incompleteread", "incomplete_read"),
            ("network is unreachable", "network_unreachable"), ("no route to host", "network_unreachable"),
            ("name or service not known", "dns_error"), ("name resolution", "dns_error"),
            ("x-robots-tag", "disallowed_by_x_robots_tag"))


def normalize_error(message: str | None) -> str:
    """A short, stable reason for an img2dataset error message ("HTTP Error 404: ..." -> "http_404")."""
    text = (message or "unknown").strip()
    lower = text.lower()
    head = lower.split(":", 1)[0].strip()
    if head in REFUSAL_REASONS or head in BODY_REASONS or head in TRANSIENT_REASONS:
        return head  # our fetch guard's messages start with their reason
    http = re.match(r"http error (\d{3})", lower)
    if http:
        return f"http_{http.group(1)}"
    for needle, reason in _NEEDLES:  # before the "dns_error" head: a temporary lookup failure says so after it
        if needle in lower:
            return reason
    if head == "dns_error":
        return head
    # Drop "<urlopen error [Errno 104] ...>" wrappers and numbers that vary per request.
    lower = re.sub(r"urlopen error|\[errno -?\d+\]|\d+", " ", lower)
    return re.sub(r"[^a-z]+", "_", lower).strip("_")[:60] or "unknown"


def is_transient(reason: str) -> bool:
    """Whether a failure of this reason (:func:`normalize_error`'s) may pass if fetched again later."""
    return reason in TRANSIENT_REASONS or (re.fullmatch(r"http_5\d\d", reason) is not None
                                           and reason not in PERMANENT_5XX)


def reason_stage(reason: str) -> str:
    """"refused" for a URL the guard never contacted, else "download"."""
    return "refused" if reason in REFUSAL_REASONS else "download"


class ShardProgress:
    """Counts the finished fetches of the shard this process is downloading and prints a line
    every ``every`` seconds (never for a shard that ends sooner): img2dataset itself says nothing
    until the shard is done. One per process: img2dataset runs one shard at a time in each
    download process, with ``thread_count`` threads calling :meth:`record`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._out: int | None = None  # our own copy of stdout's file descriptor (see start_shard)
        self.start_shard("", 0, 0.0)

    def start_shard(self, shard: str, total: int, every: float) -> None:
        if shard and self._out is None:
            # img2dataset's resizer points fds 1 and 2 at /dev/null while it decodes an image
            # (SuppressStdoutStderr), which our fetch threads would write into: keep a duplicate
            # of the real stdout, taken here, between shards, where no decode runs.
            with contextlib.suppress(AttributeError, OSError, ValueError):  # no file behind it (a test's capture)
                sys.stdout.flush()
                self._out = os.dup(sys.stdout.fileno())
        with self._lock:
            self.shard, self.total, self.every = shard, total, every
            self.done, self.failed = 0, collections.Counter()
            self.started = self.last = time.monotonic()

    def record(self, error: str | None) -> None:
        """One URL of the shard finished (``error`` None: fetched); print a line when one is due."""
        with self._lock:
            self.done += 1
            if error is not None:
                self.failed[normalize_error(error)] += 1
            now = time.monotonic()
            if not self.shard or self.done >= self.total or now - self.last < self.every:
                return  # the shard's own "done" line follows at its end
            self.last = now
            line = self.line(now) + "\n"  # written under the lock: lines come in count order
            if self._out is None:
                print(line, end="", flush=True)
            else:
                os.write(self._out, line.encode())

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-9)
        failed = sum(self.failed.values())
        text = (f"shard {self.shard}: {self.done}/{self.total} fetched, {self.done - failed} ok, {failed} failed, "
                f"{rate:.1f}/s")
        if failed:
            text += "; failed so far: " + ", ".join(f"{r} {n}" for r, n in self.failed.most_common(3))
        return text


PROGRESS = ShardProgress()


def check_body(body: bytes, content_type: str | None, max_pixels: int) -> Header:
    """The header of a body a decoder may see; rejects every other body before any decode.

    Every format is sized from its own header bytes (:mod:`pipeline.data.image_headers`, no
    decoder): over ``max_pixels`` is a bomb; a format the guard cannot size is refused, since
    its decoder would allocate whatever it declares. A recognised header cut short before its
    size passes: the decoder finds no size there either and reports its decoding error.
    """
    if not body:
        raise FetchRejected("empty_body", f"zero-byte response (Content-Type: {content_type})")
    try:
        header = read_header(body)
    except Unsized as err:
        if body[:64].lstrip(b" \t\r\n\xef\xbb\xbf")[:1] in (b"<", b"{", b"["):
            raise FetchRejected("not_an_image", f"body is markup/JSON, not an image (Content-Type: {content_type})") from None
        raise FetchRejected("unsized_format" if err.known else "unsupported_format",
                            f"{err} (Content-Type: {content_type})") from None
    if header.pixels > max_pixels:
        raise FetchRejected("decompression_bomb", f"declared {header.width}x{header.height} pixels > "
                            f"max_pixels={max_pixels} ({header.format})")
    return header


def guarded_download_image(row, timeout, user_agent_token, disallowed_header_directives, *,
                           opener: urllib.request.OpenerDirector, policy: FetchPolicy,
                           polite: Politeness | None = None):
    """Drop-in for ``img2dataset.downloader.download_image``: returns (key, stream or None, error).
    With ``polite``, robots.txt is asked first and the host's slot and token taken (and given
    back as soon as the body is in: the checks below run without holding the host)."""
    key, url = row
    agent = USER_AGENT + (f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
                          if user_agent_token else "")
    reason = literal_reason(url, policy)
    if reason is not None:
        return key, None, f"{reason}: {url}"
    try:
        request = urllib.request.Request(url, headers={"User-Agent": agent})
    except ValueError as err:  # literal_reason let it through: say what urllib says
        return key, None, str(err)
    ticket = None
    if polite is not None:  # before the deadline starts: waiting for the host is not the request's time
        refusal = polite.robots_verdict(url, functools.partial(_fetch_robots, opener, agent))
        ticket = refusal or polite.before(url)
        if isinstance(ticket, str):
            return key, None, ticket
    deadline = time.monotonic() + timeout
    try:
        request.deadline = deadline  # connect, redirects, headers and body: one wall-clock budget
        body, content_type = _fetch(opener, request, timeout, deadline, policy, polite, ticket,
                                    user_agent_token, disallowed_header_directives)
        if body is None:
            return key, None, "Use of image disallowed by X-Robots-Tag directive"
        header = check_body(body, content_type, policy.max_pixels)
        from pipeline.data.copies import SOURCES, source_format
        from pipeline.data.images import (
            normalize_for_img2dataset,  # deferred: numpy and PIL, for the download workers only
        )

        # the format as served, before any re-encode: dedup ranks copies by it
        SOURCES.record(key, source_format(header, body))
        return key, io.BytesIO(normalize_for_img2dataset(body, header)), None
    except Exception as err:  # noqa: BLE001 - img2dataset records any failure as the row's error
        return key, None, str(err)


def _fetch(opener, request, timeout, deadline, policy, polite, ticket, user_agent_token, directives):
    """(body, Content-Type) of one guarded request, or (None, None) when an ``X-Robots-Tag``
    opts the image out: decided on the headers, before a byte of the body is read. The host's
    slot is given back, with the outcome, as soon as the response is read or has failed."""
    status, retry_after, failed = None, None, True
    try:
        with opener.open(request, timeout=timeout) as r:
            status, failed = r.status, False
            if directives and _is_disallowed(r.headers, user_agent_token, directives):
                return None, None
            try:
                return read_limited(r, policy.max_bytes, deadline), r.headers.get("Content-Type")
            except OSError as err:  # a reset or a deadline mid-body is the host's; a size limit ours
                failed = not isinstance(err, FetchRejected) or err.reason == "timeout"
                raise
    except urllib.error.HTTPError as err:
        status, retry_after, failed = err.code, err.headers.get("Retry-After"), False
        raise
    except FetchRejected as err:
        failed = failed and err.reason == "timeout"  # a refused address says nothing of the host
        raise
    finally:
        if ticket is not None:
            polite.done(ticket, status, retry_after, failed=failed)


def _fetch_robots(opener, agent: str, url: str, timeout: float) -> tuple[int, bytes]:
    """(status, body) of a robots.txt, through the guard: any HTTP status is an answer; OSError
    when none came (politeness decides what that means)."""
    request = urllib.request.Request(url, headers={"User-Agent": agent})
    request.deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as r:
            return r.status, r.read(ROBOTS_MAX_BYTES)  # RFC 9309 2.5: the rest may be ignored
    except urllib.error.HTTPError as err:
        return err.code, b""


def _is_disallowed(headers, user_agent_token, directives) -> bool:
    # img2dataset's own X-Robots-Tag parser, so opt-outs mean exactly what they mean there;
    # imported here because importing img2dataset costs seconds (only download workers need it).
    from img2dataset.downloader import is_disallowed

    return is_disallowed(headers, user_agent_token, directives)


@functools.cache
def _opener_for(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    return build_opener(policy)


def install(policy: FetchPolicy, polite: PolitenessConfig | None = None) -> None:
    """Make img2dataset's download threads in this process fetch through the guard (and, with
    ``polite``, under its per-host caps and robots.txt), and count each URL's final outcome
    (after img2dataset's retries) in :data:`PROGRESS`."""
    import img2dataset.downloader as i2d

    i2d.download_image = functools.partial(guarded_download_image, opener=_opener_for(policy), policy=policy,
                                           polite=politeness_for(polite) if polite is not None else None)
    plain = getattr(i2d.download_image_with_retry, "counted", i2d.download_image_with_retry)

    def counted(*args, **kwargs):
        key, stream, err = plain(*args, **kwargs)
        PROGRESS.record(None if stream is not None else (err or "unknown"))
        return key, stream, err

    counted.counted = plain  # a second install wraps the original, not the wrapper
    i2d.download_image_with_retry = counted


def _shard_rows(shard_file: str) -> int:
    """Rows of one of img2dataset's shard files (Arrow IPC, feather): read from its footer."""
    import fsspec
    import pyarrow as pa

    with fsspec.open(shard_file, "rb") as f:
        reader = pa.ipc.open_file(f)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


class GuardedDownloader:
    """Wraps img2dataset's ``Downloader``: installs the guard in each worker, prints progress
    lines while a shard downloads (:class:`ShardProgress`, every ``progress_every`` seconds)
    and a line per finished shard, and writes the shard's sidecars: the source format of each
    body (:mod:`pipeline.data.copies`) and the facts of each stored image (:mod:`pipeline.data.facts`).

    Pickled into img2dataset's spawned worker processes (so it must live at module level and
    stay cheap to import); the guard is installed at call time, inside the worker.
    """

    def __init__(self, inner, policy: FetchPolicy, progress_every: float = 10.0,
                 polite: PolitenessConfig | None = None):
        self.inner, self.policy, self.progress_every, self.polite = inner, policy, progress_every, polite

    def __call__(self, row):
        install(self.policy, self.polite)
        started = time.monotonic()
        shard = f"{row[0]:0{self.inner.oom_shard_count}d}"
        try:
            total = _shard_rows(row[1])
        except (OSError, ValueError) as err:  # pyarrow's errors are ValueErrors too; img2dataset will say
            total = 0
            print(f"shard {shard}: row count unreadable ({err})", flush=True)
        PROGRESS.start_shard(shard, total, self.progress_every)
        from pipeline.data.copies import SOURCES  # writes the shard's NNNNN_source.jsonl after it
        from pipeline.data.facts import FACTS, watch  # and its NNNNN_facts.arrow

        watch(self.inner)
        with SOURCES.shard(self.inner, row[0]), FACTS.shard(self.inner, row[0]):
            ok, result = self.inner(row)
        PROGRESS.start_shard("", 0, 0.0)  # lines of a finished shard would be stale
        if ok:
            stats_uri = f"{self.inner.output_folder}/{shard}_stats.json"
            try:
                import fsspec

                with fsspec.open(stats_uri, "r") as f:
                    stats = json.load(f)
                failed = stats["failed_to_download"] + stats["failed_to_resize"]
                print(f"shard {shard} done: {stats['successes']}/{stats['count']} downloaded, {failed} failed, "
                      f"{time.monotonic() - started:.1f} s", flush=True)
            except (OSError, ValueError, KeyError) as err:
                print(f"shard {shard} done (stats unreadable: {err})", flush=True)
        else:
            print(f"shard {shard} failed; img2dataset retries it, or re-run the download", flush=True)
        return ok, result


class _NoLoggerProcess:
    """Stands in for img2dataset's LoggerProcess, a spawned process that polls the stats files to
    print running totals and feed wandb (which we never enable). GuardedDownloader prints a line
    per finished shard instead, and one process fewer saves seconds of imports per run."""

    def __init__(self, *args, **kwargs):
        self.done_shards: set[int] = set()

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass


def _inline_distributor(processes_count, downloader, reader, subjob_size, max_shard_retry):
    """With one process, run the shards here instead of in a spawned one-worker pool."""
    from img2dataset.distributor import retrier

    def run(rows):
        return [row for row in rows if not downloader(row)[0]]

    retrier(run, run(reader), max_shard_retry)


def run_img2dataset(kwargs: dict, policy: FetchPolicy, progress_every: float = 10.0,
                    polite: PolitenessConfig | None = None, start_shard_id: int = 0) -> None:
    """Call ``img2dataset.download(**kwargs)`` with every download going through the guard (under
    ``polite``'s per-host caps), and a progress line every ``progress_every`` seconds while a shard
    is in flight. ``start_shard_id``: the list's first shard gets this number (the retry pass
    appends shards after the download's; img2dataset's own "extend" mode does that too, but cannot
    resume a pass cut short)."""
    import importlib

    # img2dataset/__init__.py rebinds the name "main" to the function: fetch the module itself.
    i2d_main = importlib.import_module("img2dataset.main")
    plain = i2d_main.Downloader
    i2d_main.Downloader = lambda **kw: GuardedDownloader(plain(**kw), policy, progress_every, polite)
    if start_shard_id:
        reader = getattr(i2d_main.Reader, "plain", i2d_main.Reader)
        # main.download passes start_shard_id (0 outside "extend" mode) as Reader's last argument.
        i2d_main.Reader = lambda *args: reader(*args[:-1], start_shard_id)
        i2d_main.Reader.plain = reader
    i2d_main.LoggerProcess = _NoLoggerProcess
    if kwargs.get("processes_count", 1) == 1 and kwargs.get("distributor", "multiprocessing") == "multiprocessing":
        i2d_main.multiprocessing_distributor = _inline_distributor
    install(policy, polite)  # also in this process, for the inline distributor
    i2d_main.download(**kwargs)


def read_spec(argv: list[str] | None, usage: str) -> dict | None:
    """The one JSON argument of a download child process (``sys.argv[1:]`` by default), or None
    after printing ``usage`` when it is missing."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(usage, file=sys.stderr)
        return None
    return json.loads(argv[0])


def run_spec(spec: dict) -> int:
    """Run img2dataset on ``spec["download"]`` under the policy ``spec["policy"]`` and the
    per-host politeness ``spec["politeness"]`` (:class:`PolitenessConfig` fields; absent: none),
    with a progress line every ``spec["progress_every"]`` seconds (default 10)."""
    run_img2dataset(spec["download"], spec_policy(spec), float(spec.get("progress_every", 10.0)),
                    spec_politeness(spec), int(spec.get("start_shard_id", 0)))
    return 0


def spec_policy(spec: dict) -> FetchPolicy:
    """The :class:`FetchPolicy` of a child spec (``spec["policy"]``, its fields as JSON)."""
    policy = dict(spec.get("policy", {}))
    policy["allow_hosts"] = tuple(policy.get("allow_hosts", ()))  # JSON has lists; the policy is hashable
    return FetchPolicy(**policy)


def spec_politeness(spec: dict) -> PolitenessConfig | None:
    """The :class:`PolitenessConfig` of a child spec (``spec["politeness"]``); None: no caps."""
    return PolitenessConfig(**spec["politeness"]) if spec.get("politeness") is not None else None


def main(argv: list[str] | None = None) -> int:
    spec = read_spec(argv, __doc__)
    return 2 if spec is None else run_spec(spec)


if __name__ == "__main__":
    from pipeline.proc import exit_now

    exit_now(main())  # every shard is written and closed
