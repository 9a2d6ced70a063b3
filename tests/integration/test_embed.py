"""Caption embedding step (pipeline.data.embed) killed mid-shard in a child process: no partial file.

HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_embed.py -q
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.embed import (
    embed_shards,
    read_embeddings,
)
from pipeline.dev.tinymodels import build_tiny_t5

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]


def write_filtered_shards(root: Path, num_shards: int = 2, per_shard: int = 6) -> dict[str, str]:
    """Filtered-shard layout: NNNNNN.tar with KEY.png/.txt/.json, plus manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    captions = {}
    for s in range(num_shards):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                # Keys deliberately not sorted within the shard: output must keep tar order.
                key = f"{s:05d}{(per_shard - i) * 7 % 100:04d}"
                caption = f"a {COLOURS[(s + i) % 5]} {SHAPES[i % 3]}" + " on a white background" * (
                    i % 3
                )
                captions[key] = caption
                buf = io.BytesIO()
                Image.new("RGB", (20 + i, 16), (40 * i, 255 - 30 * s, 90)).save(buf, "PNG")
                meta = json.dumps({"key": key, "caption": caption, "width": 20 + i}).encode()
                for ext, data in (
                    ("png", buf.getvalue()),
                    ("txt", caption.encode()),
                    ("json", meta),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    counts = {f"{s:06d}.tar": per_shard for s in range(num_shards)}
    manifest = {"format": "imagen-pipeline/filtered-shards/v1", "shards": counts,
                "input_rows": len(captions), "kept": len(captions), "rejected": 0,
                "rejects": {}}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return captions


KILL_SCRIPT = """
import sys, time
import pyarrow.parquet as pq
from pipeline.data.embed import embed_shards

real_write = pq.write_table

def stall(table, where, **kwargs):  # shard 1: write part of the file, then hang
    if table.schema.metadata[b"source_shard"] == b"000001.tar":
        where.write(b"PAR1" + bytes(4096))
        where.flush()
        print("WRITING", flush=True)
        time.sleep(120)
    return real_write(table, where, **kwargs)

pq.write_table = stall
embed_shards(sys.argv[1], sys.argv[2], sys.argv[3], max_length=16)
"""


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> str:
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5") / "tiny-t5"))


@pytest.fixture
def shards(tmp_path) -> tuple[Path, dict[str, str]]:
    return tmp_path / "filtered", write_filtered_shards(tmp_path / "filtered")


def test_kill_mid_shard_leaves_no_partial_file(tmp_path, t5_dir, shards):
    data, _ = shards
    emb = tmp_path / "emb"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(data), str(emb), t5_dir],
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        lines = iter(proc.stdout.readline, "")
        assert any(line.strip() == "WRITING" for line in lines), "the embed subprocess died"
        (out_dir,) = list(emb.iterdir())
        (temp,) = list(out_dir.glob(".000001.parquet.tmp-*"))
        assert temp.stat().st_size >= 4100  # really killed halfway through writing shard 1
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stdout.close()
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")) == [
        "000000.parquet"
    ]
    again = embed_shards(str(data), str(emb), t5_dir, max_length=16)
    assert (again["shards"], again["skipped"], again["samples"]) == (1, 1, 6)
    assert sorted(os.listdir(out_dir)) == ["000000.parquet", "000001.parquet"]  # temp gone
    assert len(read_embeddings(str(out_dir / "000001.parquet"))[0]) == 6
