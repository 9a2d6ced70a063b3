"""pipeline/train/perf.py: what perf/mfu means. FLOPs at the training crop and padded text, a
GPU's peak found by its CUDA name in the calibration table, MFU or achieved TFLOP/s."""

import pytest

from imagen.config import preset
from imagen.flops import unet_forward_flops
from pipeline.train import perf


def test_training_flops_are_three_forwards_at_the_crop_and_the_padded_text():
    cfg = preset("sr1024")  # trains on 256 px crops: the FLOPs of the crop, not of 1024 px
    assert perf.train_flops_per_image(cfg) == 3 * unet_forward_flops(cfg.unet, 256, cfg.max_text_len)
    tiny = preset("tiny")
    assert perf.train_flops_per_image(tiny) == 3 * unet_forward_flops(tiny.unet, 32, 32)


@pytest.mark.parametrize(("name", "key", "peak"), [
    ("NVIDIA H100 80GB HBM3", "h100", 989e12), ("NVIDIA H200", "h200", 989e12),
    ("NVIDIA H100 PCIe", "h100-pcie", 756e12), ("NVIDIA A100-SXM4-40GB", "a100-40gb", 312e12),
    ("NVIDIA L40S", None, None), ("Tesla T4", None, None)])
def test_a_gpu_is_found_by_its_cuda_name(name, key, peak):
    assert perf.device_key(name) == key and perf.peak_for_name(name) == peak


def test_mfu_where_the_peak_is_known_else_achieved_tflops():
    assert perf.utilisation(400e12, 989e12) == {"perf/mfu": pytest.approx(400 / 989), "perf/tflops": 400.0}
    assert perf.utilisation(2e11, None) == {"perf/tflops": 0.2}
    import torch

    assert perf.peak_flops(torch.device("cpu")) is None
