"""Issue 24 item 1: a config.json that describes a larger U-Net than its weights costs no memory.

Loading builds the U-Net on the meta device, compares its tensor shapes with the weight file's
safetensors header, and only then builds it for real; every size field of config.json has an
upper bound. A spy on ``imagen.checkpoint.UNet`` records the device of each U-Net built: a
tampered config.json must be refused with only meta-device builds (before the fix, one real
build of the widened model ran first: 1.5 GB at 512 channels, 4.7 GB at 1024).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import imagen.checkpoint as ckpt
from imagen.checkpoint import check_weights, load_config, load_model, save_weights
from imagen.config import preset
from imagen.unet import UNet


@pytest.fixture
def built(monkeypatch) -> list[str]:
    """Device type of every U-Net that imagen.checkpoint builds, in order."""
    devices: list[str] = []

    class Spy(UNet):
        def __init__(self, cfg):
            super().__init__(cfg)
            devices.append(next(self.parameters()).device.type)

    monkeypatch.setattr(ckpt, "UNet", Spy)
    return devices


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> str:
    cfg = preset("tiny", "base64")
    torch.manual_seed(0)
    state = UNet(cfg.unet).state_dict()
    path = str(tmp_path_factory.mktemp("stage") / "final")
    save_weights(path, state, cfg, ema=state, metadata={"step": 1})
    return path


def _tampered(stage: str, dst, edit) -> str:
    dst = str(dst)
    os.makedirs(dst)
    for name in os.listdir(stage):
        with open(os.path.join(stage, name), "rb") as src, open(os.path.join(dst, name), "wb") as out:
            out.write(src.read())
    with open(os.path.join(dst, "config.json")) as f:
        doc = json.load(f)
    edit(doc)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(doc, f)
    return dst


def test_a_good_checkpoint_is_checked_on_meta_then_built_once(stage, built):
    model, cfg, meta = load_model(stage)
    assert built == ["meta", "cpu"] and meta == {"step": 1} and cfg == preset("tiny", "base64")
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("channels", [512, 1024])
def test_a_widened_config_is_refused_before_any_parameter_is_allocated(stage, built, tmp_path, channels):
    def widen(doc):
        doc["unet"]["channels"] = channels

    path = _tampered(stage, tmp_path / "wide", widen)
    with pytest.raises(ValueError, match=r"ema\.safetensors does not fit its config\.json.*of another shape"):
        load_model(path)
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit its config\.json"):
        load_model(path, use_ema=False)
    with pytest.raises(ValueError, match="does not fit"):
        check_weights(path)
    assert built == ["meta"] * 3  # nothing was ever allocated for the 512- or 1024-wide model


@pytest.mark.parametrize(("field", "value", "bound"), [
    ("unet.channels", 4097, "4096"),
    ("unet.num_res_blocks", [1, 65, 1], "64"),
    ("unet.channel_mults", [1, 2, 65], "64"),
    ("unet.head_dim", 100_000, "1024"),
    ("unet.text_embed_dim", 1 << 20, "16384"),
    ("unet.cond_dim", 1 << 20, "16384"),
    ("unet.num_groups", 5000, "1024"),
    ("unet.in_channels", 1000, "64"),
    ("image_size", 65536, "4096"),
    ("unet.image_size", 65536, "4096"),
    ("max_text_len", 1 << 20, "4096"),
    ("diffusion.sample_steps", 10**9, "100000"),
])
def test_every_size_field_has_an_upper_bound(stage, built, tmp_path, field, value, bound):
    def edit(doc):
        section, _, key = field.rpartition(".")
        (doc[section] if section else doc)[key] = value

    path = _tampered(stage, tmp_path / "big", edit)
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(err.value) == (f"{os.path.join(path, 'config.json')}: {field} is {value!r}, must be <= {bound}: "
                              "fix it or restore config.json from the training run")
    assert built == []


def test_too_many_levels_are_refused_by_count(stage, built, tmp_path):
    def deepen(doc):
        for key in ("channel_mults", "num_res_blocks", "self_attn_levels", "cross_attn_levels"):
            doc["unet"][key] = doc["unet"][key][:1] * 9

    path = _tampered(stage, tmp_path / "deep", deepen)
    with pytest.raises(ValueError, match=r"unet\.channel_mults has 9 levels, at most 8 are allowed"):
        load_model(path)
    assert built == []


def test_the_paper_presets_are_within_the_bounds(tmp_path):
    for name in ("base64", "sr256", "sr1024"):
        cfg = preset(name)
        path = str(tmp_path / name)
        os.makedirs(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**cfg.to_dict(), "metadata": {}}, f)
        assert load_config(path)[0] == cfg


def test_a_uri_is_refused_without_storage(built):
    for call in (lambda: load_model("s3://bucket/ckpt"), lambda: check_weights("gs://bucket/ckpt"),
                 lambda: load_config("http://127.0.0.1:9/ckpt")):
        with pytest.raises(ValueError, match="is a URI: imagen.checkpoint reads and writes only local paths"):
            call()
    assert built == []


def test_a_remote_weight_file_is_read_only_after_its_header_fits(built):
    """Through ``storage=``: the header's shapes and byte ranges are checked before the file is
    fetched whole, so a file padded past what its shapes need is never read into memory."""
    import struct

    from pipeline import storage

    cfg = preset("tiny", "base64")
    state = UNet(cfg.unet).state_dict()
    where = "memory://round3-weights/final"
    save_weights(where, state, cfg, ema=state, storage=storage)
    raw = storage.read_bytes(f"{where}/ema.safetensors")
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 1 << 20  # the last tensor claims 1 MiB more than its shape holds
    head = json.dumps(header).encode()
    storage.write_bytes(f"{where}/ema.safetensors", struct.pack("<Q", len(head)) + head + raw[8 + n:]
                        + bytes(1 << 20))
    fetched = []

    class Counting:
        def __getattr__(self, name):
            return getattr(storage, name)

        def read_bytes(self, uri):
            fetched.append(uri)
            return storage.read_bytes(uri)

    try:
        with pytest.raises(ValueError, match=rf"ema\.safetensors is not a readable safetensors file .*tensor {last}"):
            load_model(where, storage=Counting())
        assert fetched == [f"{where}/config.json"] and built == ["meta"]
        model, _, _ = load_model(where, use_ema=False, storage=Counting())  # the intact file still loads
        assert built == ["meta", "meta", "cpu"] and fetched[-1] == f"{where}/model.safetensors"
    finally:
        storage.rmtree("memory://round3-weights")
