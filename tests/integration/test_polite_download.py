"""Politeness per host with real processes and a real img2dataset, against pipeline/dev/webhosts.py:
the connection cap holds across processes, no request arrives inside a Retry-After, robots.txt
keeps every disallowed path unrequested, and an X-Robots-Tag opt-out is refused on its headers."""

from __future__ import annotations

import multiprocessing
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.download import download
from pipeline.data.politeness import Politeness, PolitenessConfig
from pipeline.dev.webhosts import NOAI_BODY, WebHosts

# A connection accepted this soon after a 429/503 left the server was sent before the client
# could know of it (another slot's request already on its way): not a violation.
IN_FLIGHT_GRACE = 0.05


def _fetch_under_cap(lock_dir: str, urls: list[str], cap: int) -> int:
    """One process: 4 threads fetching ``urls`` under a shared cap (multiprocessing target)."""
    import concurrent.futures

    p = Politeness(PolitenessConfig(connections=cap, rate=0, robots_txt=False, lock_dir=lock_dir))

    def one(url):
        ticket = p.before(url)
        with urllib.request.urlopen(url, timeout=10) as r:
            status = r.status
            r.read()
        p.done(ticket, status)
        return status

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return sum(s == 200 for s in pool.map(one, urls))


def test_connection_cap_holds_across_processes(tmp_path):
    with WebHosts(1) as web:
        urls = [web.url(0, "ok", 0.03, f"p{i}") for i in range(48)]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(3) as pool:
            ok = pool.starmap(_fetch_under_cap, [(str(tmp_path), urls[i::3], 2) for i in range(3)])
        host = web.hosts[0]
    assert sum(ok) == 48
    assert host.peak == 2  # 12 threads in 3 processes, never more than 2 at the host


ROBOTS = """User-agent: *
Disallow: /

User-agent: img2dataset
Disallow: /ok/0/private
"""
CAP, RATE, BURST = 2, 20.0, 4


@pytest.fixture(scope="module")
def polite_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("polite")
    mp = pytest.MonkeyPatch()
    mp.setenv("IMAGEN_POLITENESS_DIR", str(root / "locks"))
    try:
        with WebHosts(4, robots={3: ROBOTS}) as web:
            rows = []
            for h in range(4):
                rows += [(web.url(h, "ok", 0.02, f"h{h}-{i}"), "ok") for i in range(20)]
                rows += [(web.url(h, "flaky429", 1, f"h{h}-429"), "ok"), (web.url(h, "flaky503", 1, f"h{h}-503"), "ok"),
                         (web.url(h, "reset", 0, f"h{h}-rst"), "ok"), (web.url(h, "404", 0, f"h{h}-404"), "http_404")]
            rows += [(web.url(3, "ok", 0, f"private-{i}"), "robots_disallowed") for i in range(6)]
            rows += [(web.url(0, "noai", 0, "opted-out"), "disallowed_by_x_robots_tag")]
            pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": ["a picture"] * len(rows),
                                     "expect": [e for _, e in rows]}), root / "urls.parquet")
            started = time.monotonic()
            summary = download(str(root / "urls.parquet"), str(root / "raw"), allow_private_networks=True,
                               processes=2, threads=8, number_sample_per_shard=40, timeout=5, retries=1,
                               save_additional_columns=["expect"], per_host_connections=CAP, per_host_rate=RATE,
                               per_host_burst=BURST)
            seconds = time.monotonic() - started
        yield web, rows, summary, root, seconds
    finally:
        mp.undo()


def test_every_url_meets_its_expected_fate(polite_run):
    web, rows, summary, root, _ = polite_run
    expected = {}
    for _, e in rows:
        expected[e] = expected.get(e, 0) + 1
    assert summary["successes"] == expected.pop("ok")  # 429/503/reset recovered by the retry, after the wait
    assert summary["rejected"] == {"robots_disallowed": expected.pop("robots_disallowed")}
    assert summary["errors"] == expected


def test_peak_connections_per_host_never_above_the_cap(polite_run):
    web = polite_run[0]
    peaks = [h.peak for h in web.hosts]
    assert max(peaks) == CAP and min(peaks) >= 1, peaks  # binding, and never passed


def test_no_request_inside_a_retry_after(polite_run):
    web = polite_run[0]
    for h in web.hosts:
        late = [(t, path) for t, path, quiet_from in h.violations if t > quiet_from + IN_FLIGHT_GRACE]
        assert not late, (h.address, late)
        # the recovering request of each flaky URL came after the host's quiet time
        for kind in ("flaky429", "flaky503"):
            times = [t for t, path, _ in h.log if f"/{kind}/" in path]
            assert len(times) == 2 and times[1] - times[0] >= 1.0, (h.address, kind, times)


def test_request_rate_per_host_within_rate_and_burst(polite_run):
    web = polite_run[0]
    for h in web.hosts:
        arrivals = sorted(t for t, path, _ in h.log if path != "/robots.txt")
        for i, t in enumerate(arrivals):
            in_window = sum(1 for u in arrivals[i:] if u < t + 1.0)
            assert in_window <= BURST + RATE + 1, (h.address, in_window)


def test_robots_fetched_once_per_host_and_disallowed_paths_never_requested(polite_run):
    web = polite_run[0]
    for h in web.hosts:
        assert 1 <= h.paths().count("/robots.txt") <= 2, h.address  # once per host (two processes may race)
    assert not [p for p in web.hosts[3].paths() if "private" in p]
    assert len([p for p in web.hosts[3].paths() if p.startswith("/ok/")]) == 20  # our group allows the rest


def test_x_robots_tag_noai_refused_before_the_body(polite_run):
    web, _, summary, _, _ = polite_run
    assert summary["errors"]["disallowed_by_x_robots_tag"] == 1
    # the socket buffers take some bytes before the client hangs up; it read none of them
    assert web.hosts[0].noai_bytes_sent < NOAI_BODY // 4
