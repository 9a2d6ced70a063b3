"""The retry pass in-process (pipeline.data.retry): which reasons are transient, the backoff's
bounds, and the pass on a fake download output whose img2dataset child is replaced by a fake
that answers each URL from a script: recovered rows, counts before/after, no key twice, a rerun
fetches nothing recovered, a pass cut short resumes without fetching again."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import retry
from pipeline.data.download import run_child, summarize
from pipeline.data.fetch_guard import TRANSIENT_REASONS, is_transient, normalize_error
from pipeline.data.politeness import Politeness, PolitenessConfig
from pipeline.data.raw_rows import RECOVERED, RETRY_DIR, RETRY_OF, superseded


@pytest.mark.parametrize("message, reason, transient", [
    ("HTTP Error 429: Too Many Requests", "http_429", True),
    ("HTTP Error 500: Internal Server Error", "http_500", True),
    ("HTTP Error 502: Bad Gateway", "http_502", True),
    ("HTTP Error 503: Service Unavailable", "http_503", True),
    ("HTTP Error 504: Gateway Timeout", "http_504", True),
    ("HTTP Error 501: Not Implemented", "http_501", False),  # the server will never do it
    ("timed out", "timeout", True),  # img2dataset's socket timeout
    ("timeout: body not read within the timeout", "timeout", True),  # the guard's deadline
    ("[Errno 104] Connection reset by peer", "connection_reset", True),
    ("<urlopen error [Errno 104] Connection reset by peer>", "connection_reset", True),
    ("<urlopen error [Errno 111] Connection refused>", "connection_refused", True),
    ("Remote end closed connection without response", "connection_closed", True),
    ("IncompleteRead(50 bytes read, 99950 more expected)", "incomplete_read", True),
    ("<urlopen error [Errno 101] Network is unreachable>", "network_unreachable", True),
    ("dns_error: cannot resolve 'cdn.example': [Errno -3] Temporary failure in name resolution",
     "dns_temporary_failure", True),
    ("dns_error: cannot resolve 'x.invalid': [Errno -2] Name or service not known", "dns_error", False),
    ("host_backoff: cdn.example failed 5 times in a row", "host_backoff", True),
    ("HTTP Error 404: Not Found", "http_404", False),
    ("HTTP Error 403: Forbidden", "http_403", False),
    ("HTTP Error 410: Gone", "http_410", False),
    ("Image decoding error", "image_decoding_error", False),
    ("not_an_image: body is markup/JSON, not an image (Content-Type: image/jpeg)", "not_an_image", False),
    ("empty_body: zero-byte response (Content-Type: image/png)", "empty_body", False),
    ("decompression_bomb: declared 100000x100000 pixels", "decompression_bomb", False),
    ("response_too_large: more than 1000 bytes", "response_too_large", False),
    ("loopback_address: localhost:80 resolves to 127.0.0.1", "loopback_address", False),
    ("Use of image disallowed by X-Robots-Tag directive", "disallowed_by_x_robots_tag", False),
    (None, "unknown", False),
])
def test_every_failure_has_a_reason_and_a_kind(message, reason, transient):
    assert normalize_error(message) == reason
    assert is_transient(reason) is transient


def test_transient_reasons_are_distinct_and_none_is_a_refusal():
    from pipeline.netguard import BODY_REASONS, REFUSAL_REASONS

    assert len(set(TRANSIENT_REASONS)) == len(TRANSIENT_REASONS)
    assert not set(TRANSIENT_REASONS) & set(REFUSAL_REASONS)
    assert set(TRANSIENT_REASONS) & set(BODY_REASONS) == {"timeout"}  # a slow body: the server may be busy
    assert not any(is_transient(f"http_{code}") for code in range(400, 429))


@pytest.mark.parametrize("base, cap", [(2.0, 60.0), (0.5, 3.0), (1.0, 1.0)])
def test_backoff_doubles_within_jitter_bounds_and_is_capped(base, cap):
    rng = random.Random(7)
    for attempt in range(1, 9):
        full = min(cap, base * 2 ** (attempt - 1))
        draws = [retry.backoff_delay(attempt, base, cap, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in draws), (attempt, min(draws), max(draws))
        assert max(draws) - min(draws) > full / 4  # jittered: many workers do not come back at once
    assert retry.backoff_delay(30, base, cap, rng) <= cap


def test_superseded_rows_are_no_url_list_rows():
    assert superseded(RECOVERED, None) and superseded("failed_to_download", "000000003")
    assert not superseded("success", "000000003") and not superseded("failed_to_download", None)


# --- the pass on a fake output ----------------------------------------------------------------

def _write_shard(out: str, shard: int, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, f"{shard:05d}.parquet"))
    open(os.path.join(out, f"{shard:05d}.tar"), "wb").close()  # the pass never reads tars
    with open(os.path.join(out, f"{shard:05d}_stats.json"), "w") as f:
        json.dump({"count": len(rows), "successes": sum(r["status"] == "success" for r in rows)}, f)


class FakeChild:
    """Stands in for img2dataset: each URL answers its script's next outcome (None: success)."""

    def __init__(self, out: str, script: dict[str, list[str | None]]):
        self.out, self.script, self.calls = out, {u: list(o) for u, o in script.items()}, []

    def __call__(self, spec: dict) -> None:
        kwargs, start = spec["download"], spec["start_shard_id"]
        assert RETRY_OF in kwargs["save_additional_columns"] and kwargs["output_folder"] == self.out
        listed = pq.read_table(kwargs["url_list"]).to_pylist()
        self.calls.append([r["url"] for r in listed])
        rows = []
        for i, r in enumerate(listed):
            error = self.script[r["url"]].pop(0)
            rows.append({"url": r["url"], "caption": r["caption"], "key": f"{start:05d}{i:04d}",
                         "status": "success" if error is None else "failed_to_download", "error_message": error,
                         RETRY_OF: r[RETRY_OF]})
        _write_shard(self.out, start, rows)


