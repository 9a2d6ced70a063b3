"""Tests for pipeline.data.download without img2dataset: URL-list reading (formats, columns, fsspec
URIs), stage presets, the pre-screen and error normalization. Real downloads are
tests/integration/test_download.py."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagen.config import stage_specs
from pipeline.data.download import (
    RESERVED_COLUMNS,
    DownloadConfig,
    NothingDownloaded,
    _resolve,
    check_downloaded,
    download,
    infer_input_format,
    normalize_error,
    read_url_list,
    screen_urls,
    stage_policy,
)
from pipeline.dev.tinydata import make_tiny_dataset, serve

DOWNLOAD_ERRORS = {"http_404": "HTTP Error 404: File not found",
                   "not_an_image": "not_an_image: body is markup/JSON, not an image (Content-Type: image/jpeg)",
                   "truncated": "Image decoding error"}


def refused_download(*args, **kwargs) -> dict:
    """download() of a list with no fetchable URL: NothingDownloaded, whose summary is returned."""
    with pytest.raises(NothingDownloaded) as err:
        download(*args, **kwargs)
    return err.value.summary


def test_private_networks_are_refused_without_a_request(tmp_path):
    (tmp_path / "site").mkdir()
    server = serve(str(tmp_path / "site"), 0)
    try:
        info = make_tiny_dataset(str(tmp_path / "site"), n=10, port=server.server_address[1])
        with pytest.raises(NothingDownloaded, match=rf"{info['n_rows']} of {info['n_rows']} URLs were refused "
                                                    r".*IMAGEN_ALLOW_PRIVATE_NETWORKS=1") as err:
            download(info["urls"], str(tmp_path / "raw"))
        result = err.value.summary
        assert server.request_log == []
    finally:
        server.shutdown()
        server.server_close()
    assert result["rejected"] == {"loopback_address": info["n_rows"]}
    assert result["shards"] == 0 and result["total"] == 0 and result["successes"] == 0
    assert result["refused"] == result["input_rows"] == info["n_rows"]
    refused = pq.read_table(tmp_path / "raw" / "refused.parquet").to_pylist()
    assert len(refused) == info["n_rows"]
    assert {r["reason"] for r in refused} == {"loopback_address"}
    assert {r["url"] for r in refused} == set(pq.read_table(info["urls"])["url"].to_pylist())


def test_screen_urls_reasons():
    urls = {
        "http://10.1.2.3/a.jpg": "private_address",
        "http://192.168.0.1/a.jpg": "private_address",
        "http://169.254.169.254/latest/meta-data/": "link_local_address",  # cloud metadata service
        "http://127.0.0.1:8080/a.jpg": "loopback_address",
        "http://[::1]/a.jpg": "loopback_address",
        "http://[::ffff:127.0.0.1]/a.jpg": "loopback_address",
        "http://100.64.0.1/a.jpg": "private_address",  # carrier-grade NAT
        "http://224.0.0.1/a.jpg": "multicast_address",
        "http://[::1/a.jpg": "invalid_url",
        "file:///etc/passwd": "unsupported_scheme",
        "ftp://93.184.216.34/a.jpg": "unsupported_scheme",
        "http://93.184.216.34/a.jpg": None,  # public literal IPs: no DNS needed
        "https://8.8.8.8/a.png": None,
        "http://localhost/a.jpg": None,  # a name: refused inside the fetch, once resolved
    }
    table = pa.table({"url": list(urls), "caption": [f"c{i}" for i in range(len(urls))]})
    allowed, refused = screen_urls(table)
    assert allowed["url"].to_pylist() == [u for u, r in urls.items() if r is None]
    assert dict(zip(refused["url"].to_pylist(), refused["reason"].to_pylist(), strict=True)) == \
        {u: r for u, r in urls.items() if r is not None}
    assert refused["caption"].to_pylist() == [f"c{i}" for i, r in enumerate(urls.values()) if r is not None]


def test_csv_list_with_other_column_names(tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_text("link,text\nhttp://127.0.0.1:9/a.png,a red circle\nhttp://10.0.0.1/b.png,a blue square\n")
    result = refused_download(str(csv), str(tmp_path / "raw"), url_col="link", caption_col="text")
    assert result["rejected"] == {"loopback_address": 1, "private_address": 1}
    refused = pq.read_table(tmp_path / "raw" / "refused.parquet")
    assert refused.column_names == ["url", "caption", "reason"]
    assert refused["caption"].to_pylist() == ["a red circle", "a blue square"]


def test_missing_column_says_what_to_do(tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_text("link,text\nhttp://127.0.0.1:9/a.png,a red circle\n")
    with pytest.raises(ValueError, match="url_col"):
        download(str(csv), str(tmp_path / "raw"))


@pytest.mark.parametrize("kwargs, match", [
    ({"resize_mode": "border"}, "border"),
    ({"encode_format": "png", "encode_quality": 95}, "0..9"),
    ({"encode_format": "bmp"}, "encode_format"),
])
def test_bad_options_fail_before_downloading(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        download(str(tmp_path / "urls.parquet"), str(tmp_path / "raw"), **kwargs)


def test_infer_input_format():
    assert infer_input_format("s3://bucket/urls.parquet") == "parquet"
    assert infer_input_format("urls.csv.gz") == "csv"
    assert infer_input_format("/x/urls.TSV") == "tsv"
    assert infer_input_format("urls.jsonl") == "jsonl"
    with pytest.raises(ValueError, match="input_format"):
        infer_input_format("urls.xlsx")


LIST_ROWS = [{"link": "http://127.0.0.1:9/a.png", "text": "a red circle", "id": 1},
             {"link": "file:///etc/passwd", "text": "a blue square", "id": 2},
             {"link": "http://10.0.0.1/c.png", "text": "ünïcode ✓", "id": 3}]


def _write_list(fs, path: str, fmt: str) -> None:
    import gzip

    if fmt == "parquet":
        with fs.open(path, "wb") as f:
            pq.write_table(pa.Table.from_pylist(LIST_ROWS), f)
        return
    if fmt == "jsonl":
        import json

        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in LIST_ROWS)
    else:
        sep = "\t" if fmt == "tsv" else ","
        text = sep.join(LIST_ROWS[0]) + "\n" + "".join(sep.join(str(v) for v in r.values()) + "\n" for r in LIST_ROWS)
    data = text.encode()
    with fs.open(path, "wb") as f:
        f.write(gzip.compress(data) if path.endswith(".gz") else data)


@pytest.mark.parametrize("name", ["urls.parquet", "urls.csv", "urls.tsv", "urls.jsonl", "urls.csv.gz"])
def test_url_lists_in_every_format_from_any_fsspec_uri(tmp_path, name):
    import fsspec

    uri = f"memory://lists-{tmp_path.name}/{name}"
    _write_list(fsspec.filesystem("memory"), uri, name.split(".")[1])
    fmt = infer_input_format(uri)
    table = read_url_list(uri, fmt, url_col="link", caption_col="text", extra_columns=["id"])
    assert table.column_names == ["url", "caption", "id"]
    assert table["url"].to_pylist() == [r["link"] for r in LIST_ROWS]
    assert table["caption"].to_pylist() == [r["text"] for r in LIST_ROWS]
    result = refused_download(uri, str(tmp_path / "raw"), url_col="link", caption_col="text")
    assert result["rejected"] == {"loopback_address": 1, "unsupported_scheme": 1, "private_address": 1}


def test_url_list_folder_of_files(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    (tmp_path / "lists").mkdir()
    for i in range(2):
        _write_list(fs, str(tmp_path / "lists" / f"part-{i}.jsonl"), "jsonl")
    table = read_url_list(str(tmp_path / "lists"), "jsonl", url_col="link", caption_col="text")
    assert table.num_rows == 2 * len(LIST_ROWS)
    with pytest.raises(ValueError, match=r"no \*\.csv files"):
        read_url_list(str(tmp_path / "lists"), "csv")


def test_stage_specs_pick_the_resize():
    """Downloaded once at the largest stage's side, ratio kept, never upscaled (every stage's
    sizes from its spec); the smallest stage's side is the filter's floor."""
    paper = _resolve(DownloadConfig())
    assert (paper.image_size, paper.resize_mode, paper.resize_only_if_bigger) == (1024, "keep_ratio", True)
    assert _resolve(DownloadConfig(stages=("base64",))).image_size == 64
    assert _resolve(DownloadConfig(stages=("base64", "sr256"))).image_size == 256
    tiny = {s: "tiny" for s in ("base64", "sr256", "sr1024")}
    assert _resolve(DownloadConfig(presets=tiny)).image_size == 128
    assert _resolve(DownloadConfig(image_size=2048)).image_size == 2048  # explicit wins
    assert stage_policy(stage_specs({})) == {
        "image_size": 1024, "resize_mode": "keep_ratio", "resize_only_if_bigger": True, "min_side": 64,
        "stage_sides": {"base64": 64, "sr256": 256, "sr1024": 1024}}
    assert stage_policy(stage_specs(tiny, ["sr256", "sr1024"]))["min_side"] == 64
    with pytest.raises(ValueError, match="unknown stage"):
        _resolve(DownloadConfig(stages=("sr512",)))
    assert _resolve(DownloadConfig(encode_format="jpg")).encode_quality == 95


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: File not found", "http_404"),
    ("HTTP Error 503: Service Unavailable", "http_503"),
    ("Image decoding error", "image_decoding_error"),
    ("<urlopen error timed out>", "timeout"),
    ("timed out", "timeout"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("dns_error: cannot resolve 'x.invalid'", "dns_error"),
    ("<urlopen error [Errno 104] Connection reset by peer>", "connection_reset"),
    ("Use of image disallowed by X-Robots-Tag directive", "disallowed_by_x_robots_tag"),
    ("loopback_address: localhost:80 resolves to 127.0.0.1", "loopback_address"),
    ("decompression_bomb: declared 100000x100000 pixels", "decompression_bomb"),
    (None, "unknown"),
])
def test_normalize_error(message, reason):
    assert normalize_error(message) == reason




# --- issue 28: reserved extra columns, nothing downloaded, progress mid-shard -----------------

@pytest.mark.parametrize("column", ["width", "key", "status", "error_message", "original_height", "sha256", "url"])
def test_reserved_extra_column_is_refused_before_anything_runs(tmp_path, column):
    with pytest.raises(ValueError, match=rf"--extra-columns '{column}' is a column img2dataset writes itself"):
        download(str(tmp_path / "no-such-list.parquet"), str(tmp_path / "raw"),
                 save_additional_columns=["color", column])
    assert not (tmp_path / "raw").exists()


def test_reserved_columns_cover_what_img2dataset_writes():
    """img2dataset's own columns, read from its source: a new one in an upgrade fails here."""
    import inspect
    import re

    from img2dataset.downloader import Downloader

    written = set(re.findall(r'pa\.field\("(\w+)"', inspect.getsource(Downloader.download_shard)))
    assert written >= {"key", "status", "width"}  # the pattern still reads the source
    assert written <= set(RESERVED_COLUMNS), written - set(RESERVED_COLUMNS)


