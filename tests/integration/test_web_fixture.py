"""Issue 27's loopback fixture: 2,000 URLs over 4 hosts (pipeline/dev/webhosts.py), 20% failing
transiently the first time (429 with Retry-After, 503, connection reset), 5% failing for good
(404), run through the DAG as an operator runs it: `airflow dags test imagen_data` on a migrated
metadata DB, with the politeness caps and the retry passes set as conf (its download task runs
real img2dataset with no retries of its own, then ``retry_failed``; the filter task is marked
done, not run: these plain-colour pictures would all be rejected as blank).

Checks: at least 99% of the recoverable URLs end in the shards, no key twice; each host's peak of
concurrent connections never above the cap; no request inside a host's Retry-After; the counts
before and after the pass say what happened. About a minute and a half on 2 cores."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.download import summarize
from pipeline.dev.webhosts import WebHosts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
N, HOSTS, CAP = 2000, 4, 4
TRANSIENT, PERMANENT = 0.20, 0.05
IN_FLIGHT_GRACE = 0.05  # as tests/integration/test_polite_download.py: a request already sent
# Once measured here: 1 to 3 of 2,000 requests reached a host 0 to 12 ms before its 1 s
# Retry-After ended. The cause: a worker slept out the first 429's window and sent at its end,
# while a request in flight at that 429 had brought a second one ms later; a worker now reads
# the host's state again after each sleep (pipeline.data.politeness, unit-tested). No slack left.
END_SLACK = 0.0


def _kinds(rng: random.Random) -> list[str]:
    kinds = ["flaky429", "flaky503", "reset"]
    out = []
    for _ in range(N):
        x = rng.random()
        out.append(rng.choice(kinds) if x < TRANSIENT else "404" if x < TRANSIENT + PERMANENT else "ok")
    return out


@pytest.fixture(scope="module")
def web_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("web2000")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "IMAGEN_ALLOW_HOSTS")}
    env.update({"AIRFLOW_HOME": str(root / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(REPO, "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "MLFLOW_DISABLE_TELEMETRY": "true", "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1",
                # deployment settings, as an operator sets them: the hosts are on 127.0.0.10-13
                "IMAGEN_ALLOW_PRIVATE_NETWORKS": "1", "IMAGEN_POLITENESS_DIR": str(root / "locks"),
                "IMAGEN_RETRIES": "0", "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    subprocess.run([os.path.join(BIN, "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    rng = random.Random(27)
    with WebHosts(HOSTS) as web:
        rows = []
        for i, kind in enumerate(_kinds(rng)):
            arg = 1 if kind in ("flaky429", "flaky503") else 0  # Retry-After: 1 s
            rows.append((web.url(i % HOSTS, kind, arg, f"u{i}"), kind))
        pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [f"picture {i}" for i in range(N)]}),
                       root / "urls.parquet")
        conf = {"root": str(root / "data"), "url_list": str(root / "urls.parquet"), "stages": ["base64"],
                "presets": {"base64": "tiny"}, "per_host_connections": CAP, "per_host_rate": 100.0,
                "per_host_burst": 20, "retry_attempts": 3}
        proc = subprocess.run([os.path.join(BIN, "airflow"), "dags", "test", "imagen_data", "-c", json.dumps(conf),
                               "--mark-success-pattern", "filter_shards"], env=env, capture_output=True, text=True,
                              timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "state=success" in out.replace(" ", ""), out[-4000:]
    raw = str(root / "data" / "raw")
    yield {"web": web, "rows": rows, "after": summarize(raw), "raw": raw, "log": out}


def _kept(raw: str) -> list[dict]:
    import glob
    import os

    out = []
    for f in sorted(glob.glob(os.path.join(raw, "*.parquet"))):
        t = pq.read_table(f)
        if "status" not in t.column_names:
            continue
        out += [r for r in t.to_pylist() if r["status"] == "success"]
    return out


def test_recoverable_urls_end_in_the_shards_once(web_run):
    kinds = collections.Counter(k for _, k in web_run["rows"])
    recoverable = N - kinds["404"]
    kept = _kept(web_run["raw"])
    keys = [r["key"] for r in kept]
    assert len(keys) == len(set(keys)), "a key in two shards"
    urls = [r["url"] for r in kept]
    assert len(urls) == len(set(urls)), "a URL stored twice"
    assert not [u for u in urls if "/404/" in u]
    assert len(kept) >= 0.99 * recoverable, (len(kept), recoverable, web_run["after"].get("errors"))
    transient = sum(kinds[k] for k in ("flaky429", "flaky503", "reset"))
    assert sum(web_run["after"]["retry"]["recovered"].values()) >= 0.5 * transient  # the pass did the work
    assert "retry 1 of 3:" in web_run["log"]  # the retry_failed task's own lines


def test_counts_before_and_after_the_retry_pass(web_run):
    after = web_run["after"]
    before = after["retry"]["before"] if "before" in after.get("retry", {}) else None
    assert before is not None, after.get("retry")
    assert sum(before.values()) >= 0.15 * N  # ~20% transient + 5% 404 failed the first time
    assert after["errors"].get("http_404", 0) == collections.Counter(k for _, k in web_run["rows"])["404"]


def test_peak_connections_per_host_never_above_the_cap(web_run):
    peaks = [h.peak for h in web_run["web"].hosts]
    assert max(peaks) <= CAP and min(peaks) >= 2, peaks


def test_no_request_inside_a_retry_after(web_run):
    for h in web_run["web"].hosts:
        late = [(round(t - quiet_from, 3), path) for t, path, quiet_from in h.violations
                if quiet_from + IN_FLIGHT_GRACE < t < quiet_from + 1.0 - END_SLACK]
        assert not late, (h.address, late[:5])


def test_every_shard_has_its_source_record(web_run):
    """Dedup ranks copies by the format served (pipeline/data/copies.py): the retry pass's shards
    carry their NNNNN_source.jsonl like the download's, one line per stored sample."""
    import glob
    import os

    from pipeline.data.copies import read_sources

    tars = sorted(glob.glob(os.path.join(web_run["raw"], "*.tar")))
    assert len(tars) >= 2  # the download's shard and at least one retry shard
    stored = {r["key"] for r in _kept(web_run["raw"])}
    recorded = {}
    for tar in tars:
        sources = read_sources(tar)
        assert sources is not None, f"{tar}: no source record"
        recorded.update(sources)
    assert stored <= set(recorded) and set(recorded.values()) == {"png"}


