"""Per-host politeness (pipeline/data/politeness.py) and its hook in the guarded fetch, in process:
slot cap across threads, the token bucket's schedule, Retry-After, backoff growth and cap, the
state shared through the lock dir, robots.txt parsing, caching and verdicts, X-Robots-Tag
decided on the headers, and the hook's cost per request. The cap across processes and the
real img2dataset runs are in tests/integration/test_polite_download.py."""

from __future__ import annotations

import email.message
import email.utils
import io
import os
import threading
import time
import urllib.error

import pytest

from pipeline.data import fetch_guard
from pipeline.data.download import DownloadConfig, politeness_spec
from pipeline.data.fetch_guard import guarded_download_image, normalize_error, reason_stage
from pipeline.data.politeness import (
    Politeness,
    PolitenessConfig,
    hosts_quiet_for,
    is_allowed,
    parse_robots,
    retry_after_seconds,
)
from pipeline.netguard import FetchPolicy

URL = "http://img.example.com/a/b.png"


class FakeClock:
    """time.time and time.sleep for one thread: sleeping moves the clock."""

    def __init__(self, start: float = 1_000_000.0):
        self.now, self.slept = start, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def polite(tmp_path, clock=None, **kw) -> Politeness:
    config = PolitenessConfig(lock_dir=str(tmp_path / "locks"), **kw)
    if clock is None:
        return Politeness(config)
    return Politeness(config, clock=clock, sleep=clock.sleep)


def test_slot_cap_holds_across_threads(tmp_path):
    p = polite(tmp_path, connections=3, rate=0)
    inflight, peak, lock = [0], [0], threading.Lock()

    def worker():
        for _ in range(4):
            ticket = p.before(URL)
            with lock:
                inflight[0] += 1
                peak[0] = max(peak[0], inflight[0])
            time.sleep(0.01)
            with lock:
                inflight[0] -= 1
            p.done(ticket, 200)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 3  # reached, never passed
    assert not p._host("img.example.com:80").held  # every slot given back


def test_other_hosts_are_not_held_up(tmp_path):
    p = polite(tmp_path, connections=1, rate=0, max_wait=0.2)
    held = p.before(URL)
    other = p.before("http://other.example.com/x.png")
    assert not isinstance(other, str)
    started = time.monotonic()
    assert p.before(URL).startswith("host_backoff: img.example.com:80: no connection slot free")
    assert 0.15 < time.monotonic() - started < 2
    p.done(held, 200)
    assert not isinstance(p.before(URL), str)


def test_token_bucket_burst_then_rate(tmp_path):
    clock = FakeClock()
    p = polite(tmp_path, clock, connections=0, rate=4.0, burst=3)
    sent = []
    for _ in range(9):
        p.done(p.before(URL), 200)
        sent.append(clock.now - 1_000_000.0)
    assert sent[:3] == [0.0, 0.0, 0.0]  # the burst
    assert sent[3:] == pytest.approx([0.25 * k for k in range(1, 7)])  # then one every 1/rate s


def test_token_bucket_real_time(tmp_path):
    p = polite(tmp_path, connections=0, rate=50.0, burst=5)
    started = time.monotonic()
    for _ in range(30):
        p.done(p.before(URL), 200)
    assert 0.45 <= time.monotonic() - started < 2.0  # 25 tokens past the burst at 50/s


def test_retry_after_is_honoured_by_the_next_request(tmp_path):
    clock = FakeClock()
    p = polite(tmp_path, clock, rate=0)
    p.done(p.before(URL), 429, retry_after="7")
    t0 = clock.now
    p.done(p.before(URL), 200)
    assert clock.now - t0 == pytest.approx(7.0)
    # an HTTP date, on a 503
    date = email.utils.formatdate(clock.now + 12, usegmt=True)
    p.done(p.before(URL), 503, retry_after=date)
    t1 = clock.now
    p.before(URL)
    assert 11.0 <= clock.now - t1 <= 12.0  # the date has whole seconds
    assert retry_after_seconds("soon", 0.0) is None and retry_after_seconds(None, 0.0) is None


