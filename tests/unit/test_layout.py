"""pipeline/layout.py and the object-store code paths of storage, imagen/checkpoint.py and
pipeline/train/checkpointing.py, on fsspec's in-memory filesystem (``memory://``: remote to every
``is_local`` check, no server). The same steps against a real S3 server are tests/e2e/test_s3_run.py."""

from __future__ import annotations

import os

import pytest
import torch

from imagen.checkpoint import check_weights, load_config, load_model, save_weights
from imagen.config import preset
from imagen.unet import UNet
from pipeline import storage
from pipeline.layout import STEP_NAME, RunDir, RunLayout, checkpoint_tracking, manifest_of


def test_layout_of_a_local_root_is_absolute_and_joined_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = RunLayout("run/")
    root = str(tmp_path / "run")
    assert layout.root == root and layout.is_local
    assert (layout.raw, layout.filtered, layout.manifest) == (
        f"{root}/raw", f"{root}/filtered", f"{root}/filtered/manifest.json")
    assert layout.embeddings("t5-tiny") == f"{root}/embeddings/t5-tiny"
    assert layout.checkpoints("sr256") == f"{root}/checkpoints/sr256"
    assert layout.checkpoints("sr256", "tiny-abc") == f"{root}/checkpoints/sr256/tiny-abc"
    assert layout.artifacts == f"{root}/mlartifacts" and layout.local_state == root
    assert RunLayout.around(f"{root}/filtered") == layout  # the CLI's default for --root
    run = layout.run("base64", "r")
    assert run.path == layout.checkpoints("base64", "r") == f"{root}/checkpoints/base64/r"
    assert (run.result, run.final, run.step(100), run.eval_marker, run.eval_dir) == (
        f"{run.path}/result.json", f"{run.path}/final", f"{run.path}/step-00000100", f"{run.path}/eval.json",
        f"{run.path}/eval")
    assert RunDir.of(run.final) == RunDir.of(run.step(7) + "/") == run  # the run holding a checkpoint
    assert STEP_NAME.match(storage.basename(run.step(12345678))).group(1) == "12345678"
    assert manifest_of(layout.filtered) == layout.manifest
    with pytest.raises(ValueError, match="data root is empty"):
        RunLayout("")


