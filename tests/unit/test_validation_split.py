"""The held-out validation split (issue 23, item 1), chosen once by the filter step.

- :mod:`pipeline.data.split`: a pure function of each sample's URL and two settings; a rerun
  and a longer URL list move no training sample into validation (only validation samples out
  of it, under the cap).
- Through the real filter and embed steps: ``val-NNNNNN.tar`` beside the training shards, the
  manifest's counts, and an audit of both loaders at every tiny stage's sizes: no training batch
  holds a validation key on any world size; the validation loader yields each eligible
  validation key exactly once, in one order whatever the world size and worker count.
- The settings as operators set them: the DAG's Params through its filter task, and the CLI's
  flag defaults (the flags in a subprocess: tests/integration/test_validation_split_cli.py).

    .venv/bin/pytest tests/unit/test_validation_split.py -q
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import re
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imagen.config import STAGES, tiny
from pipeline.data import split
from pipeline.data.filters import FilterConfig, filter_shards, format_reject_table, stage_config
from pipeline.data.loader import (
    TrainDataConfig,
    make_loader,
    make_validation_loader,
    validation_shards_exist,
)
from tests.tinychain import TINY_PRESETS
from tests.unit.conftest import import_dag_common
from tests.unit.test_shard_integrity import write_tar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Short sides that reach none, one, two or all three tiny stages (32, 64 and 128 px).
SIDES = [(36, 40), (48, 60), (70, 70), (100, 130), (140, 150), (40, 33)]


def url(row: int) -> str:
    return f"http://127.0.0.1:9/img/{row}.png"


def noise_png(row: int) -> bytes:
    """Random pixels (no two rows are near duplicates), of the row's size."""
    w, h = SIDES[row % len(SIDES)]
    pixels = np.random.default_rng(row).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def download(root: Path, rows: int, per_shard: int = 10) -> dict[str, int]:
    """What img2dataset makes of the first ``rows`` rows of one URL list: keys are positions
    (shard, then row in shard), so a longer list keeps every earlier row's key. Returns
    {key: the image's short side}."""
    root.mkdir(parents=True)
    sides = {}
    for shard in range(math.ceil(rows / per_shard)):
        listed = range(shard * per_shard, min(rows, (shard + 1) * per_shard))
        keys = [f"{shard:05d}{row % per_shard:04d}" for row in listed]
        entries = []
        for key, row in zip(keys, listed, strict=True):
            caption = f"caption of row {row}"
            meta = {"key": key, "url": url(row), "caption": caption}
            entries += [(f"{key}.png", noise_png(row)), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps(meta).encode())]
            sides[key] = min(SIDES[row % len(SIDES)])
        write_tar(root / f"{shard:05d}.tar", entries)
        table = {"url": [url(r) for r in listed], "caption": [f"caption of row {r}" for r in listed], "key": keys,
                 "status": ["success"] * len(keys), "error_message": [None] * len(keys)}
        pq.write_table(pa.table(table, schema=pa.schema([(k, pa.string()) for k in table])),
                       root / f"{shard:05d}.parquet")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(keys)}))
    return sides


def split_by_url(folder: Path) -> dict[str, str]:
    """{url: "train" | "val"} of every sample in the filtered shards, read from the shards."""
    out = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out[json.loads(tar.extractfile(m).read())["url"]] = split.split_of(tar_path.name)
    return out


def keys_in(folder: Path, pattern: str) -> list[str]:
    """Keys of the shards whose name matches ``pattern``, in shard order, then member order."""
    keys = []
    for path in sorted(p for p in folder.iterdir() if re.fullmatch(pattern, p.name)):
        with tarfile.open(path) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]
    return keys


# --- the rule ---------------------------------------------------------------------------------

def test_position_is_sha256_of_the_url_not_a_salted_hash():
    # Golden values: the same on every machine, Python version and PYTHONHASHSEED.
    assert split.position(url(0)) == 0xB6B9C24136AA67DA
    assert split.position("http://127.0.0.1:9/ü.png") == split.position("http://127.0.0.1:9/\u00fc.png")
    assert split.shard_name(split.VAL, 3) == "val-000003.tar" and split.shard_name(split.TRAIN, 12) == "000012.tar"
    assert re.fullmatch(split.TRAIN_SHARD, "000001.tar") and not re.fullmatch(split.TRAIN_SHARD, "val-000001.tar")
    assert re.fullmatch(split.VAL_SHARD, "val-000001.tar") and not re.fullmatch(split.VAL_SHARD, "000001.tar")
    assert not re.fullmatch(split.TRAIN_SHARD, "00001.tar")  # an img2dataset raw shard: never a filtered one