def summary(**counts) -> dict:
    base = {"output": "/data/raw", "shards": 0, "total": 0, "successes": 0, "failed": 0, "refused": 0,
            "input_rows": 0, "errors": {}, "rejected": {}}
    return {**base, **counts}


def test_nothing_downloaded_names_the_setting_and_the_count():
    refused = summary(input_rows=12, refused=10, failed=2, rejected={"loopback_address": 9, "private_address": 1},
                      errors={"http_404": 2})
    with pytest.raises(NothingDownloaded, match=r"10 of 12 URLs were refused .*loopback_address 9, "
                                                r"private_address 1.*IMAGEN_ALLOW_PRIVATE_NETWORKS=1") as err:
        check_downloaded(refused, "urls.parquet")
    assert err.value.summary is refused and "IMAGEN_ALLOW_HOSTS" in str(err.value)
    assert not isinstance(err.value, ValueError)  # two were allowed and failed: a retry may get them
    every = summary(input_rows=3, refused=3, rejected={"loopback_address": 3})
    with pytest.raises(NothingDownloaded, match="3 of 3 URLs were refused") as err:
        check_downloaded(every, "urls.parquet")
    assert isinstance(err.value, ValueError)  # an input error: the DAG task fails without retries
    with pytest.raises(NothingDownloaded, match=r"all 3 URLs failed \(http_404 3\)") as err:
        check_downloaded(summary(input_rows=3, failed=3, errors={"http_404": 3}), "urls.parquet")
    assert "IMAGEN_ALLOW_PRIVATE_NETWORKS" not in str(err.value)  # not the setting's fault
    assert not isinstance(err.value, ValueError)  # a host may be down: a retry may meet it up
    with pytest.raises(NothingDownloaded, match="has no rows") as err:
        check_downloaded(summary(), "urls.parquet")
    assert isinstance(err.value, ValueError)


