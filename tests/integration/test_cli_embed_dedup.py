"""`imagen-pipeline embed` on shards with repeated captions (issue 27 item 6), as real subprocesses:
the JSON reports the share of encoder work saved, a rerun encodes nothing, and two workers
running at once share the caption cache safely.

HF_HUB_OFFLINE=1 python -m pytest tests/integration/test_cli_embed_dedup.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imagen.text import T5TextEncoder
from pipeline.data.caption_cache import CACHE_DIR, caption_dedup_saving, unpack_entry
from pipeline.data.embeddings import read_embeddings
from pipeline.dev.tinymodels import build_tiny_t5
from tests.unit.test_embed_dedup import SHARDS, write_shards  # shared with the unit tier

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CLI = [sys.executable, "-m", "pipeline.cli", "embed"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def embed(*args: str) -> dict:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vectors(out_dir: str) -> dict[str, np.ndarray]:
    found = {}
    for name in sorted(os.listdir(out_dir)):
        found.update(read_embeddings(os.path.join(out_dir, name))[0])
    return found


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> str:
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5") / "tiny-t5"))


def test_cli_reports_the_saving_and_a_rerun_encodes_nothing(tmp_path, t5_dir):
    captions = write_shards(tmp_path / "filtered")
    args = ["--input", str(tmp_path / "filtered"), "--output", str(tmp_path / "emb"), "--encoder", t5_dir,
            "--max-length", "16", "--device", "cpu"]
    first = embed(*args)
    lengths = dict(zip(captions.values(), T5TextEncoder(t5_dir, max_length=16, device="cpu").token_lengths(
        list(captions.values())), strict=True))
    total, once = sum(lengths[c] for c in captions.values()), sum(lengths[c] for c in set(captions.values()))
    dedup = first["caption_dedup"]
    assert (dedup["captions"], dedup["captions_encoded"]) == (len(captions), len(set(captions.values())))
    assert (dedup["tokens"], dedup["tokens_encoded"]) == (total, once)
    assert caption_dedup_saving(first) == pytest.approx(1 - once / total, abs=1e-4) and dedup["saving"] > 0
    assert dedup["cache"].startswith(str(tmp_path / "emb" / CACHE_DIR))
    before = vectors(first["output"])
    assert sorted(before) == sorted(captions)

    again = embed(*args)  # every shard done: skipped, nothing encoded
    assert again["skipped"] == len(SHARDS) and again["caption_dedup"]["captions_encoded"] == 0
    for parquet in Path(first["output"]).glob("*.parquet"):  # shards redone: every caption from the cache
        parquet.unlink()
    redo = embed(*args)
    assert redo["shards"] == len(SHARDS) and redo["caption_dedup"]["captions_encoded"] == 0
    assert caption_dedup_saving(redo) == 1.0
    after = vectors(redo["output"])
    assert all(np.array_equal(after[k], before[k]) for k in captions)  # the very vectors of the first run

    off = embed(*[a if a != str(tmp_path / "emb") else str(tmp_path / "emb-off") for a in args],
                "--no-caption-cache")
    assert off["caption_dedup"]["cache"] is None and not (tmp_path / "emb-off" / CACHE_DIR).exists()
    within = sum(len(set(texts)) for texts in SHARDS)  # each shard's duplicates still grouped
    assert off["caption_dedup"]["captions_encoded"] == within


def test_two_workers_at_once_share_the_cache(tmp_path, t5_dir):
    many = [texts * 3 for texts in SHARDS] + [list(reversed(texts)) * 2 for texts in SHARDS]
    captions = write_shards(tmp_path / "filtered", many)
    args = ["--input", str(tmp_path / "filtered"), "--output", str(tmp_path / "emb"), "--encoder", t5_dir,
            "--max-length", "16", "--device", "cpu", "--num-workers", "2"]
    procs = [subprocess.Popen([*CLI, *args, "--worker", str(w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV) for w in range(2)]  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["shards"] for r in results) == len(many)
    encoded = sum(r["caption_dedup"]["captions_encoded"] for r in results)
    distinct = set(captions.values())
    assert len(distinct) <= encoded <= 2 * len(distinct)  # at worst both workers met a caption first
    got = vectors(results[0]["output"])
    assert sorted(got) == sorted(captions)
    entries = [p for p in (tmp_path / "emb" / CACHE_DIR).rglob("*") if p.is_file()]
    assert len(entries) == len(distinct) and all(p.suffix == ".emb" for p in entries)  # no temporaries
    dim = next(iter(got.values())).shape[1]
    for entry in entries:
        unpack_entry(entry.read_bytes(), bytes.fromhex(entry.stem), dim)  # each one whole
    single = embed("--input", str(tmp_path / "filtered"), "--output", str(tmp_path / "emb-1"), "--encoder", t5_dir,
                   "--max-length", "16", "--device", "cpu")
    ref = vectors(single["output"])
    tol = 2**-10 * max(1.0, max(float(np.abs(v).max()) for v in ref.values()))
    assert all(np.abs(got[k].astype(np.float32) - ref[k]).max() <= tol for k in captions)
