"""pipeline.data.download for real: img2dataset runs against the loopback tiny-data server
(conftest's raw_shards), resumes without refetching, keeps settings apart (its child process: tests/integration/test_proc.py)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.download import (
    download,
    summarize,
)
from tests.tinychain import RAW_DOWNLOAD_KWARGS

DOWNLOAD_ERRORS = {"http_404": "HTTP Error 404: File not found",
                   "not_an_image": "not_an_image: body is markup/JSON, not an image (Content-Type: image/jpeg)",
                   "truncated": "Image decoding error"}


def stored_size(row: dict, side: int = 128) -> tuple[int, int]:
    """What img2dataset stores for the tiny presets: the source, its short side brought down
    to the 128 px stage's side (ratio kept), never up."""
    w, h = row["source_width"], row["source_height"]
    if min(w, h) <= side:
        return w, h
    scale = side / min(w, h)
    return (side, round(h * scale)) if w <= h else (round(w * scale), side)


def _raw_rows(raw: str) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(raw)):
        if name[:5].isdigit() and name.endswith(".parquet"):
            rows += pq.read_table(os.path.join(raw, name)).to_pylist()
    return rows


def test_download_gets_every_good_image(tiny_dataset, raw_shards):
    info = tiny_dataset.info
    rows = _raw_rows(raw_shards)
    assert len(rows) == info["n_rows"]
    for r in rows:
        if r["kind"] in DOWNLOAD_ERRORS:
            assert r["status"] != "success" and r["error_message"] == DOWNLOAD_ERRORS[r["kind"]], r
        else:  # "ok" and the rows only the filter step should reject
            assert r["status"] == "success", r
            assert (r["width"], r["height"]) == stored_size(r)  # ratio kept, never upscaled
    summary = summarize(raw_shards)
    assert summary["shards"] == 3 and summary["total"] == summary["input_rows"] == info["n_rows"]
    assert summary["successes"] == info["n_rows"] - info["n_broken"]
    assert summary["failed"] == info["n_broken"] and summary["refused"] == 0
    assert summary["errors"] == {"http_404": 3, "not_an_image": 2, "image_decoding_error": 1}
    assert summary["rejected"] == {}


def test_raw_tars_hold_the_successes(raw_shards):
    successes = {r["key"]: r for r in _raw_rows(raw_shards) if r["status"] == "success"}
    members = {}
    for name in sorted(os.listdir(raw_shards)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(raw_shards, name)) as tar:
                members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert {n.split(".")[0] for n in members} == set(successes)
    for key, row in successes.items():
        assert members[f"{key}.txt"].decode() == row["caption"]
        img = Image.open(io.BytesIO(members[f"{key}.png"]))
        assert img.format == "PNG" and img.size == stored_size(row)


def test_rerun_resumes_without_refetching(tiny_dataset, raw_shards, capsys):
    before = summarize(raw_shards)
    requests = len(tiny_dataset.server.request_log)
    mtimes = {n: os.stat(os.path.join(raw_shards, n)).st_mtime_ns for n in os.listdir(raw_shards)
              if n[:5].isdigit()}
    again = download(tiny_dataset.urls, raw_shards, **RAW_DOWNLOAD_KWARGS)
    assert again == before
    assert len(tiny_dataset.server.request_log) == requests
    assert mtimes == {n: os.stat(os.path.join(raw_shards, n)).st_mtime_ns for n in mtimes}
    assert "download: 3 of 3 shards already done, 0 to fetch" in capsys.readouterr().out


def test_other_settings_do_not_mix_into_finished_shards(tiny_dataset, raw_shards, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(raw_shards, raw)
    with pytest.raises(RuntimeError, match="new output folder"):
        download(tiny_dataset.urls, str(raw), **{**RAW_DOWNLOAD_KWARGS, "image_size": 64})
    # Runtime knobs (threads, timeout) are not part of what a shard contains.
    again = download(tiny_dataset.urls, str(raw), **{**RAW_DOWNLOAD_KWARGS, "threads": 2, "timeout": 3})
    assert again["successes"] == tiny_dataset.info["n_rows"] - tiny_dataset.info["n_broken"]


# --- issue 28, through the CLI as a user meets it ------------------------------------------------

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")


def test_all_urls_refused_is_an_error_naming_the_setting(tiny_dataset, tmp_path):
    """Item 6: the private-network setting forgotten. Not exit 0 with 0 shards: exit 2, one line
    naming IMAGEN_ALLOW_PRIVATE_NETWORKS and the count refused, no JSON for a next step to read."""
    requests = len(tiny_dataset.server.request_log)
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGEN_ALLOW_PRIVATE_NETWORKS", "IMAGEN_ALLOW_HOSTS")}
    proc = subprocess.run([BIN, "download", "--url-list", tiny_dataset.urls, "--output", str(tmp_path / "raw")],
                          capture_output=True, text=True, timeout=300, env=env)
    n = tiny_dataset.info["n_rows"]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagen-pipeline download: error: nothing downloaded: "), lines
    assert f"{n} of {n} URLs were refused as private, loopback or link-local addresses (loopback_address {n})" \
        in lines[0]
    assert "IMAGEN_ALLOW_PRIVATE_NETWORKS=1" in lines[0] and "--allow-private-networks" in lines[0]
    assert not proc.stdout.strip().splitlines()[-1].startswith("{")  # no summary a script would take as done
    assert len(tiny_dataset.server.request_log) == requests  # and nothing was fetched


def test_progress_lines_while_each_shard_downloads(tiny_dataset, tmp_path):
    """Item 10: a line while a shard is in flight (done/total, rate, failures so far), not only
    when it is finished; --progress-every 0 prints one per finished fetch."""
    proc = subprocess.run([BIN, "download", "--url-list", tiny_dataset.urls, "--output", str(tmp_path / "raw"),
                           "--allow-private-networks", "--samples-per-shard", "50", "--progress-every", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    n_rows = tiny_dataset.info["n_rows"]
    for shard, total in (("00000", 50), ("00001", 50), ("00002", n_rows - 100)):
        done_at = next(i for i, line in enumerate(lines) if line.startswith(f"shard {shard} done: "))
        progress = [re.fullmatch(rf"shard {shard}: (\d+)/{total} fetched, (\d+) ok, (\d+) failed, [\d.]+/s"
                                 r"(; failed so far: .+)?", line) for line in lines[:done_at]]
        counts = [int(m.group(1)) for m in progress if m]
        assert counts and counts == sorted(counts) and max(counts) < total, (shard, lines)
    failed = [line for line in lines if "failed so far: " in line]
    assert any("http_404" in line for line in failed)  # failures are counted by reason as they happen
    assert json.loads(lines[-1])["successes"] == n_rows - tiny_dataset.info["n_broken"]