def test_split_is_a_pure_function_of_the_url_and_settings():
    urls = [url(i) for i in range(4000)]
    held = split.assign(urls, 0.1, 10_000)
    assert 330 < sum(held) < 470  # about the fraction
    shuffled = urls[:]
    random.Random(0).shuffle(shuffled)
    again = dict(zip(shuffled, split.assign(shuffled, 0.1, 10_000), strict=True))
    assert again == dict(zip(urls, held, strict=True))  # order of the list: irrelevant
    assert [u for u, h in zip(urls, held, strict=True) if h] == [u for u in urls if split.position(u) / 2**64 < 0.1]
    assert not any(split.assign(urls, 0.0, 10_000)) and not any(split.assign(urls, 0.1, 0))
    capped = split.assign(urls, 0.1, 50)
    smallest = sorted((split.position(u), u) for u, h in zip(urls, held, strict=True) if h)[:50]
    assert {u for u, h in zip(urls, capped, strict=True) if h} == {u for _, u in smallest}
    for fraction, cap in ((1.0, 5), (-0.1, 5), (0.1, -1)):
        with pytest.raises(ValueError, match="val_fraction|val_max"):
            split.assign(urls, fraction, cap)


def test_appending_rows_only_moves_validation_samples_to_train_under_the_cap():
    urls = [url(i) for i in range(3000)]
    for cap in (10_000, 40):
        before = dict(zip(urls[:1000], split.assign(urls[:1000], 0.05, cap), strict=True))
        after = dict(zip(urls, split.assign(urls, 0.05, cap), strict=True))
        assert not [u for u in before if not before[u] and after[u]]  # never train -> val
        moved = [u for u in before if before[u] and not after[u]]
        assert (len(moved) > 0) == (cap == 40)  # val -> train only when the cap binds
        assert sum(after.values()) == min(cap, sum(split.assign(urls, 0.05, 10_000)))


# --- through the filter step ------------------------------------------------------------------

def filtered(raw: Path, out: Path, **settings) -> dict:
    config = FilterConfig(min_side=32, **{"val_fraction": 0.3, **settings})
    return filter_shards(str(raw), str(out), config, samples_per_shard=4)


def test_filter_split_is_stable_across_a_rerun_and_a_longer_url_list(tmp_path):
    download(tmp_path / "raw", 16)
    download(tmp_path / "longer", 28)  # the same list with 12 rows appended, downloaded again
    first = filtered(tmp_path / "raw", tmp_path / "a")
    assert (first["split"]["val"], first["split"]["keyed_without_url"]) == (5, 0)
    filtered(tmp_path / "raw", tmp_path / "b")
    assert split_by_url(tmp_path / "a") == split_by_url(tmp_path / "b")
    filtered(tmp_path / "longer", tmp_path / "c")
    old, new = split_by_url(tmp_path / "a"), split_by_url(tmp_path / "c")
    assert {u: new[u] for u in old} == old and sum(s == "val" for s in new.values()) == 6
    # Under a cap of 3: earlier validation samples may leave for train, no training sample joins.
    filtered(tmp_path / "raw", tmp_path / "d", val_max=3)
    manifest = filtered(tmp_path / "longer", tmp_path / "e", val_max=3)
    capped_old, capped_new = split_by_url(tmp_path / "d"), split_by_url(tmp_path / "e")
    assert manifest["split"]["val"] == 3 == sum(s == "val" for s in capped_new.values())
    assert not [u for u, s in capped_old.items() if s == "train" and capped_new[u] == "val"]
    assert {u for u, s in capped_new.items() if s == "val"} <= {u for u, s in new.items() if s == "val"}


def test_val_fraction_zero_writes_no_validation_shards(tmp_path):
    download(tmp_path / "raw", 12)
    manifest = filtered(tmp_path / "raw", tmp_path / "out", val_fraction=0.0)
    assert not list((tmp_path / "out").glob("val-*")) and manifest["split"]["val"] == 0
    assert manifest["split"]["train"] == manifest["kept"] == 12
    assert not validation_shards_exist(str(tmp_path / "out"))
    cfg = TrainDataConfig(data=str(tmp_path / "out"), embeddings=str(tmp_path / "out"), image_size=32)
    with pytest.raises(ValueError, match=r"no validation shards \(val-NNNNNN.tar\).*rerun the filter step"):
        make_validation_loader(cfg)


