"""Issue 24 item 8, bullets three and four (the first two are in test_integrity_round3_reads.py).

- ``launcher_options`` patterns end in ``$``, which under ``re.search`` also matches before a
  trailing newline: ``"default\\n"`` passed as a namespace, and an image ``"REGISTRY/x:1\\n"``
  passed a ``REGISTRY/*`` allowlist. The check now matches the whole value.
- An ``encoder`` of ``/`` made the encoder's identity hash every file on the machine. A folder
  without a config.json at its top, or with more entries or bytes than a model folder holds, is
  refused before anything in it is read; the ids of real model folders are unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import imagen.text as text
from imagen.text import T5TextEncoder
from pipeline.train.launchers.kubernetes import OPTION_SCHEMA, KubernetesOptions

GOOD = {"image": "registry.local/imagen-pipeline:1", "namespace": "default", "runtime": "torch-distributed",
        "gpu_resource": "nvidia.com/gpu", "cpu": "8", "memory": "64Gi", "volume_claim": "imagen-data",
        "mount_path": "/data"}


@pytest.mark.parametrize("key", sorted(GOOD))
def test_launcher_option_with_a_trailing_newline_is_refused(key, monkeypatch):
    monkeypatch.setenv("IMAGEN_K8S_IMAGES", "registry.local/imagen-pipeline*")
    monkeypatch.setenv("IMAGEN_K8S_VOLUME_CLAIMS", "imagen-data")
    assert KubernetesOptions.parse(GOOD).image == GOOD["image"]
    bad = GOOD[key] + "\n"
    assert re.search(OPTION_SCHEMA[key]["pattern"], bad)  # what the old check accepted
    with pytest.raises(ValueError, match=rf"launcher_options: {key}=.*\\n' is not a valid {key}"):
        KubernetesOptions.parse({**GOOD, key: bad})


def test_empty_gpu_resource_still_means_cpu_nodes(monkeypatch):
    monkeypatch.setenv("IMAGEN_K8S_IMAGES", "registry.local/imagen-pipeline*")
    assert KubernetesOptions.parse({"image": GOOD["image"], "gpu_resource": ""}).gpu_resource == ""


def _model_folder(path: Path) -> str:
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_bytes(b'{"d_model": 8}')
    (path / "spiece.model").write_bytes(bytes(range(256)) * 4)
    (path / "sub" / "model.bin").write_bytes(bytes(i % 251 for i in range(5000)))
    (path / ".hidden").write_bytes(b"ignored")
    return str(path)


def test_model_folder_ids_are_unchanged(tmp_path, monkeypatch):
    folder = _model_folder(tmp_path / "t5-fake")
    # golden values computed by the code before the bounds (commit 4d8e680): recorded ids still match
    assert T5TextEncoder(folder).encoder_id == "t5-fake@sha256:4674808a98bc69c7"
    monkeypatch.setattr(text, "_FULL_HASH_LIMIT", 1000)  # model.bin is now fingerprinted by windows
    monkeypatch.setattr(text, "_SAMPLE_BYTES", 64)
    assert T5TextEncoder(folder).encoder_id == "t5-fake@sha256:4075f636fd1edb8f"


def test_a_folder_that_is_not_a_model_is_refused_before_it_is_read(tmp_path, monkeypatch):
    read = []
    real_open = open
    monkeypatch.setattr(text, "open", lambda *a, **k: read.append(a[0]) or real_open(*a, **k), raising=False)
    with pytest.raises(ValueError, match=r"text encoder /: no config.json in this folder, so not a model folder"):
        T5TextEncoder("/").encoder_id  # noqa: B018 - the property does the work
    folder = Path(_model_folder(tmp_path / "many"))
    monkeypatch.setattr(text, "_MAX_ENTRIES", 20)
    for i in range(20):
        (folder / f"f{i}.txt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"more than 20 files and folders, not a model folder"):
        T5TextEncoder(str(folder)).encoder_id  # noqa: B018
    monkeypatch.setattr(text, "_MAX_ENTRIES", 10_000)
    monkeypatch.setattr(text, "_MAX_HASHED_BYTES", 4096)
    with pytest.raises(ValueError, match=r"bytes in files under .* more than a model folder holds \(4096\)"):
        T5TextEncoder(str(folder)).encoder_id  # noqa: B018
    assert read == []
