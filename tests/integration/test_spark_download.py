"""The download on Spark (issue 17): ``imagen-pipeline download --distributor pyspark`` on a
``local-cluster[2,1,1024]`` master (two executor JVMs, their own Python workers) over the tiny data.

- Its shards hold the same samples (keys, image bytes, captions, statuses) as the
  multiprocessing run's (conftest's ``raw_shards``), and the summaries agree.
- Incremental mode: a shard without its ``_stats.json`` is fetched again on Spark (``local[2]``),
  the others are not touched.
- With default settings (no allow_hosts), a URL whose name resolves to loopback passes the
  driver's pre-screen and is refused by the fetch guard inside the executors: the recording
  server sees zero requests and the refusals are counted as ``loopback_address``. The first test
  is the positive control: the same executors fetch from loopback when the policy allows it.

Needs pyspark (``imagen-pipeline[spark]``) and Java 17; skipped without them. Most of each Spark
run is start-up: the JVMs and img2dataset's imports in every Python worker.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data.download import NothingDownloaded, download, summarize
from pipeline.data.spark import require_spark
from tests.tinychain import RAW_DOWNLOAD_KWARGS, TINY_ROWS_PER_SHARD

try:
    require_spark()
except RuntimeError as e:
    pytest.skip(str(e), allow_module_level=True)

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
MASTER = "local-cluster[2,1,1024]"
EXTRA = RAW_DOWNLOAD_KWARGS["save_additional_columns"]
COMPARED = ("key", "url", "caption", "status", "error_message", "width", "height", "sha256", *EXTRA)


def _shards(folder: str) -> dict[str, dict]:
    """{shard: {"rows": {key: compared columns}, "members": {tar member: bytes}, "stats": counts}}."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if not (name[:5].isdigit() and name.endswith("_stats.json")):
            continue
        shard = name[:5]
        with open(os.path.join(folder, name)) as f:
            stats = json.load(f)
        rows = pq.read_table(os.path.join(folder, f"{shard}.parquet")).to_pylist()
        with tarfile.open(os.path.join(folder, f"{shard}.tar")) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        out[shard] = {"rows": {r["key"]: {c: r[c] for c in COMPARED} for r in rows}, "members": members,
                      "stats": {k: stats[k] for k in ("count", "successes", "failed_to_download",
                                                      "failed_to_resize")}}
    return out


def _without_output(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "output"}


@pytest.fixture(scope="module")
def spark_raw(tiny_dataset, tmp_path_factory) -> tuple[str, dict, float]:
    """The tiny data downloaded by the CLI on the local cluster; (folder, summary, seconds)."""
    import time

    output = str(tmp_path_factory.mktemp("spark") / "raw")
    cmd = [BIN, "download", "--url-list", tiny_dataset.urls, "--output", output, "--preset", "tiny",
           "--samples-per-shard", str(TINY_ROWS_PER_SHARD), "--extra-columns", *EXTRA,
           "--retries", "0", "--allow-host", f"127.0.0.1:{tiny_dataset.port}",
           "--distributor", "pyspark", "--spark-master", MASTER]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"spark: master {MASTER}" in proc.stdout
    assert "No pyspark session found" not in proc.stdout  # img2dataset ran in our session
    return output, json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def test_spark_shards_hold_the_multiprocessing_samples(spark_raw, raw_shards):
    output, summary, seconds = spark_raw
    print(f"local-cluster download: {seconds:.1f} s")
    spark, local = _shards(output), _shards(raw_shards)
    assert sorted(spark) == sorted(local) == ["00000", "00001", "00002"]
    for shard in local:
        assert spark[shard]["rows"] == local[shard]["rows"], shard
        assert spark[shard]["stats"] == local[shard]["stats"], shard
        assert spark[shard]["members"].keys() == local[shard]["members"].keys(), shard
        for name, data in local[shard]["members"].items():
            if name.endswith(".json"):  # per-sample metadata: same fields and values
                assert json.loads(spark[shard]["members"][name]) == json.loads(data), name
            else:  # KEY.png and KEY.txt: the same bytes
                assert spark[shard]["members"][name] == data, name
    n_png = sum(n.endswith(".png") for s in spark.values() for n in s["members"])
    assert n_png == summary["successes"] > 0
    Image.open(io.BytesIO(next(d for s in spark.values() for n, d in s["members"].items()
                               if n.endswith(".png")))).verify()
    assert _without_output(summary) == _without_output(summarize(raw_shards))
    assert not os.path.exists(os.path.join(output, "_tmp"))  # img2dataset's input shards cleaned up


