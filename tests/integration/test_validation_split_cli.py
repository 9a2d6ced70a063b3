"""``imagen-pipeline filter --val-fraction F --val-max M``, as an operator runs it: the split lands
in val-NNNNNN.tar and the manifest, 0 turns it off, a bad value is one line naming the setting.

    .venv/bin/pytest tests/integration/test_validation_split_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.unit.test_validation_split import download, split_by_url

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")


def filter_cli(raw, out, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([BIN, "filter", "--input", str(raw), "--output", str(out), "--min-side", "32",
                           "--samples-per-shard", "4", *extra], capture_output=True, text=True, timeout=600)


def test_filter_cli_val_flags(tmp_path):
    download(tmp_path / "raw", 20)
    proc = filter_cli(tmp_path / "raw", tmp_path / "out", "--val-fraction", "0.5", "--val-max", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["split"] == {"val_fraction": 0.5, "val_max": 3, "by": "url", "train": 17, "val": 3,
                                "keyed_without_url": 0}
    assert sorted(p.name for p in (tmp_path / "out").glob("val-*")) == ["val-000000.tar"]
    assert sum(s == "val" for s in split_by_url(tmp_path / "out").values()) == 3
    assert "validation split" in proc.stdout
    proc = filter_cli(tmp_path / "raw", tmp_path / "none", "--val-fraction", "0")
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["split"]["val"] == 0
    assert not list((tmp_path / "none").glob("val-*"))
    proc = filter_cli(tmp_path / "raw", tmp_path / "bad", "--val-fraction", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("imagen-pipeline filter: error: val_fraction=1.0: use 0 <= "
                                                   "val_fraction < 1 (0: no validation split)")
