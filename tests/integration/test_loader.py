"""Training loader (pipeline.data.loader) on the real filter output and under torchrun.

Run as a module under torchrun (``-m tests.integration.test_loader``, from the repository root)
it is the per-rank worker of ``test_ddp_ranks_see_disjoint_samples``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.embeddings import read_embeddings
from pipeline.data.loader import TrainDataConfig
from tests.unit.test_loader import dataset, keys_of, t5_dir, take  # noqa: F401 (dataset, t5_dir: fixtures)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = str(Path(__file__).resolve().parents[2])


def test_real_filtered_shards_embeddings_and_manifest(filtered_shards, tiny_embeddings):
    """The filter step's real output (conftest: tiny data -> img2dataset -> filter)."""
    manifest = json.loads(Path(filtered_shards, "manifest.json").read_text())
    counts = manifest["shards"]  # {"000000.tar": kept, ..., "val-000000.tar": kept, ...}
    assert sum(counts.values()) == manifest["kept"] > 0
    for name, kept in counts.items():  # the validation shards are embedded too
        vectors, meta = read_embeddings(os.path.join(tiny_embeddings, name[:-4] + ".parquet"))
        assert len(vectors) == kept == meta["tar_samples"]  # every kept sample has a caption
    total = manifest["stages"]["sr256"]["samples"]  # training samples of at least 64 px
    cfg = TrainDataConfig(data=filtered_shards, embeddings=tiny_embeddings, image_size=64,
                          batch_size=total // 4, random_flip=False)  # fmt: skip
    batches = take(cfg, 4)
    flat = keys_of(batches)
    assert len(flat) == len(set(flat)) == 4 * (total // 4)  # within one epoch: no repeats
    held_out = {k for name in counts if name.startswith("val-")
                for k in read_embeddings(os.path.join(tiny_embeddings, name[:-4] + ".parquet"))[0]}
    assert not set(flat) & held_out
    # A 64x64 PNG source needs no resize or crop at 64 px: the loader's pixels are its pixels.
    stored = {}
    for name in counts:
        with tarfile.open(os.path.join(filtered_shards, name)) as tar:
            for m in tar:
                if m.name.endswith(".png"):
                    stored[m.name.rsplit(".", 1)[0]] = Image.open(io.BytesIO(tar.extractfile(m).read()))
    exact = [(b, i) for b, batch in enumerate(batches) for i, k in enumerate(batch["keys"])
             if stored.get(k) is not None and stored[k].size == (64, 64) and stored[k].mode == "RGB"]
    assert exact, "the tiny dataset has 64x64 RGB PNG sources"
    for b, i in exact:
        pixels = np.asarray(stored[batches[b]["keys"][i]].convert("RGB"))
        assert batches[b]["image"].dtype == torch.uint8  # batches carry the stored bytes
        np.testing.assert_array_equal(batches[b]["image"][i].permute(1, 2, 0).numpy(), pixels)


def test_ddp_ranks_see_disjoint_samples(tmp_path, dataset):  # noqa: F811 (the fixture)
    """Two torchrun ranks (gloo, CPU), 2 DataLoader workers each, all-gather their keys."""
    data, emb, keys, _ = dataset
    out = tmp_path / "keys.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.integration.test_loader", data, emb, str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2 and all(len(k) == 10 for k in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(keys)


def _ddp_worker(data: str, emb: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainDataConfig(data=data, embeddings=emb, image_size=16, batch_size=5, num_workers=2)
    # 4 readers (2 ranks x 2 workers), one 5-sample shard each: a batch from each worker
    # is one epoch of this rank's data.
    mine = keys_of(take(cfg, 2, rank, world))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    _ddp_worker(*sys.argv[1:4])