# --- the audit: filter + embed + both loaders -------------------------------------------------

@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """48 URL-list rows through the real filter (30% held out, 6 per shard) and embed steps."""
    from pipeline.data.embed import embed_shards
    from pipeline.dev.tinymodels import build_tiny_t5

    root = tmp_path_factory.mktemp("chain")
    sides = download(root / "raw", 48)
    config = stage_config(TINY_PRESETS, val_fraction=0.3)
    manifest = filter_shards(str(root / "raw"), str(root / "filtered"), config, samples_per_shard=6)
    t5 = build_tiny_t5(str(root / "t5"))
    emb = embed_shards(str(root / "filtered"), str(root / "emb"), t5, max_length=16)["output"]
    train = keys_in(root / "filtered", split.TRAIN_SHARD)
    val = keys_in(root / "filtered", split.VAL_SHARD)
    return {"data": str(root / "filtered"), "emb": emb, "manifest": manifest, "sides": sides,
            "train": train, "val": val}


def stage_config_of(chain, stage: str, **kw) -> TrainDataConfig:
    spec = tiny(stage).spec
    return TrainDataConfig(data=chain["data"], embeddings=chain["emb"], image_size=spec.image_size,
                           crop_size=spec.crop_size, lowres_crop_size=spec.lowres_crop_size, max_tokens=16,
                           pad_text_to=16, **{"batch_size": 4, "random_crop": spec.random_crop, **kw})


def eligible(chain, keys: list[str], stage: str) -> list[str]:
    return [k for k in keys if chain["sides"][k] >= tiny(stage).spec.image_size]


def test_filter_writes_both_splits_and_counts_them_per_stage(chain):
    m = chain["manifest"]
    assert m["format"] == "imagen-pipeline/filtered-shards/v7"
    assert sorted(chain["train"] + chain["val"]) == sorted(chain["sides"])  # nothing rejected, nothing twice
    assert m["split"] == {"val_fraction": 0.3, "val_max": 10_000, "by": "url", "train": len(chain["train"]),
                          "val": len(chain["val"]), "keyed_without_url": 0}
    assert m["split"]["train"] + m["split"]["val"] == m["kept"] == sum(m["shards"].values()) == 48
    assert m["kept"] + m["rejected"] == m["input_rows"]
    assert sum(n for name, n in m["shards"].items() if name.startswith("val-")) == len(chain["val"]) > 3
    assert (m["split"]["train"], m["split"]["val"]) == (37, 11)
    # (train, val) samples per stage: 32 px takes all, 64 px the sides >= 64, 128 px only 140 px ones
    want = {"base64": (37, 11), "sr256": (16, 8), "sr1024": (5, 3)}
    for stage in STAGES:
        counts = m["stages"][stage]
        assert (counts["samples"], counts["val_samples"]) == want[stage]
        assert counts["samples"] == len(eligible(chain, chain["train"], stage))
        assert counts["val_samples"] == len(eligible(chain, chain["val"], stage))
        assert counts["excluded"] == {f"too_small_for_{stage}": 37 - want[stage][0]}
        assert counts["val_excluded"] == {f"too_small_for_{stage}": 11 - want[stage][1]}
    table = format_reject_table(m).splitlines()
    assert [line.split()[-1] for line in table if line.startswith(("training split", "validation split"))] == [
        "37", "10000)"]
    assert "sr1024     validation samples                      3" in table


@pytest.mark.parametrize("stage", STAGES)
def test_no_training_batch_holds_a_validation_key(chain, stage):
    want = eligible(chain, chain["train"], stage)
    cfg = stage_config_of(chain, stage)
    for world in (1, 2, 3):
        seen: set[str] = set()
        for rank in range(world):
            # More than one epoch of every reader: each rank reads at most all eligible samples.
            batches = list(islice(iter(make_loader(cfg, rank, world)), math.ceil(len(want) / cfg.batch_size) + 1))
            keys = {k for b in batches for k in b["keys"]}
            assert not keys & set(chain["val"]), (stage, world, rank)
            seen |= keys
        assert seen == set(want), (stage, world)