def test_every_shard_has_the_facts_of_its_images_and_the_filter_agrees_without_them(web_run, tmp_path):
    """The retry pass's shards carry their NNNNN_facts.arrow like the download's, one fact per
    stored image (pipeline/data/facts.py); filtering with and without them gives the same bytes."""
    import glob
    import hashlib
    import shutil
    import tarfile

    from pipeline.data.facts import SIDECAR_SUFFIX, read_facts
    from pipeline.data.filters import FilterConfig, filter_shards

    tars = sorted(glob.glob(os.path.join(web_run["raw"], "*.tar")))
    assert len(tars) >= 2  # the download's shard and at least one retry shard
    for tar in tars:
        recorded = read_facts(tar)
        with tarfile.open(tar) as t:
            images = [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".png")]
        assert images and all(hashlib.sha256(i).digest() in recorded for i in images), tar
    bare = tmp_path / "bare"
    shutil.copytree(web_run["raw"], bare)
    for p in bare.glob(f"*{SIDECAR_SUFFIX}"):
        p.unlink()
    outputs = {}
    for name, raw in (("with", web_run["raw"]), ("without", str(bare))):
        # The fixture's pictures are small flat colours: kept (min_side 1, no blank filter), every
        # one reaches the decode and the dedup the facts stand in for.
        config = FilterConfig(min_side=1, blank_tolerance=-1)
        manifest = filter_shards(raw, str(tmp_path / name), config, samples_per_shard=500)
        files = {p.name: p.read_bytes() for p in (tmp_path / name).glob("*.tar")}
        outputs[name] = ({k: v for k, v in manifest.items() if k not in ("input", "output")}, files)
    assert outputs["with"] == outputs["without"] and outputs["with"][0]["kept"] and outputs["with"][1]
