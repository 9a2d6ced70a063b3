"""Caption embedding step (pipeline.data.embed) killed mid-shard in a child process: no partial file.

HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_embed.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.caption_cache import CACHE_DIR
from pipeline.data.embed import embed_shards
from pipeline.data.embeddings import read_embeddings
from pipeline.dev.tinymodels import build_tiny_t5
from tests.unit.test_embed import (  # shared with the unit tier
    write_filtered_shards,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")





KILL_SCRIPT = """
import sys, time
import pyarrow.parquet as pq
from pipeline.data.caption_cache import CACHE_DIR
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
        (out_dir,) = [p for p in emb.iterdir() if p.name != CACHE_DIR]  # the encoder's folder
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
    # the killed run had cached shard 1's captions before writing its parquet: none is encoded again
    assert again["caption_dedup"]["captions_encoded"] == 0 and again["caption_dedup"]["cache_hits"] > 0
    assert sorted(os.listdir(out_dir)) == ["000000.parquet", "000001.parquet"]  # temp gone
    assert len(read_embeddings(str(out_dir / "000001.parquet"))[0]) == 6
