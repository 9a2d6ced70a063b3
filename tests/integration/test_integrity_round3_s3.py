"""Issue 24 item 9 on a real S3-compatible server (moto's, on 127.0.0.1): object stores behave.

- Every completeness check reads a fresh listing: before, a listing cached (s3fs's dircache)
  before img2dataset wrote hid its ``_stats.json`` from ``download``'s check, which failed its
  first try on every ``s3://`` output.
- ``sample --output s3://...`` writes to the bucket: before, it wrote ``./s3:/bucket/x.png`` on
  local disk and nothing to the bucket.
- A rerun with nothing to do writes nothing: before, an identical download rewrote
  ``_urls.parquet`` and ``refused.parquet`` (6 write requests) and a finished run republished
  ``final/`` (19 more).
- The last object of a published ``final/`` is its marker, ``config.json``: before, the folder
  "move" copied in name order and ``config.json`` landed first.

Write requests are counted at s3fs's one door to botocore (``S3FileSystem._call_s3``).
"""

import contextlib
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("moto.server", reason="needs the dev extra: moto[server]")
s3fs = pytest.importorskip("s3fs", reason="needs the dev extra: s3fs")

from imagen.checkpoint import CONFIG_NAME, EMA_NAME, MODEL_NAME  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.data.raw_rows import RETRY_DIR  # noqa: E402

BUCKET = "round3"
WRITES = ("put_object", "copy_object", "delete_object", "delete_objects", "create_multipart_upload",
          "upload_part", "complete_multipart_upload")


@pytest.fixture(scope="module")
def s3():
    from tests.s3server import moto_s3

    with moto_s3(BUCKET) as port:
        yield port


@pytest.fixture
def root(s3, tmp_path):
    return f"s3://{BUCKET}/{tmp_path.name}"


@pytest.fixture
def writes(monkeypatch):
    """``with writes() as log:`` -> log holds (operation, key) of every S3 write request meanwhile."""
    call, sync_call = s3fs.S3FileSystem._call_s3, s3fs.S3FileSystem.call_s3
    active: list[list] = []

    def note(method, kwargs) -> None:
        name = method if isinstance(method, str) else method.__name__
        if name in WRITES:
            keys = [kwargs["Key"]] if "Key" in kwargs else [o["Key"] for o in kwargs["Delete"]["Objects"]]
            for log in active:
                log.extend((name, key) for key in keys)

    async def recording(self, method, *args, **kwargs):
        note(method, kwargs)
        return await call(self, method, *args, **kwargs)

    def recording_sync(self, method, *args, **kwargs):  # S3File's uploads (bound to the original)
        note(method, kwargs)
        return sync_call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recording)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", recording_sync)

    @contextlib.contextmanager
    def record():
        log: list = []
        active.append(log)
        try:
            yield log
        finally:
            active.remove(log)

    return record


def test_a_completeness_check_reads_a_fresh_listing(root):
    from pipeline.data import download

    raw = f"{root}/raw"
    storage.write_json(f"{raw}/00000_stats.json", {"count": 10, "successes": 10})
    assert download._missing_shards(raw, 20, 10) == ["00001"]  # s3fs caches this listing
    # img2dataset, in its own process, writes the second shard's marker with its own client
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(f"{raw.removeprefix('s3://')}/00001_stats.json", b"{}")
    download._check_finished(raw, 20, 10)  # raised "shard(s) ['00001'] ... have no _stats.json" before
    assert storage.list_shards(raw, r"\d+_stats\.json")[-1].endswith("00001_stats.json")


def _url_list(tmp_path) -> str:
    path = str(tmp_path / "urls.parquet")
    pq.write_table(pa.table({"url": ["http://10.0.0.1/a.png", "http://images.example/b.png"],
                             "caption": ["refused before fetching", "a red circle"]}), path)
    return path


def test_an_identical_download_rerun_writes_nothing(root, tmp_path, writes):
    from pipeline.data.download import NothingDownloaded, download

    raw = f"{root}/raw"
    # shard 00000 of the one allowed row is already finished, so img2dataset is not started
    storage.write_json(f"{raw}/00000_stats.json", {"count": 1, "successes": 0})
    with storage.atomic_write(f"{raw}/00000.parquet") as f:
        pq.write_table(pa.table({"url": ["http://images.example/b.png"], "caption": ["a red circle"], "key": ["000000000"],
                                  "status": ["failed_to_download"], "error_message": ["HTTP Error 404"]}), f)
    urls = _url_list(tmp_path)
    # one URL refused, one 404: nothing came down, an error whose summary is the download's
    with writes() as first, pytest.raises(NothingDownloaded) as err:
        download(urls, raw, number_sample_per_shard=10)
    done = err.value.summary
    assert (done["shards"], done["refused"], done["failed"]) == (1, 1, 1)
    # the list, the refused rows, and the retry pass's spec and counts (pipeline.data.retry)
    assert {os.path.relpath(k, raw.split("/", 3)[3]) for op, k in first if op == "copy_object"} == {
        "_urls.parquet", "refused.parquet", f"{RETRY_DIR}/download.json", f"{RETRY_DIR}/stats.json"}
    with writes() as second, pytest.raises(NothingDownloaded) as err:
        download(urls, raw, number_sample_per_shard=10)
    assert err.value.summary == done
    assert second == []  # 12 write requests before (each file: put, copy, delete of its temporary)
    # a changed list is still written (and the finished shard refuses to mix with it)
    pq.write_table(pa.table({"url": ["http://images.example/c.png"], "caption": ["x"]}), urls)
    with pytest.raises(RuntimeError, match="different URL list"):
        download(urls, raw, number_sample_per_shard=10)