def test_layout_of_an_s3_root_keeps_the_uri_and_tracks_on_this_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("IMAGEN_TRACKING_DIR", str(tmp_path / "state"))
    layout = RunLayout("s3://bucket/run/")
    assert layout.root == "s3://bucket/run" and not layout.is_local
    assert layout.filtered == "s3://bucket/run/filtered"
    assert layout.checkpoints("base64", "x") == "s3://bucket/run/checkpoints/base64/x"
    assert RunLayout.around("s3://bucket/run/filtered") == layout
    # SQLite cannot live on S3: one local store per root, the same for every step on this machine
    uri = layout.tracking_uri()
    assert uri.startswith(f"sqlite:///{tmp_path}/state/") and uri == RunLayout("s3://bucket/run").tracking_uri()
    assert uri != RunLayout("s3://bucket/other").tracking_uri()
    assert layout.artifacts.startswith(str(tmp_path / "state"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert layout.tracking_uri() == "http://127.0.0.1:5000"
    assert layout.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_checkpoint_tracking_follows_the_recorded_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert checkpoint_tracking({"root": str(tmp_path)}) == (f"sqlite:///{tmp_path}/mlflow.db",
                                                            f"{tmp_path}/mlartifacts")
    assert checkpoint_tracking({"root": str(tmp_path)}, "http://h:1")[0] == "http://h:1"
    assert checkpoint_tracking({}, "http://h:1") == ("http://h:1", None)
    with pytest.raises(ValueError, match="records no data root.*--tracking-uri"):
        checkpoint_tracking({})


def test_storage_paths_never_abspath_a_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("s3://b/x/") == "s3://b/x" and storage.normalize("x") == str(tmp_path / "x")
    assert storage.normalize(f"file://{tmp_path}/y") == str(tmp_path / "y")
    assert storage.parent("s3://b/run/filtered/") == "s3://b/run" and storage.parent("a/b") == str(tmp_path / "a")
    assert storage.is_local("rel/path") and not storage.is_local("memory://x") and not storage.is_local("s3://b")


def test_stage_weights_round_trip_through_an_object_store():
    cfg = preset("tiny", "base64")
    torch.manual_seed(0)
    state = UNet(cfg.unet).state_dict()
    where = "memory://layout-test/checkpoints/base64/run/final"
    save_weights(where, state, cfg, ema=state, metadata={"root": "memory://layout-test", "step": 3},
                 storage=storage)
    assert load_config(where, storage)[1] == {"root": "memory://layout-test", "step": 3}
    assert check_weights(where, storage)[0] == cfg
    model, cfg2, _ = load_model(where, storage=storage)
    assert cfg2 == cfg and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    storage.write_bytes(f"{where}/model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="model.safetensors does not fit|not a readable safetensors"):
        check_weights(where, storage)
    with pytest.raises(ValueError, match="is a URI.*storage=pipeline.storage"):
        load_config(where)  # imagen/ opens no remote file by itself
    storage.rmtree("memory://layout-test")


def test_step_checkpoints_on_an_object_store_count_only_when_complete(tmp_path):
    from imagen.ema import EMA
    from pipeline.train import checkpointing as ckpt

    cfg = preset("tiny", "base64")
    torch.manual_seed(0)
    model = UNet(cfg.unet)
    state = ckpt.TrainState(model, EMA(model, cfg.ema()), torch.optim.AdamW(model.parameters()),
                            torch.Generator().manual_seed(1), cfg, {"root": "memory://ck"})
    run = "memory://ck/checkpoints/base64/r"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(run, step, state, rank=0, world=1, keep=2)
    assert ckpt.list_checkpoints(run) == [f"{run}/step-00000002", f"{run}/step-00000003"]
    storage.makedirs(f"{run}/step-00000009")  # a copy cut short: no _COMPLETE, never resumed
    storage.write_bytes(f"{run}/step-00000009/config.json", b"{}")
    assert ckpt.find_resume(run, "latest") == f"{run}/step-00000003"
    meta = ckpt.load_checkpoint(f"{run}/step-00000003", state, 0, 1, torch.device("cpu"))
    assert meta["step"] == 3 and meta["root"] == "memory://ck"
    ckpt.publish_final(f"{run}/final", f"{run}/step-00000003")
    assert sorted(storage.basename(u) for u in storage.list_files(f"{run}/final")) == [
        "config.json", "ema.safetensors", "model.safetensors"]
    with storage.local_dir(f"{run}/final") as local:
        assert os.path.isfile(os.path.join(local, "model.safetensors"))
    storage.rmtree("memory://ck")


def test_storage_lists_folders_locally_and_on_an_object_store(tmp_path):
    import fsspec

    (tmp_path / "enc-a").mkdir()
    (tmp_path / "enc-b").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    assert storage.list_dirs(str(tmp_path)) == [str(tmp_path / "enc-a"), str(tmp_path / "enc-b")]  # no files
    assert storage.list_dirs(str(tmp_path / "manifest.json")) == storage.list_dirs(str(tmp_path / "no")) == []
    mem = fsspec.filesystem("memory")
    mem.pipe("/listdirs/t5/000000.parquet", b"x")
    mem.pipe("/listdirs/readme.txt", b"y")
    assert storage.list_dirs("memory://listdirs") == ["memory:///listdirs/t5"]
    with pytest.raises(ValueError, match="fetch guard"):
        storage.list_dirs("http://127.0.0.1:1/folder")  # http(s) is read one file at a time, never listed


def test_a_file_replaced_while_read_is_read_again(tmp_path, monkeypatch):
    """s3fs raises FileExpired (errno EBUSY) when another process rewrites an object between its
    ranged reads (a lock lease renewed by its heartbeat): read_json reads it again, whole."""
    import errno

    path = tmp_path / "lease.json"
    path.write_text('{"expires": 2}')
    real_open, calls = storage.open, []

    def replaced_once(uri, mode="rb", **kw):
        calls.append(uri)
        if len(calls) == 1:
            raise OSError(errno.EBUSY, "The remote file ... no longer exists")
        return real_open(uri, mode, **kw)

    monkeypatch.setattr(storage, "open", replaced_once)
    assert storage.read_json(str(path)) == {"expires": 2} and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(storage, "open", lambda uri, mode="rb", **kw: (_ for _ in ()).throw(
        OSError(errno.EBUSY, "still changing")))
    with pytest.raises(OSError, match="still changing"):
        storage.read_json(str(path))  # a file that never settles is an error, not a loop