ERRORS = {"ok": None, "429": "HTTP Error 429: Too Many Requests", "503": "HTTP Error 503: Service Unavailable",
          "reset": "[Errno 104] Connection reset by peer", "404": "HTTP Error 404: Not Found",
          "timeout": "timed out"}


@pytest.fixture
def fake_output(tmp_path, monkeypatch):
    """Two original shards: 2 ok, 429 then ok, 503 twice then ok, reset then 404, 404, a timeout for good."""
    out = str(tmp_path / "raw")
    os.makedirs(out)
    plan = [("ok", []), ("429", [None]), ("503", ["503", None]), ("reset", ["404"]), ("404", []),
            ("timeout", ["timeout"] * 9), ("ok", [])]
    script, shards = {}, collections.defaultdict(list)
    for i, (first, later) in enumerate(plan):
        url = f"http://cdn.example/{first}/{i}.png"
        script[url] = [ERRORS[e] if e else None for e in later]
        shards[i // 4].append({"url": url, "caption": f"caption {i}", "key": f"{i // 4:05d}{i % 4:04d}",
                               "status": "success" if first == "ok" else "failed_to_download",
                               "error_message": ERRORS[first]})
    for shard, rows in shards.items():
        _write_shard(out, shard, rows)
    retry.record_download(out, {"download": {"caption_col": "caption", "number_sample_per_shard": 4,
                                             "save_additional_columns": None, "output_folder": out},
                                "policy": {}, "progress_every": 10})
    return out, FakeChild(out, script)


def _all_rows(out: str) -> list[dict]:
    return [r for name in sorted(os.listdir(out)) if name.endswith(".parquet")
            for r in pq.read_table(os.path.join(out, name)).to_pylist()]