def validation_order(cfg: TrainDataConfig, world: int, **kw) -> tuple[list[str], list[dict]]:
    """The keys of every rank's batches merged back into one order (sample i is rank i % world's)."""
    per_rank, batches = [], []
    for rank in range(world):
        rank_batches = list(make_validation_loader(cfg, rank, world, **kw))
        per_rank.append([k for b in rank_batches for k in b["keys"]])
        batches += rank_batches
    merged = [per_rank[i % world][i // world] for i in range(sum(map(len, per_rank)))]
    assert sorted(merged) == sorted(k for keys in per_rank for k in keys)
    return merged, batches


@pytest.mark.parametrize("stage", STAGES)
def test_validation_loader_yields_each_validation_key_once_in_one_order(chain, stage):
    want = eligible(chain, chain["val"], stage)
    spec = tiny(stage).spec
    reference, batches = validation_order(stage_config_of(chain, stage), 1)
    assert sorted(reference) == sorted(want) and len(reference) == len(set(reference))
    assert len(reference) == chain["manifest"]["stages"][stage]["val_samples"]
    assert reference == [k for k in chain["val"] if k in set(want)]  # shard order, then row order
    b = batches[0]
    assert b["image"].shape[1:] == (3, spec.crop_size, spec.crop_size)
    assert ("lowres" in b) == (spec.lowres_size is not None)
    assert b["captions"] == [f"caption of row {int(k[:5]) * 10 + int(k[5:])}" for k in b["keys"]]
    for world, workers in ((2, 0), (3, 0), (1, 1), (3, 1)):
        cfg = stage_config_of(chain, stage, num_workers=workers, seed=world)
        assert validation_order(cfg, world)[0] == reference, (world, workers)
    assert validation_order(stage_config_of(chain, stage), 2, limit=3)[0] == reference[:3]


def test_validation_is_centre_cropped_not_flipped_and_audited(chain, tmp_path):
    cfg = stage_config_of(chain, "sr256", random_flip=True, random_crop=True, seed=7, audit_dir=str(tmp_path))
    a = next(iter(make_validation_loader(cfg)))
    b = next(iter(make_validation_loader(dataclasses.replace(cfg, random_flip=False, random_crop=False, seed=0,
                                                             audit_dir=None))))
    assert a["keys"] == b["keys"] and bool((a["image"] == b["image"]).all())
    lines = [json.loads(x) for f in tmp_path.iterdir() for x in f.read_text().splitlines()]
    assert [x["key"] for x in lines] == a["keys"] and {x["split"] for x in lines} == {"val"}
    assert all(min(x["stored"]) >= 64 and x["crop"] == [64, 64] for x in lines)


def test_a_stage_no_validation_sample_reaches_yields_nothing(chain):
    cfg = dataclasses.replace(stage_config_of(chain, "base64"), image_size=512, crop_size=512)
    loader = make_validation_loader(cfg)
    assert list(loader) == []
    assert loader.data_counts == {"val_samples": 0, "val_excluded_too_small": len(chain["val"])}


# --- the settings as operators set them ----------------------------------------------------------

def test_cli_flags_and_dag_params_default_to_filterconfig():
    from tests.unit.test_defaults import verb_actions

    common = import_dag_common()
    actions, params = verb_actions("filter"), common.data_params()
    for name in ("val_fraction", "val_max"):
        assert actions[name].default == params[name].value == getattr(FilterConfig(), name), name
    assert FilterConfig().val_fraction == 0.05 and FilterConfig().val_max == 10_000


def test_dag_params_reach_the_filter_task(tmp_path, monkeypatch):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    from pipeline.lock import Holder
    common = import_dag_common()
    for bad in ({"val_fraction": 1.0}, {"val_fraction": -0.1}, {"val_max": -1}):
        with pytest.raises(ParamValidationError):
            ParamsDict(common.data_params()).update(bad)
    form = ParamsDict(common.data_params())
    form.update({"root": str(tmp_path), "val_fraction": 0.5, "val_max": 2, "filtered_shard_size": 3,
                 "stages": ["base64"]})
    download(tmp_path / "raw", 12)
    monkeypatch.setattr(common, "task_holder", lambda step, shared=False: Holder(step))  # no Airflow context here
    out = common.filter_task().function(str(tmp_path / "raw"), params=form.validate())
    manifest = json.loads(Path(out, "manifest.json").read_text())
    assert manifest["split"]["val"] == 2 and manifest["config"]["val_fraction"] == 0.5
    assert sorted(p.name for p in Path(out).glob("val-*.tar")) == ["val-000000.tar"]
