"""The validation loss of one checkpoint is the same figure on any world size: scored by one
process (``score_checkpoint``) and by two and three gloo processes under torchrun, each on its
share of the held-out split, the sums all-reduced (pipeline/train/validation.py).

Run as a module, this file is the torchrun worker: ``python -m tests.integration.test_validation_world
OUT WEIGHTS DATA EMBEDDINGS``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}


@pytest.fixture(scope="module")
def split_data(raw_shards, tiny_encoder_dir, tmp_path_factory) -> tuple[str, str]:
    """The shared raw shards filtered with a third held out (about 40 validation samples), embedded."""
    from pipeline.data.embed import embed_shards
    from pipeline.data.filters import filter_shards, stage_config
    from tests.tinychain import TINY_PRESETS

    out = tmp_path_factory.mktemp("val-world")
    filtered = str(out / "filtered")
    filter_shards(raw_shards, filtered, stage_config(TINY_PRESETS, val_fraction=0.3), samples_per_shard=50)
    return filtered, embed_shards(filtered, str(out / "embeddings"), tiny_encoder_dir)["output"]


def weights(stage: str, embeddings: str, directory: str) -> str:
    """A tiny stage with every weight perturbed (a fresh U-Net predicts zeros), saved as a
    checkpoint whose config fits the embeddings."""
    from imagen.checkpoint import save_weights
    from imagen.config import tiny
    from imagen.unet import UNet
    from pipeline.data.embed import read_metadata

    meta = read_metadata(embeddings)
    cfg = tiny(stage)
    cfg.unet.text_embed_dim, cfg.max_text_len = int(meta["dim"]), int(meta["max_length"])
    torch.manual_seed(0)
    net = UNet(cfg.unet)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_weights(directory, net.state_dict(), cfg, ema=net.state_dict(), metadata={"encoder_id": meta["encoder_id"]})
    return directory


@pytest.mark.parametrize("stage", ["sr256"])  # the base stage's path is the SR one without a low-res input
def test_the_same_checkpoint_scores_the_same_on_one_two_and_three_processes(stage, split_data, tmp_path):
    from pipeline.train.validation import score_checkpoint

    data, embeddings = split_data
    ckpt = weights(stage, embeddings, str(tmp_path / "ckpt"))
    one = score_checkpoint(ckpt, data, embeddings, batch_size=4)
    assert one["val/samples"] >= 8, one  # enough held-out samples for the split across ranks to matter
    for world in (2, 3):
        out = tmp_path / f"world{world}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "tests.integration.test_validation_world", str(out), ckpt, data, embeddings]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **LOOPBACK})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        many = json.loads(out.read_text())
        assert many["val/samples"] == one["val/samples"]
        for key, value in one.items():
            assert many[key] == pytest.approx(value, rel=1e-5), (world, key)


def _worker(out: str, ckpt: str, data: str, embeddings: str) -> None:
    import torch.distributed as dist

    from imagen.checkpoint import load_model
    from pipeline.data.loader import make_validation_loader
    from pipeline.train.validation import validation_data, validation_loss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    net, cfg, meta = load_model(ckpt)
    # a different batch size from the one-process run too: the figure depends on neither
    batches = make_validation_loader(validation_data(cfg, data, embeddings, 3, encoder_id=meta["encoder_id"]),
                                     rank=rank, world_size=world)
    result = validation_loss(net, cfg, batches, torch.device("cpu"), world)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:5])
