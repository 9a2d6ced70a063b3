"""Integration tests of download + filter: real img2dataset against the adversarial loopback site.

Every row of tests/ingest_server.py's URL list says what must become of it; these tests check
that each one got exactly that fate, that no refused target was ever contacted, and that
killing `download` or `filter` (SIGKILL on the whole process group) at any point and running
it again ends with the same shards and manifest as an uninterrupted run.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.data.download import download
from pipeline.data.filter_config import FilterConfig
from pipeline.data.filters import filter_shards, format_reject_table, sample_fates
from tests.ingest_server import MAX_BYTES, IngestServer

ROWS_PER_RAW_SHARD = 10  # 34 fetched rows -> 4 raw shards
NO_SPLIT = FilterConfig(val_fraction=0)
SAMPLES_PER_SHARD = 4  # 14 kept -> 4 + 4 + 4 + 2
DOWNLOAD = {"timeout": 2, "max_bytes": MAX_BYTES, "number_sample_per_shard": ROWS_PER_RAW_SHARD, "threads": 8,
            "retries": 0, "save_additional_columns": ["expect"]}
PATH_KEYS = ("input", "output", "input_fingerprint")  # differ between two output folders by design


@pytest.fixture(scope="module")
def site():
    with IngestServer() as s:
        yield s


@pytest.fixture(scope="module")
def adversarial(site, tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial")
    urls = site.url_list(str(root))
    summary = download(urls, str(root / "raw"), allow_hosts=tuple(site.allow_hosts), **DOWNLOAD)
    # no validation split: its URLs carry a random port, and the counts below are exact
    manifest = filter_shards(str(root / "raw"), str(root / "filtered"), NO_SPLIT, samples_per_shard=SAMPLES_PER_SHARD)
    return types.SimpleNamespace(root=root, urls=urls, raw=str(root / "raw"), filtered=str(root / "filtered"),
                                 summary=summary, manifest=manifest)


def _output_tars(folder: str) -> dict[str, dict[str, bytes]]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(folder, name)) as tar:
                out[name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return out


def test_every_row_gets_its_expected_fate(site, adversarial):
    fates = {r["url"]: r["stage"] + ":" + r["reason"] if r["reason"] else "kept"
             for r in sample_fates(adversarial.raw, adversarial.filtered).to_pylist()}
    assert fates == {r["url"]: r["expect"] for r in site.rows}
    assert site.never_requested()  # refused targets, also behind redirects and names, saw no request


def test_every_good_image_exactly_once(site, adversarial):
    kept_urls = [json.loads(data)["url"] for members in _output_tars(adversarial.filtered).values()
                 for name, data in members.items() if name.endswith(".json")]
    expected = [r["url"] for r in site.rows if r["expect"] == "kept"]
    assert sorted(kept_urls) == sorted(expected) and len(set(kept_urls)) == len(kept_urls) == 14
    # The redirect's target URL is recorded as the listed URL, and fetched once.
    assert site.server.request_log.count("/img/moved-target.png") == 1


def test_manifest_counts_every_reason(site, adversarial):
    m = adversarial.manifest
    expected: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in site.rows:
        if r["expect"] != "kept":
            stage, reason = r["expect"].split(":")
            expected[stage][reason] += 1
    assert m["rejects"] == {stage: dict(expected[stage]) for stage in ("refused", "download", "filter")}
    assert m["input_rows"] == len(site.rows) and m["kept"] + m["rejected"] == m["input_rows"]
    assert m["shards"] == {"000000.tar": 4, "000001.tar": 4, "000002.tar": 4, "000003.tar": 2}
    assert {n: len(v) // 3 for n, v in _output_tars(adversarial.filtered).items()} == m["shards"]
    s = adversarial.summary
    assert s["rejected"] == dict(sorted(expected["refused"].items()))
    assert s["successes"] + s["failed"] + s["refused"] == s["input_rows"] == len(site.rows)
    table = format_reject_table(m)
    assert "decompression_bomb" in table and "near_duplicate_image" in table


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def _kill_after(proc: subprocess.Popen, marker: str, nth: int = 1) -> list[str]:
    """Read the output until the nth line containing ``marker``, then SIGKILL the process group."""
    lines, seen = [], 0
    for line in proc.stdout:
        lines.append(line)
        seen += marker in line
        if seen >= nth:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen >= nth, f"the run ended before {nth}x {marker!r}:\n{''.join(lines)}"
    return lines


def _comparable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in PATH_KEYS}


def test_killed_download_resumes_to_the_same_result(site, adversarial, tmp_path):
    raw = tmp_path / "raw"
    args = ["download", "--url-list", adversarial.urls, "--output", str(raw), "--timeout", "2", "--threads", "8",
            "--retries", "0", "--max-bytes", str(MAX_BYTES), "--samples-per-shard", str(ROWS_PER_RAW_SHARD),
            "--allow-host", site.allow_hosts[0], "--extra-columns", "expect"]
    _kill_after(_start(args), " done: ")
    finished = sorted(p.name for p in raw.glob("*_stats.json"))
    assert 1 <= len(finished) < 4, finished  # killed mid-run
    summary = download(adversarial.urls, str(raw), allow_hosts=tuple(site.allow_hosts), **DOWNLOAD)
    assert {k: v for k, v in summary.items() if k != "output"} == \
        {k: v for k, v in adversarial.summary.items() if k != "output"}
    # the download's 4 shards, then the retry pass's (the 500 and the slow route fail again), as in one run
    assert sorted(p.name for p in raw.glob("*_stats.json")) == sorted(p.name for p in Path(adversarial.raw).glob(
        "*_stats.json"))
    assert [f"{i:05d}_stats.json" for i in range(4)] == sorted(p.name for p in raw.glob("*_stats.json"))[:4]
    for name in ("00000.parquet", "00001.parquet", "00002.parquet", "00003.parquet"):
        columns = ["key", "url", "status", "error_message", "width", "height", "sha256"]
        again, before = (pq.read_table(d / name, columns=columns).sort_by("key") for d in (raw, Path(adversarial.raw)))
        assert again.equals(before), name
    manifest = filter_shards(str(raw), str(tmp_path / "filtered"), NO_SPLIT, samples_per_shard=SAMPLES_PER_SHARD)
    assert _comparable(manifest) == _comparable(adversarial.manifest)
    assert _output_tars(str(tmp_path / "filtered")) == _output_tars(adversarial.filtered)


# Runs the filter CLI with one function wrapped so that the process SIGKILLs itself right before or
# after that function's nth call: a real kill (no cleanup, temp files left behind) at a chosen point.
KILL_AT = """
import functools, importlib, os, signal, sys
module, name, when, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
mod = importlib.import_module(module)
original, calls = getattr(mod, name), [0]
@functools.wraps(original)
def wrapped(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if when == "after" and calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(mod, name, wrapped)
from pipeline.cli import main
sys.exit(main(sys.argv[5:]))
"""


@pytest.mark.parametrize("module, name, when, nth", [
    ("pipeline.data.filters", "filter_raw_shard", "after", 2),  # pass 1 half done
    ("pipeline.data.shards", "_add_member", "before", 14),  # in the middle of the second output tar
    ("pipeline.data.filters", "_write_outputs", "after", 1),  # every shard written, no manifest yet
    ("pipeline.storage", "write_json", "before", 1),  # the manifest itself
])
def test_killed_filter_resumes_to_the_same_result(adversarial, tmp_path, module, name, when, nth):
    out = tmp_path / "filtered"
    args = ["filter", "--input", adversarial.raw, "--output", str(out), "--samples-per-shard", str(SAMPLES_PER_SHARD),
            "--val-fraction", "0"]
    proc = subprocess.run([sys.executable, "-c", KILL_AT, module, name, when, str(nth), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not (out / "manifest.json").exists()
    if name == "_add_member":  # the half-written tar is left under its temporary name
        assert [p.name for p in out.glob(".000001.tar.tmp-*")], sorted(os.listdir(out))
    manifest = filter_shards(adversarial.raw, str(out), NO_SPLIT, samples_per_shard=SAMPLES_PER_SHARD)
    assert _comparable(manifest) == _comparable(adversarial.manifest)
    assert sorted(os.listdir(out)) == sorted([*adversarial.manifest["shards"], "_filter", "manifest.json"])
    for name in adversarial.manifest["shards"]:
        assert (out / name).read_bytes() == Path(adversarial.filtered, name).read_bytes()
    assert sorted(os.listdir(out / "_filter")) == sorted(os.listdir(Path(adversarial.filtered, "_filter")))