def test_some_refused_is_a_warning_not_an_error(caplog):
    ok = summary(input_rows=5, successes=4, refused=1, rejected={"private_address": 1})
    assert check_downloaded(ok, "urls.parquet") is ok
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "1 of 5 URLs were refused" in caplog.text and "IMAGEN_ALLOW_PRIVATE_NETWORKS=1" in caplog.text
    caplog.clear()
    check_downloaded(summary(input_rows=5, successes=4, refused=1, rejected={"unsupported_scheme": 1}), "u")
    assert caplog.records == []  # no setting lifts a bad scheme


def test_shard_progress_lines(capsys, monkeypatch):
    from pipeline.data import fetch_guard

    clock = iter(range(100))
    monkeypatch.setattr(fetch_guard.time, "monotonic", lambda: float(next(clock)))
    progress = fetch_guard.ShardProgress()  # t=0
    progress.start_shard("00003", 5, 2.0)  # t=1
    for error in (None, "HTTP Error 404: Not Found", None, "loopback_address: 127.0.0.1", None):
        progress.record(error)  # t=2, 3, 4, 5; the fifth finishes the shard: no line
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["shard 00003: 2/5 fetched, 1 ok, 1 failed, 1.0/s; failed so far: http_404 1",
                     "shard 00003: 4/5 fetched, 2 ok, 2 failed, 1.0/s; failed so far: http_404 1, loopback_address 1"]