def _step_dir(uri: str, tag: bytes) -> str:
    for name, data in ((MODEL_NAME, b"m" * 64 + tag), (EMA_NAME, b"e" * 64 + tag), (CONFIG_NAME, b"{}" + tag)):
        storage.write_bytes(storage.join(uri, name), data)
    return uri


def _landed(log: list) -> list[str]:
    """Names of the objects written into place, in order (temporaries, named ``.NAME.tmp-*``, left out)."""
    names = [os.path.basename(k) for op, k in log if op in ("put_object", "copy_object", "complete_multipart_upload")]
    return [n for n in names if not n.startswith(".")]


def test_final_is_published_with_its_marker_last_and_only_once(root, writes):
    from pipeline.train.checkpointing import publish_final

    run = f"{root}/checkpoints/base64/tiny-key"
    final = f"{run}/final"
    source = _step_dir(f"{run}/step-00000003", b"3")
    with writes() as first:
        publish_final(final, source)
    assert _landed(first)[-1] == CONFIG_NAME, _landed(first)  # config.json landed first before
    assert sorted(_landed(first)) == sorted([MODEL_NAME, EMA_NAME, CONFIG_NAME])
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    stamps = {os.path.basename(p): fs.info(p)["LastModified"] for p in fs.ls(final.removeprefix("s3://"))}
    assert stamps[CONFIG_NAME] == max(stamps.values())  # by the server's clock too
    assert storage.read_bytes(f"{final}/{MODEL_NAME}").endswith(b"3")
    with writes() as again:
        publish_final(final, source)
    assert again == []  # 19 write requests before (15 for the first publish, 9 now)
    newer_source = _step_dir(f"{run}/step-00000006", b"6")
    with writes() as newer:  # a newer source is published over it, config.json still last
        publish_final(final, newer_source)
    assert _landed(newer)[-1] == CONFIG_NAME
    assert os.path.basename(newer[0][1]) == CONFIG_NAME and newer[0][0].startswith("delete")  # unpublished first
    assert storage.read_bytes(f"{final}/{EMA_NAME}").endswith(b"6")


def test_a_finished_stage_is_reused_without_a_write(root, writes):
    from pipeline.layout import RESULT
    from pipeline.train.job import TrainJob
    from pipeline.train.launch import train_stage

    run = f"{root}/checkpoints/base64/tiny-key"
    storage.write_json(f"{root}/filtered/manifest.json", {"shards": []})  # the data the settings name
    storage.write_bytes(f"{run}/final/{CONFIG_NAME}", b"{}")
    storage.write_json(f"{run}/{RESULT}", {"checkpoint": f"{run}/final", "step": 3, "root": root})

    class NeverCalled:
        def launch(self, job, nodes, procs_per_node):
            raise AssertionError("a finished run was trained again")

    job = TrainJob(stage="base64", preset="tiny", data=f"{root}/filtered", embeddings=f"{root}/embeddings/x",
                   checkpoint_dir=run, root=root, max_steps=3, resume="latest")
    with writes() as log:
        assert train_stage(job, NeverCalled())["reused"] is True
    assert log == []


def test_sample_writes_its_output_to_the_bucket(root, tmp_path, tiny_encoder_dir, monkeypatch, capsys):
    import torch
    from PIL import Image

    from imagen.checkpoint import save_weights
    from imagen.config import preset
    from imagen.unet import UNet
    from pipeline.cli import main

    cfg = preset("tiny", "base64")
    torch.manual_seed(0)
    state = UNet(cfg.unet).state_dict()
    weights = str(tmp_path / "stage")
    save_weights(weights, state, cfg, ema=state, metadata={"step": 1})
    monkeypatch.chdir(tmp_path)
    common = ["--model", weights, "--encoder", tiny_encoder_dir, "--steps", "1", "--no-progress"]
    assert main(["sample", "a red circle", *common, "--output", f"{root}/one/x.png"]) == 0, capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s3:")  # before: ./s3:/round3/.../x.png, nothing in the bucket
    assert Image.open(io.BytesIO(storage.read_bytes(f"{root}/one/x.png"))).size == (32, 32)
    assert json.loads(storage.read_bytes(f"{root}/one/x.json"))["prompts"] == ["a red circle"]
    assert main(["sample", "a red circle", "a blue square", *common, "--seed", "1", "2",
                 "--output", f"{root}/many"]) == 0, capsys.readouterr().err
    names = [storage.basename(u) for u in storage.list_files(f"{root}/many")]
    assert names == ["000-seed1.png", "000-seed2.png", "001-seed1.png", "001-seed2.png", "grid.png", "prompts.json"]
    assert not os.path.exists(tmp_path / "s3:")
