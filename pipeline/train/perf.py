"""Model FLOPs utilisation of a training run: what ``perf/mfu`` in every run means.

    flops = train_flops_per_image(cfg)          # 3 forward passes' FLOPs (forward + backward)
    peak = peak_flops(torch.device("cuda"))     # bf16 dense peak of this GPU, None on a CPU
    utilisation(flops * images_per_s_per_device, peak)   # {"perf/mfu": ...} or {"perf/tflops": ...}

FLOPs come from :mod:`imagen.flops` (counted on the meta device, at the stage's training crop
and the preset's padded text length: what the step really runs). The MFU convention (PaLM,
appendix B) counts the model's FLOPs only, so recomputation under gradient checkpointing is
not credited. A GPU's peak is read from ``pipeline/calibration.json`` (the planner's table,
the one owner of device facts): each device there has a ``cuda_name_pattern`` matched against
``torch.cuda.get_device_name``. An unknown GPU or a CPU logs achieved TFLOP/s instead.
"""

from __future__ import annotations

import functools
import re

import torch

from imagen.config import StageConfig


def train_flops_per_image(cfg: StageConfig) -> int:
    """FLOPs of one training image of ``cfg`` (forward + backward) at its crop and text length."""
    from imagen.flops import TRAIN_FLOPS_PER_FORWARD, unet_forward_flops

    return TRAIN_FLOPS_PER_FORWARD * unet_forward_flops(cfg.unet, cfg.spec.crop_size, cfg.max_text_len)


@functools.lru_cache(maxsize=8)
def device_key(name: str) -> str | None:
    """The calibration table's device key of the GPU called ``name`` (``torch.cuda.get_device_name``),
    None for a GPU the table does not know."""
    from pipeline.plan import load_calibration

    for key, dev in load_calibration(None)["devices"].items():
        pattern = dev.get("cuda_name_pattern")
        if pattern and re.search(pattern, name, re.IGNORECASE):
            return key
    return None


def peak_for_name(name: str) -> float | None:
    """bf16 dense peak FLOP/s of the GPU called ``name``, or None."""
    from pipeline.plan import load_calibration

    key = device_key(name)
    peak = load_calibration(None)["devices"][key].get("peak_bf16_flops") if key else None
    return float(peak) if peak else None


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def utilisation(flops_per_s: float, peak: float | None) -> dict[str, float]:
    """``perf/mfu`` against ``peak`` (per device), or ``perf/tflops`` where no peak is known."""
    if peak:
        return {"perf/mfu": flops_per_s / peak, "perf/tflops": flops_per_s / 1e12}
    return {"perf/tflops": flops_per_s / 1e12}