def test_spark_rerun_fetches_only_the_unfinished_shard(tiny_dataset, spark_raw, tmp_path):
    # Which shards to fetch is img2dataset's driver-side incremental mode: local[2] (Python workers
    # beside one JVM) tests it as well as the local cluster, in half the start-up time.
    output, summary, _ = spark_raw
    raw = str(tmp_path / "raw")
    shutil.copytree(output, raw)
    os.remove(os.path.join(raw, "00001_stats.json"))  # as if the run had died during shard 1
    untouched = {n: os.stat(os.path.join(raw, n)).st_mtime_ns for n in os.listdir(raw)
                 if n.startswith(("00000", "00002"))}
    shard1 = {r["url"].split("/", 3)[-1] for r in pq.read_table(os.path.join(raw, "00001.parquet")).to_pylist()}
    before = len(tiny_dataset.server.request_log)
    again = download(tiny_dataset.urls, raw, **{**RAW_DOWNLOAD_KWARGS, "allow_private_networks": False},
                     allow_hosts=(f"127.0.0.1:{tiny_dataset.port}",), distributor="pyspark", spark_master="local[2]")
    assert _without_output(again) == _without_output(summary)
    fetched = [line.split()[1].lstrip("/") for line in tiny_dataset.server.request_log[before:]]
    assert fetched and set(fetched) <= shard1
    assert untouched == {n: os.stat(os.path.join(raw, n)).st_mtime_ns for n in untouched}
    assert _shards(raw)["00001"]["rows"] == _shards(output)["00001"]["rows"]


def test_default_settings_refuse_loopback_inside_the_executors(tmp_path, monkeypatch):
    from pipeline.dev.tinydata import serve

    for var in ("IMAGEN_ALLOW_PRIVATE_NETWORKS", "IMAGEN_ALLOW_HOSTS"):
        monkeypatch.delenv(var, raising=False)
    site = tmp_path / "site"
    site.mkdir()
    for i in range(6):  # real images: a fetch that got through would succeed, and be logged
        Image.new("RGB", (96, 96), (40 * i, 80, 160)).save(site / f"img{i}.png")
    server = serve(str(site), 0)
    port = server.server_address[1]
    try:
        # "localhost" is a name: the driver's pre-screen cannot refuse it without a DNS lookup,
        # so only the guard in the executor's Python worker stands between it and the server.
        rows = [{"url": f"http://localhost:{port}/img{i}.png", "caption": f"picture {i}"} for i in range(6)]
        rows.append({"url": f"http://127.0.0.1:{port}/img0.png", "caption": "literal"})  # pre-screened
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
        with pytest.raises(NothingDownloaded, match="IMAGEN_ALLOW_PRIVATE_NETWORKS") as err:  # issue 28
            download(str(tmp_path / "urls.parquet"), str(tmp_path / "raw"), presets=RAW_DOWNLOAD_KWARGS["presets"],
                     number_sample_per_shard=2, distributor="pyspark", spark_master=MASTER)
        summary = err.value.summary
        assert server.request_log == []
    finally:
        server.shutdown()
        server.server_close()
    assert summary["successes"] == 0 and summary["shards"] == 3 and summary["input_rows"] == 7
    assert summary["rejected"] == {"loopback_address": 7} and summary["errors"] == {}
    errors = [r["error_message"] for shard in ("00000", "00001", "00002")
              for r in pq.read_table(tmp_path / "raw" / f"{shard}.parquet").to_pylist()]
    assert len(errors) == 6
    assert all(e.startswith(f"loopback_address: localhost:{port} resolves to ") for e in errors), errors