def test_retry_after_is_shared_through_the_lock_dir(tmp_path):
    """Another process's Politeness (same lock dir, another mapping of the host's file) waits too."""
    clock = FakeClock()
    a, b = polite(tmp_path, clock, rate=0), polite(tmp_path, clock, rate=0)
    a.done(a.before(URL), 429, retry_after="5")
    t0 = clock.now
    b.before(URL)
    assert clock.now - t0 == pytest.approx(5.0)


def test_a_long_retry_after_puts_the_url_off_as_host_backoff(tmp_path):
    clock = FakeClock()
    p = polite(tmp_path, clock, rate=0, max_wait=60)
    p.done(p.before(URL), 503, retry_after="3600")
    message = p.before(URL)
    assert message.startswith("host_backoff: img.example.com:80 asked for 3600 s")
    assert normalize_error(message) == "host_backoff" and reason_stage("host_backoff") == "download"
    assert not clock.slept  # refused at once, not after an hour


def test_backoff_grows_exponentially_to_its_cap(tmp_path):
    clock = FakeClock()
    p = polite(tmp_path, clock, rate=0, failures_before_backoff=3, backoff_base=2.0, backoff_cap=300.0,
               max_wait=1e9)
    host = p._host("img.example.com:80")
    waits = []
    for _ in range(12):
        ticket = p.before(URL)  # sleeps out the previous backoff
        p.done(ticket, None, failed=True)  # reset / timeout
        waits.append(max(round(host.wait_for(clock.now), 6), 0))
    assert waits == [0, 0, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    p.done(p.before(URL), 200)  # a success resets the count
    p.done(p.before(URL), 500)
    assert host.wait_for(clock.now) <= 0  # one failure after a success: no backoff yet


def test_not_found_and_body_answers_do_not_count_as_failures(tmp_path):
    clock = FakeClock()
    p = polite(tmp_path, clock, rate=0, failures_before_backoff=1)
    for status in (404, 403, 200, 410):
        p.done(p.before(URL), status)
    assert p._host("img.example.com:80").wait_for(clock.now) <= 0


ROBOTS = """
# comment
User-agent: *
Disallow: /private/
Allow: /private/ok*.png$

User-agent: img2dataset
User-agent: other-bot
Disallow: /nobots/
Disallow: /*.gif$
Allow: /nobots/yes
Disallow:

User-agent: ia_archiver
Disallow: /
"""


def test_robots_rules_for_our_token():
    mine = parse_robots(ROBOTS, "img2dataset")
    assert not is_allowed(mine, "/nobots/x.png")
    assert is_allowed(mine, "/nobots/yes/x.png")  # longer Allow wins
    assert not is_allowed(mine, "/a/b.gif") and is_allowed(mine, "/a/b.gif?x=1")  # $ anchors
    assert is_allowed(mine, "/private/x.png")  # our own group replaces the * group
    star = parse_robots(ROBOTS, "somebot")
    assert not is_allowed(star, "/private/x.png") and is_allowed(star, "/private/ok1.png")
    assert not is_allowed(star, "/private/ok1.png.html")
    assert is_allowed(parse_robots("User-agent: *\nDisallow: /\n", "x"), "/robots.txt")
    tie = parse_robots("User-agent: *\nDisallow: /a\nAllow: /a\n", "x")
    assert is_allowed(tie, "/a/b")  # a tie goes to Allow (RFC 9309 2.2.2)
    assert is_allowed(parse_robots("User-agent: *\nDisallow: /caf%C3%A9\n", "x"), "/cafe")
    assert not is_allowed(parse_robots("User-agent: *\nDisallow: /caf%C3%A9\n", "x"), "/café/x")


class Robots:
    """A robots.txt server stand-in: counts fetches."""

    def __init__(self, status=200, text=ROBOTS, error=None):
        self.status, self.text, self.error, self.calls = status, text, error, []

    def __call__(self, url, timeout):
        self.calls.append(url)
        if self.error:
            raise self.error
        return self.status, self.text.encode()


def test_robots_fetched_once_per_origin_and_cached_on_disk(tmp_path):
    robots = Robots()
    p = polite(tmp_path, rate=0)
    verdicts = []
    threads = [threading.Thread(target=lambda i=i: verdicts.append(
        p.robots_verdict(f"http://img.example.com/nobots/{i}.png", robots))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert robots.calls == ["http://img.example.com/robots.txt"]
    assert len(verdicts) == 8 and all(v.startswith("robots_disallowed: http://img.example.com/nobots/") for v in verdicts)
    assert normalize_error(verdicts[0]) == "robots_disallowed" and reason_stage("robots_disallowed") == "refused"
    assert p.robots_verdict("http://img.example.com/ok.png", robots) is None
    again = Robots()  # another process on this machine: the lock dir's copy, no fetch
    assert polite(tmp_path, rate=0).robots_verdict("http://img.example.com/nobots/1.png", again)
    assert again.calls == []
    assert robots.calls == ["http://img.example.com/robots.txt"]


def test_robots_statuses(tmp_path):
    url = "http://img.example.com/nobots/x.png"
    assert polite(tmp_path / "a").robots_verdict(url, Robots(status=404)) is None  # 4xx: all allowed
    assert polite(tmp_path / "b").robots_verdict(url, Robots(error=ConnectionRefusedError())) is None
    clock = FakeClock()
    p = polite(tmp_path / "c", clock, robots_retry=600)
    down = Robots(status=503)
    assert normalize_error(p.robots_verdict(url, down)) == "host_backoff"  # 5xx: nothing, for now
    clock.now += 601
    up = Robots()
    assert normalize_error(p.robots_verdict(url, up)) == "robots_disallowed"  # asked again later
    assert len(down.calls) == len(up.calls) == 1
    assert polite(tmp_path / "d", robots_txt=False).robots_verdict(url, Robots()) is None


class FakeResponse:
    def __init__(self, status=200, headers=(), body=b""):
        self.status, self.body, self.reads = status, io.BytesIO(body), 0
        self.headers = email.message.Message()
        for k, v in headers:
            self.headers[k] = v

    def read(self, n=-1):
        self.reads += 1
        return self.body.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeOpener:
    def __init__(self, routes):
        self.routes, self.opened = routes, []

    def open(self, request, timeout=None):
        self.opened.append(request.full_url)
        answer = self.routes[request.full_url]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    return buf.getvalue()


def _fetch(opener, p, url, directives=("noai", "noimageai")):
    return guarded_download_image((0, url), 5, "img2dataset", list(directives), opener=opener,
                                  policy=FetchPolicy(), polite=p)


def test_guarded_fetch_asks_robots_first_and_never_requests_a_disallowed_url(tmp_path):
    p = polite(tmp_path, rate=0)
    opener = FakeOpener({"http://img.example.com/robots.txt": FakeResponse(body=ROBOTS.encode()),
                         "http://img.example.com/ok.png": FakeResponse(body=_png())})
    key, stream, err = _fetch(opener, p, "http://img.example.com/nobots/x.png")
    assert stream is None and normalize_error(err) == "robots_disallowed"
    _, stream, err = _fetch(opener, p, "http://img.example.com/ok.png")
    assert err is None and stream.read().startswith(b"\x89PNG")
    assert opener.opened == ["http://img.example.com/robots.txt", "http://img.example.com/ok.png"]
    assert not p._host("img.example.com:80").held


@pytest.mark.parametrize("tag", ["noai", "img2dataset: noimageai", "noindex, noai"])
def test_x_robots_tag_refuses_before_a_byte_of_the_body(tmp_path, tag):
    p = polite(tmp_path, rate=0, robots_txt=False)
    response = FakeResponse(headers=[("X-Robots-Tag", tag)], body=_png())
    _, stream, err = _fetch(FakeOpener({URL: response}), p, URL)
    assert stream is None and normalize_error(err) == "disallowed_by_x_robots_tag"
    assert response.reads == 0
    assert not p._host("img.example.com:80").held  # the slot came back on the early return


def test_x_robots_tag_for_another_agent_is_not_ours(tmp_path):
    p = polite(tmp_path, rate=0, robots_txt=False)
    response = FakeResponse(headers=[("X-Robots-Tag", "otherbot: noai")], body=_png())
    _, stream, err = _fetch(FakeOpener({URL: response}), p, URL)
    assert err is None and response.reads > 0


def test_guarded_fetch_records_429_retry_after_and_failures(tmp_path):
    clock = FakeClock()
    p = polite(tmp_path, clock, rate=0, robots_txt=False, failures_before_backoff=2)
    headers = email.message.Message()
    headers["Retry-After"] = "9"
    busy = urllib.error.HTTPError(URL, 429, "Too Many Requests", headers, io.BytesIO(b""))
    _, stream, err = _fetch(FakeOpener({URL: busy}), p, URL)
    assert normalize_error(err) == "http_429"
    host = p._host("img.example.com:80")
    assert host.wait_for(clock.now) == pytest.approx(9.0)
    _fetch(FakeOpener({URL: ConnectionResetError(104, "Connection reset by peer")}), p, URL)
    assert host.wait_for(clock.now) == pytest.approx(2.0)  # 2nd failure in a row: backoff_base
    assert not host.held


def test_download_config_reaches_the_child_spec():
    spec = politeness_spec(DownloadConfig(per_host_connections=2, per_host_rate=0.5, robots_txt=False))
    config = PolitenessConfig(**spec)
    assert (config.connections, config.rate, config.burst, config.robots_txt) == (2, 0.5, 10, False)
    assert config.user_agent_token == DownloadConfig().user_agent_token
    default = PolitenessConfig(**politeness_spec(DownloadConfig()))
    assert (default.connections, default.rate, default.robots_txt) == (4, 5.0, True)


def test_hook_overhead_per_request_is_small(tmp_path, capsys):
    """before + done on a host with caps that never bind: the cost every fetch pays."""
    p = polite(tmp_path, connections=64, rate=1e9, burst=1000)
    p.robots_verdict(URL, Robots(status=404))
    n, started = 2000, time.perf_counter()
    for _ in range(n):
        p.robots_verdict(URL, None)
        p.done(p.before(URL), 200)
    per_request = (time.perf_counter() - started) / n * 1e6
    with capsys.disabled():
        print(f"\npoliteness hook: {per_request:.1f} us per request")
    assert per_request < 500  # measured ~20-40 us; a loopback fetch alone costs ~1000 us


def test_install_hands_the_politeness_to_img2dataset(tmp_path):
    import img2dataset.downloader as i2d

    saved = (i2d.download_image, i2d.download_image_with_retry)
    try:
        config = PolitenessConfig(lock_dir=str(tmp_path))
        fetch_guard.install(FetchPolicy(), config)
        assert i2d.download_image.keywords["polite"].config == config
        fetch_guard.install(FetchPolicy())
        assert i2d.download_image.keywords["polite"] is None
    finally:
        i2d.download_image, i2d.download_image_with_retry = saved


def test_spark_executors_get_the_deployments_lock_dir(monkeypatch):
    from pipeline.data import spark

    monkeypatch.setenv("IMAGEN_POLITENESS_DIR", "/var/lib/imagen/politeness")
    conf = spark.session_conf("k8s://https://k8s.example:443", FetchPolicy())
    assert conf["spark.executorEnv.IMAGEN_POLITENESS_DIR"] == "/var/lib/imagen/politeness"
    monkeypatch.delenv("IMAGEN_POLITENESS_DIR")
    assert "spark.executorEnv.IMAGEN_POLITENESS_DIR" not in spark.session_conf("local[1]", FetchPolicy())


def test_idle_host_files_are_closed_past_the_limit(tmp_path, monkeypatch):
    """A list naming many hosts must not run a process out of file descriptors; a host with a
    request in flight keeps its file (closing it would drop that request's slot lock)."""
    from pipeline.data import politeness

    monkeypatch.setattr(politeness, "MAX_OPEN_HOSTS", 8)
    p = polite(tmp_path, rate=0, connections=1)
    busy = p.before("http://busy.example.com/x.png")
    for i in range(40):
        p.done(p.before(f"http://h{i}.example.com/x.png"), 200)
    assert len(p._hosts) <= 8 and "busy.example.com:80" in p._hosts
    p.done(busy, 200)
    assert not p._hosts["busy.example.com:80"].held


def test_robots_of_a_host_in_backoff_is_asked_again_once_it_is_over(tmp_path):
    clock = FakeClock()
    p = polite(tmp_path, clock, rate=0, max_wait=10)
    p.done(p.before(URL), 429, retry_after="100")
    robots = Robots()
    assert normalize_error(p.robots_verdict("http://img.example.com/nobots/x.png", robots)) == "host_backoff"
    assert robots.calls == []  # nothing sent while the host asked for quiet
    clock.now += 101
    assert normalize_error(p.robots_verdict("http://img.example.com/nobots/x.png", robots)) == "robots_disallowed"
    assert len(robots.calls) == 1


def test_hosts_quiet_for_reads_the_longest_wait_of_the_listed_hosts(tmp_path):
    """The retry pass's wait (pipeline.data.retry): Retry-After and failure backoff, per host, as
    recorded by any process on the machine; hosts never seen count 0, and no file is created."""
    clock = FakeClock()
    p = polite(tmp_path, clock, rate=0, failures_before_backoff=2, backoff_base=30.0)
    other = "http://cdn.example/a.png"
    p.done(p.before(URL), 429, retry_after="7")
    assert hosts_quiet_for(p.config, [URL, URL], now=clock.now) == pytest.approx(7.0)
    for _ in range(2):  # two failures in a row: 30 s of backoff
        p.done(p.before(other), None, failed=True)
    assert hosts_quiet_for(p.config, [URL, other], now=clock.now) == pytest.approx(30.0)
    assert hosts_quiet_for(p.config, [URL], now=clock.now + 8) <= 0
    files = sorted(os.listdir(p.dir))
    assert hosts_quiet_for(p.config, ["http://never.example/x.png"], now=clock.now) == 0.0
    assert sorted(os.listdir(p.dir)) == files


def test_a_later_retry_after_given_while_asleep_is_waited_out_too(tmp_path):
    """A worker sleeping out one Retry-After reads the host's state again when it wakes: a
    request that was in flight when the first 429 went out got its own 429 10 ms later, and
    sending at the first window's end would land in the second (issue 27's fixture saw this)."""
    clock = FakeClock()
    p, other = polite(tmp_path, clock, rate=0), polite(tmp_path, clock, rate=0)
    in_flight = other.before(URL)
    p.done(p.before(URL), 429, retry_after="1")
    t0 = clock.now
    sleep = clock.sleep

    def sleep_while_the_other_answer_comes(seconds: float) -> None:
        if len(clock.slept) == 0:  # 10 ms into the first sleep, the in-flight request's 429
            sleep(0.01)
            other.done(in_flight, 429, retry_after="1")
            seconds -= 0.01
        sleep(seconds)

    p.sleep = sleep_while_the_other_answer_comes
    p.done(p.before(URL), 200)
    assert clock.now - t0 == pytest.approx(1.01)


def test_a_slot_is_freed_only_after_its_answer_is_recorded(tmp_path):
    """The worker that takes a freed slot must see the Retry-After of the answer that freed it."""
    clock = FakeClock()
    p = polite(tmp_path, clock, rate=0, connections=1)
    ticket = p.before(URL)
    host = p._host("img.example.com:80")
    seen = []
    release = host.release
    host.release = lambda slot: (seen.append(host.wait_for(clock.now)), release(slot))[1]
    p.done(ticket, 429, retry_after="5")
    assert seen == [pytest.approx(5.0)]


def test_waits_that_keep_growing_are_refused_once_their_total_passes_max_wait(tmp_path):
    """Reading the state again after each sleep cannot wait forever: once the waits add up to
    more than max_wait, the URL is put off as host_backoff (transient), as one long wait is."""
    clock = FakeClock()
    p, other = polite(tmp_path, clock, rate=0, max_wait=1.5), polite(tmp_path, clock, rate=0, max_wait=1.5)
    in_flight = other.before(URL)
    p.done(p.before(URL), 429, retry_after="1")
    sleep = clock.sleep

    def sleep_while_another_429_comes(seconds: float) -> None:
        sleep(seconds)
        if len(clock.slept) == 1:  # at the first window's end, the in-flight request's own 429
            other.done(in_flight, 429, retry_after="1")

    p.sleep = sleep_while_another_429_comes
    message = p.before(URL)
    assert isinstance(message, str) and message.startswith("host_backoff: img.example.com:80 asked for 2 s")
    assert clock.slept == [pytest.approx(1.0)]
