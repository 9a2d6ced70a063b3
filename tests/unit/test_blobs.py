"""pipeline/release/blobs.py without a server: upload settings, reuse and retries of ``put``, the
file lists read from MLmodel, and the hash check's message."""

import hashlib
import os
import pathlib
from types import SimpleNamespace

import pytest

from pipeline.release import blobs


def test_upload_defaults_are_mlflow_variables_and_the_operator_wins(monkeypatch):
    import mlflow.environment_variables as ev

    known = {v.name for v in vars(ev).values() if hasattr(v, "name") and hasattr(v, "get")}
    assert set(blobs.UPLOAD_DEFAULTS) <= known  # a renamed variable in an MLflow upgrade fails here
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    monkeypatch.delenv("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE", raising=False)
    with blobs.upload_settings():
        assert os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "false"
        assert ev.MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE.get() == 100 << 20
    assert os.environ["MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"] == "false"
    assert "MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE" not in os.environ


class FakeClient:
    """An artifact store of one run in a dict: path -> bytes; ``fail`` uploads raise first."""

    def __init__(self, fail: int = 0, torn: bool = False):
        self.files, self.fail, self.torn, self.uploads = {}, fail, torn, 0

    def list_artifacts(self, run_id, path):
        return [SimpleNamespace(path=p, is_dir=False, file_size=len(b)) for p, b in self.files.items()
                if p.startswith(path + "/")]

    def log_artifact(self, run_id, local, artifact_path):
        self.uploads += 1
        if self.fail:
            self.fail -= 1
            raise ConnectionError("reset by peer")
        data = pathlib.Path(local).read_bytes()
        self.files[f"{artifact_path}/{os.path.basename(local)}"] = data[:-1] if self.torn else data


def test_put_uploads_once_and_reuses_by_content(tmp_path):
    a, b = tmp_path / "model.safetensors", tmp_path / "ema.safetensors"
    a.write_bytes(b"weights" * 100)
    b.write_bytes(b"weights" * 100)  # same content, another name
    store = blobs.BlobStore(FakeClient(), "r1")
    digest = hashlib.sha256(b"weights" * 100).hexdigest()
    assert store.put(str(a)) == {"uri": f"runs:/r1/sha256/{digest}/model.safetensors", "sha256": digest, "size": 700}
    assert store.put(str(b))["uri"] == f"runs:/r1/sha256/{digest}/model.safetensors"
    assert store.client.uploads == 1
    assert store.summary() == {"blob_run": "r1", "uploaded_files": 1, "uploaded_bytes": 700,
                               "reused_files": 1, "reused_bytes": 700}


def test_put_retries_whole_files_and_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(blobs.time, "sleep", lambda s: None)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 10)
    store = blobs.BlobStore(FakeClient(fail=2), "r1")
    store.put(str(f))
    assert store.client.uploads == 3 and store.uploaded_files == 1
    with pytest.raises(RuntimeError, match=r"model\.safetensors \(10 bytes\) to run r1 .* failed 3 times, last: "
                                           r"ConnectionError: reset by peer.*MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD"):
        blobs.BlobStore(FakeClient(fail=3), "r1").put(str(f))
    with pytest.raises(RuntimeError, match="incomplete after the upload"):  # a torn blob is not taken for one
        blobs.BlobStore(FakeClient(torn=True), "r1").put(str(f))


def _entry(data: bytes, uri: bool = True) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    e = {"sha256": digest, "size": len(data)}
    if uri:
        e["uri"] = f"runs:/0123abcd/sha256/{digest}/model.safetensors"
    return e


def test_file_lists_are_checked_before_anything_is_fetched():
    good = {"files": {"stage_0": {"config.json": _entry(b"{}", uri=False), "model.safetensors": _entry(b"w")}}}
    assert blobs.read_manifest(good, "m") == good["files"]
    assert blobs.read_manifest({"encoder_name": None}, "m") == {}  # a model from before file lists
    bad_uris = ["http://127.0.0.1/x", "s3://bucket/model.safetensors", "runs:/r/sha256/" + "0" * 64 + "/m",
                "runs:/r/sha256/{}/../../x"]
    for uri in bad_uris:
        e = {**_entry(b"w"), "uri": uri.format(_entry(b"w")["sha256"])}
        with pytest.raises(ValueError, match=r"m: MLmodel config 'files' is malformed at stage_0/model"):
            blobs.read_manifest({"files": {"stage_0": {"model.safetensors": e}}}, "m")
    for rel in ("../config.json", "/etc/passwd", "a//b", "a\\b", ""):
        with pytest.raises(ValueError, match="malformed"):
            blobs.read_manifest({"files": {"text_encoder": {rel: _entry(b"w", uri=False)}}}, "m")


def test_verify_names_the_file_and_the_fix(tmp_path):
    f = tmp_path / "ema.safetensors"
    f.write_bytes(b"good")
    blobs.verify(str(f), _entry(b"good"), "models:/x/1: stage_0/ema.safetensors")
    with pytest.raises(ValueError, match=r"^models:/x/1: stage_0/ema.safetensors: sha256 [0-9a-f]{16}\.\.\., the "
                                         r"model records 4 bytes .* \(from runs:/0123abcd/.*damaged"):
        blobs.verify(str(f), _entry(b"bad!"), "models:/x/1: stage_0/ema.safetensors")
    short = tmp_path / "config.json"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match=r"^x: stage_0/config.json: 3 bytes, the model records 4 bytes.*altered"):
        blobs.verify(str(short), _entry(b"good", uri=False), "x: stage_0/config.json")
