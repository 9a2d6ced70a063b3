"""Issue 24 items 3 and 4 through ``imagen-pipeline filter``, as an operator runs it: a raw shard
with a member named ``KEY.PNG`` is filtered (the member dropped and counted) on every run, and
raw shards rewritten in place at the same size are filtered again, not reused.

    .venv/bin/pytest tests/integration/test_integrity_round3_filter_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.unit.test_integrity_round3_filter import padded_tiny_png, rewrite_in_place
from tests.unit.test_shard_integrity import (
    good_shard,
    members,
    output_members,
    png,
    write_raw_shard,
)

BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")


def filter_cli(raw, out, *extra: str) -> dict:
    proc = subprocess.run([BIN, "filter", "--input", str(raw), "--output", str(out), "--min-side", "16",
                           "--no-dedup", "--no-near-dedup", *extra], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_filter_cli_drops_misspelt_members_and_refilters_rewritten_shards(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    keys = [f"00000{i:04d}" for i in range(3)]
    entries = [*members(keys[0], 0), (f"{keys[1]}.PNG", png(1)), *members(keys[1], 1)[1:], *members(keys[2], 2)]
    write_raw_shard(raw, 0, entries, keys)
    tar1, keys1 = good_shard(raw, 1, 3)
    for run in range(2):  # KEY.PNG blocked every rerun before
        if run:
            (out / "manifest.json").unlink()
        summary = filter_cli(raw, out, "--samples-per-shard", "10")
        assert summary["kept"] == 5 and summary["rejects"]["filter"] == {"unknown_member_extension": 1}
        assert summary["dropped_members"] == {"unknown_member_extension": 1}
    # Both raw shards rewritten in place, same size: a 4x4 image padded to the original length.
    rewrite_in_place(raw / "00000.tar", f"{keys[2]}.png", padded_tiny_png(len(png(2))))
    rewrite_in_place(tar1, f"{keys1[0]}.png", padded_tiny_png(len(png(100))))
    summary = filter_cli(raw, out, "--samples-per-shard", "9", "--workers", "2")
    assert summary["kept"] == 3 and summary["rejects"]["filter"] == {"unknown_member_extension": 1,
                                                                    "image_too_small": 2}
    got = output_members(out)
    assert f"{keys[2]}.png" not in got and f"{keys1[0]}.png" not in got and len(got) == 9
