"""imagen/text.py in a fresh interpreter: importing it loads no heavy library."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from imagen.text import T5TextEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAPTIONS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a photo of a dog on the beach",
]


def test_import_is_lazy():
    code = "import sys, imagen.text; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    enc = T5TextEncoder("google/t5-v1_1-xxl")  # no download, no load
    assert enc._model is None and enc.max_length == 128
    assert enc.dtype == torch.float32 and enc.device == "cpu"
    assert T5TextEncoder("x", dtype="bf16", device="cpu").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        T5TextEncoder("x", dtype="int3")
