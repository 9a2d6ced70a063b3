"""bench/gpu.py, the one GPU check: its no-GPU path, its device table and its MFU arithmetic
(on CPU, with a fake measured time)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(REPO, "bench", "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@no_gpu
def test_without_a_gpu_it_says_so_and_exits_0(gpu, capsys):
    assert gpu.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "no CUDA GPU present" in lines[0]
    assert json.loads(lines[-1]) == {"gpu": None, "skipped": "no CUDA device"}


def test_device_names_map_to_calibration_rows(gpu):
    names = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA H200": "h200",
             "NVIDIA A100-SXM4-80GB": "a100-80gb", "NVIDIA A100-SXM4-40GB": "a100-40gb", "NVIDIA L4": "l4",
             "NVIDIA L40S": None, "Tesla T4": None}
    assert {n: gpu.device_type(n) for n in names} == names
    assert gpu.peak_flops("NVIDIA H200") == ("h200", 989e12)
    assert gpu.peak_flops("Tesla T4") == (None, None)


def test_the_training_model_is_sized_like_nemos_500m_base(gpu):
    from imagen.flops import unet_params

    cfg = gpu.nemo500m_config()
    assert cfg.image_size == 64 and cfg.unet.text_embed_dim == 4096
    assert unet_params(cfg.unet) == pytest.approx(500e6, rel=0.1)


def test_mfu_and_the_json_line_from_a_fake_measured_time(gpu):
    from imagen.flops import unet_forward_flops

    cfg = gpu.nemo500m_config()
    steps, seconds = 250, 40.0  # pretend 250 timed steps of batch 64 took 40 s
    ips = steps * cfg.train.global_batch / seconds
    child = {"images_per_s": ips, "peak_memory_bytes": 30 << 30, "step": 300, "loss": 0.05,
             "data_wait_fraction": 0.01}
    train = gpu.train_summary(child, cfg, 989e12)
    flops = 3 * unet_forward_flops(cfg.unet, 64, gpu.TEXT_TOKENS)
    assert train["train_flops_per_image"] == flops
    assert train["mfu"] == pytest.approx(400.0 * flops / 989e12)
    assert 0 < train["mfu"] < 1
    assert gpu.mfu(ips, flops, None) is None  # a GPU without a calibration row: no MFU, no guess
    line = gpu.final_json("NVIDIA H200", "h200", 989e12, {"train": train, "cascade": {"images_per_s": 1.0}}, 301.0)
    assert line["images_per_s"] == 400.0 and line["mfu"] == train["mfu"]
    assert line["peak_memory_bytes"] == 30 << 30
    assert {"gpu", "device_type", "peak_bf16_flops", "train", "cascade", "seconds"} <= set(line)
    json.dumps(line)