def test_pass_recovers_and_counts_every_row_once(fake_output):
    out, child = fake_output
    waits: list[float] = []
    stats = retry.retry_failed(out, attempts=2, base_delay=1.0, max_delay=10.0, run=child,
                               sleep=waits.append,
                               rng=random.Random(0))
    assert [len(c) for c in child.calls] == [4, 2]  # 429, 503, reset, timeout; then 503, timeout
    assert 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0
    assert stats["before"] == {"http_429": 1, "http_503": 1, "connection_reset": 1, "http_404": 1, "timeout": 1}
    assert stats["after"] == {"http_404": 2, "timeout": 1}  # the reset came back a 404: permanent now
    assert stats["recovered"] == {"http_429": 1, "http_503": 1}
    assert (stats["transient_before"], stats["transient_after"]) == (4, 1)
    assert [a["rows"] for a in stats["attempts"]] == [4, 2] and [a["recovered"] for a in stats["attempts"]] == [1, 1]
    rows = _all_rows(out)
    successes = [r["key"] for r in rows if r["status"] == "success"]
    assert len(successes) == len(set(successes)) == 4
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        if r["status"] == RECOVERED:
            assert by_key[r["recovered_as"]][RETRY_OF] == r["key"] and by_key[r["recovered_as"]]["url"] == r["url"]
    summary = summarize(out)
    assert summary["input_rows"] == summary["total"] == 7 and summary["successes"] == 4
    assert summary["errors"] == {"http_404": 2, "timeout": 1} and summary["transient"] == 1
    assert summary["retry"] == stats
    assert os.listdir(os.path.join(out, RETRY_DIR)) and not [n for n in os.listdir(out) if n.endswith(".json")
                                                            and not n[:5].isdigit()]


def test_rerun_fetches_nothing_recovered_and_resumes_a_pass_cut_short(fake_output, monkeypatch):
    out, child = fake_output
    retry.retry_failed(out, attempts=1, base_delay=0, max_delay=0, run=child)
    assert len(child.calls) == 1 and len(child.calls[0]) == 4
    # the next pass dies after img2dataset finished, before the originals were marked
    mark = retry._mark
    monkeypatch.setattr(retry, "_mark", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        retry.retry_failed(out, attempts=1, base_delay=0, max_delay=0, run=child)
    assert len(child.calls) == 2 and not any("/429/" in u for u in child.calls[1])  # 429 recovered before
    monkeypatch.setattr(retry, "_mark", mark)
    stats = retry.retry_failed(out, attempts=0, base_delay=0, max_delay=0, run=child)  # resumes: no fetch, marks
    assert len(child.calls) == 2
    assert stats["recovered"] == {"http_429": 1, "http_503": 1} and stats["after"] == {"http_404": 2, "timeout": 1}
    again = retry.retry_failed(out, attempts=3, base_delay=0, max_delay=0, run=child)
    assert child.calls[2:] == [[u for u in child.calls[1] if "/timeout/" in u]] * 3
    assert again["recovered"] == stats["recovered"] and again["after"] == stats["after"]
    successes = [r["key"] for r in _all_rows(out) if r["status"] == "success"]
    assert len(successes) == len(set(successes)) == 4
    assert summarize(out)["total"] == 7


def test_pass_without_a_recorded_download_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the download again"):
        retry.retry_failed(str(tmp_path), attempts=1, run=run_child)


def test_pass_waits_out_the_hosts_retry_after_and_backoff(fake_output, tmp_path):
    """A host that asked for 40 s (Retry-After, recorded by the download's politeness on this
    machine) is not retried after the 1 s backoff, where every fetch would be put off as
    host_backoff again, but once its 40 s are over; a wait is capped at the backoff cap."""
    out, child = fake_output
    spec = retry._download_spec(out)
    config = PolitenessConfig(lock_dir=str(tmp_path / "locks"), rate=0, backoff_cap=120.0)
    retry.record_download(out, {**spec, "politeness": dataclasses.asdict(config)})
    p = Politeness(config)
    first, second = p.before("http://cdn.example/429/1.png"), p.before("http://cdn.example/other.png")
    p.done(first, 429, retry_after="40")
    waits: list[float] = []
    retry.retry_failed(out, attempts=1, base_delay=1.0, max_delay=10.0, run=child, sleep=waits.append)
    assert 38.0 <= waits[0] <= 40.0
    p.done(second, 503, retry_after="3600")  # in flight meanwhile (asking now would wait the 40 s)
    retry.retry_failed(out, attempts=1, base_delay=1.0, max_delay=10.0, run=child, sleep=waits.append)
    assert waits[1] == 120.0
