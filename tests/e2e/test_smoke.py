"""End to end: `infra/smoke_test.py` (what `make smoke-test` runs) on a fresh work dir.

Starts a real image server and `mlflow server` on 127.0.0.1, runs `airflow dags test imagen_full`
against a migrated SQLite metadata DB, checks the registry and samples a PNG.
"""

import os
import subprocess
import sys

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(1800)  # ~5 min on 2 idle cores; evaluate's SR sweeps add sampling
def test_smoke_test_end_to_end(tmp_path):
    work = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "infra", "smoke_test.py"), "--workdir",
                           str(work), "--max-steps", "30"], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Smoke test passed" in proc.stdout
    png = work / "sample.png"
    img = Image.open(png)
    assert img.size == (32, 32) and img.mode == "RGB"
    # the registered cascade chains all three tiny stages: 32 -> 64 -> 128 px
    assert Image.open(work / "sample-cascade.png").size == (128, 128)
    manifest = work / "data" / "filtered" / "manifest.json"
    assert manifest.exists()
    assert any((work / "data" / "checkpoints" / "base64").rglob("model.safetensors"))
