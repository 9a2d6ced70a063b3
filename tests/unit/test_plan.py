"""pipeline/plan.py (``imagen-pipeline plan``) and imagen/flops.py: the planner's numbers are
checked against arithmetic written out here and against the checked-in calibration table."""

from __future__ import annotations

import json
import math

import pytest
import torch

from imagen.config import preset
from imagen.flops import count_flops, unet_forward_flops, unet_params
from imagen.unet import UNet
from pipeline import cli, plan

N = 400_000_000  # LAION-400M
TABLE = json.loads(plan.TABLE.read_text())
KEEP = TABLE["filter"]["download_success_rate"] * TABLE["filter"]["keep_rate"]


def run_plan(tmp_path, *argv) -> dict:
    """``imagen-pipeline plan ARGV`` in-process, without the user's own calibration file."""
    args = [str(a) for a in argv]
    if "--calibration" not in args:
        args += ["--calibration", str(tmp_path / "no-user-calibration.json")]
    return cli.VERBS["plan"](cli.build_parser().parse_args(["plan", *args]))


@pytest.fixture(scope="module")
def tiny_urls(tmp_path_factory) -> str:
    from pipeline.dev.tinydata import make_tiny_dataset

    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny")), n=120, seed=0)["urls"]


@pytest.fixture(scope="module")
def tiny_mean_tokens(tiny_urls) -> float:
    """Mean token count of the tiny dataset's captions with the tiny T5's tokenizer (built as
    pipeline.dev.tinymodels.build_tiny_t5 builds it), </s> included."""
    import pyarrow.parquet as pq

    from imagen.tiny_tokenizer import build_tiny_tokenizer

    captions = [c for c in pq.read_table(tiny_urls, columns=["caption"]).column(0).to_pylist() if c and c.strip()]
    ids = build_tiny_tokenizer()(captions, truncation=True, max_length=128)["input_ids"]
    return sum(len(x) for x in ids) / len(ids)


def test_embeddings_storage_is_tokens_times_width_times_two_bytes(tmp_path, tiny_mean_tokens):
    m = tiny_mean_tokens
    assert 5 < m < 20  # "a red circle on a white background" + </s>: whole-word pieces
    r = run_plan(tmp_path, "--samples", N, "--encoder", "t5-xxl", "--mean-tokens", m)
    kept = round(N * KEEP)
    assert r["samples"]["filtered"] == kept == 306_000_000
    # fp16 (2 bytes), T5-XXL width 4096, no padding, plus 80 bytes of key/offset/sha columns per row
    expected = kept * m * 4096 * 2 + kept * 80
    assert r["storage_bytes"]["embeddings"] == pytest.approx(expected, rel=1e-12)
    assert r["inputs"]["encoder_dim"] == 4096


def test_url_list_is_counted_and_its_captions_measured(tmp_path, tiny_urls, tiny_mean_tokens):
    r = run_plan(tmp_path, "--url-list", tiny_urls, "--encoder", "tiny", "--gpu", "cpu", "--presets", "tiny",
                 "--nodes", 1, "--gpus-per-node", 1)
    assert r["samples"]["url_rows"] == 131  # 120 good rows + 11 that fail or get filtered
    assert r["inputs"]["mean_tokens"] == pytest.approx(tiny_mean_tokens)
    assert "measured with the tiny tokenizer" in r["inputs"]["mean_tokens_source"]
    assert r["inputs"]["download_image_size"] == 128  # the tiny cascade's largest stage
    assert r["embed"]["throughput_source"].startswith("measured")


def test_raw_storage_at_256px_is_within_2x_of_img2dataset_laion400m(tmp_path):
    # img2dataset's dataset_examples/laion400m.md: 10 TB for LAION-400M at 256 px (jpg)
    jpg = run_plan(tmp_path, "--samples", N, "--stages", "base64", "sr256", "--encode-format", "jpg")
    assert jpg["inputs"]["download_image_size"] == 256  # from the stages' specs
    assert 5e12 <= jpg["storage_bytes"]["raw"] <= 20e12
    png = run_plan(tmp_path, "--samples", N, "--stages", "base64", "sr256")  # the download's default
    assert png["storage_bytes"]["raw"] / jpg["storage_bytes"]["raw"] == pytest.approx(
        TABLE["raw"]["format_factor"]["png"])
    assert png["storage_bytes"]["filtered"] == pytest.approx(png["storage_bytes"]["raw"] * TABLE["filter"]["keep_rate"])


def test_paper_base64_gpu_hours_on_h100_follow_from_the_table(tmp_path):
    r = run_plan(tmp_path, "--samples", N, "--encoder", "t5-xxl", "--gpu", "h100", "--nodes", 8)
    base = r["stages"]["base64"]
    cfg = preset("base64")
    seen = cfg.train.max_steps * cfg.train.global_batch
    assert base["samples_seen"] == seen == 5_120_000_000  # NeMo's 5.12B samples for the 64 px base
    ips = TABLE["train"]["h100"]["base64:base64"]["images_per_s"]
    assert base["images_per_s_per_gpu"] == ips
    assert base["gpu_hours"] == pytest.approx(seen / ips / 3600, rel=1e-12)
    assert base["wall_hours"] == pytest.approx(base["gpu_hours"] / 64 / 0.9, rel=1e-12)
    total = r["embed"]["gpu_hours"] + sum(s["gpu_hours"] for s in r["stages"].values())
    assert r["total"]["gpu_hours"] == pytest.approx(total)
    assert r["total"]["cost"] is None
    priced = run_plan(tmp_path, "--samples", N, "--gpu", "h100", "--nodes", 8, "--price-per-gpu-hour", 2.5)
    assert priced["total"]["cost"] == pytest.approx(priced["total"]["wall_hours"] * 64 * 2.5)


def test_table_rows_for_published_gpus_follow_from_the_flop_count():
    """The derived rows are peak x MFU / (3 x forward FLOPs): recomputing gives the same number."""
    for gpu in ("h100", "a100-80gb"):
        for stage in ("base64", "sr256", "sr1024"):
            row = TABLE["train"][gpu][f"{stage}:{stage}"]
            again = plan.derived_train_entry(TABLE, gpu, stage, stage)
            assert row["images_per_s"] == pytest.approx(again["images_per_s"], rel=1e-4)
            assert "assumed" in row["source"]
    for gpu, dev in TABLE["devices"].items():
        assert dev["source"], gpu


def test_shards_and_mapped_embed_tasks(tmp_path):
    r = run_plan(tmp_path, "--samples", N)
    sh = r["shards"]
    filtered = math.ceil(round(N * KEEP) / 1000)
    assert (sh["raw"], sh["filtered"]) == (40_000, filtered)
    # embed_batches (dags/imagen_common.py): >= 16 shards per task, never more than 1024 tasks
    assert sh["shards_per_embed_task"] == max(16, math.ceil(filtered / 1024))
    assert sh["embed_tasks"] == math.ceil(filtered / sh["shards_per_embed_task"]) <= 1024
    small = run_plan(tmp_path, "--samples", 100_000)["shards"]
    assert (small["filtered"], small["shards_per_embed_task"], small["embed_tasks"]) == (77, 16, 5)


def test_checkpoint_storage_is_params_times_bytes_per_kept_checkpoint(tmp_path):
    r = run_plan(tmp_path, "--samples", N)
    for stage, p in r["stages"].items():
        params = unet_params(preset(stage).unet)
        assert p["params"] == params
        # 3 kept step-N dirs of fp32 weights + EMA + AdamW moments, and final/ (weights + EMA)
        assert p["checkpoint_bytes"] == params * (16 * 3 + 8)
    assert r["stages"]["base64"]["params"] == pytest.approx(2.07e9, rel=0.01)


def test_unknown_gpu_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown --gpu 'tpu-v9'.*a100-40gb, a100-80gb, cpu, h100"):
        run_plan(tmp_path, "--samples", N, "--gpu", "tpu-v9")


def test_missing_calibration_entry_says_how_to_add_one(tmp_path):
    with pytest.raises(ValueError, match=r"no calibration entry for training base64 with preset tiny on l4"
                                         r".*plan --calibrate --gpu l4"):
        run_plan(tmp_path, "--samples", N, "--gpu", "l4", "--presets", "tiny")
    with pytest.raises(ValueError, match="unknown --encoder"):
        run_plan(tmp_path, "--samples", N, "--encoder", "bert")
    with pytest.raises(ValueError, match="--url-list PATH or --samples N"):
        run_plan(tmp_path, "--gpu", "h100")


def test_user_calibration_entries_win(tmp_path):
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"train": {"h100": {"base64:base64": {"images_per_s": 1000.0, "source": "mine"}}}}))
    r = run_plan(tmp_path, "--samples", N, "--stages", "base64", "--calibration", user)
    assert r["stages"]["base64"]["gpu_hours"] == pytest.approx(5_120_000_000 / 1000.0 / 3600)
    assert r["stages"]["base64"]["throughput_source"] == "mine"


def test_calibrate_measures_and_writes_the_user_file(tmp_path):
    user = tmp_path / "cal.json"
    r = run_plan(tmp_path, "--calibrate", "--gpu", "cpu", "--stages", "sr256", "--presets", "tiny",
                 "--encoder", "tiny", "--calibration", user, "--calibrate-seconds", 0.2,
                 "--calibrate-batch", 2)
    mine = json.loads(user.read_text())
    entry = mine["train"]["cpu"]["sr256:tiny"]
    assert entry["images_per_s"] > 0 and entry["source"].startswith("measured by plan --calibrate")
    assert mine["embed"]["cpu"]["tiny"]["tokens_per_s"] > 0
    assert r["measured"]["train"]["cpu"]["sr256:tiny"] == entry
    planned = run_plan(tmp_path, "--samples", 1000, "--gpu", "cpu", "--stages", "sr256", "--presets", "tiny",
                       "--encoder", "tiny", "--calibration", user, "--gpus-per-node", 1)
    assert planned["stages"]["sr256"]["images_per_s_per_gpu"] == entry["images_per_s"]


def test_token_lengths_fall_back_to_a_stated_heuristic(monkeypatch):
    monkeypatch.setattr(plan, "_tokenizer", lambda encoder, key: None)
    lengths, how = plan.token_lengths(["a red circle", "one two three four five six seven eight nine ten"],
                                      "t5-xxl", "t5-xxl")
    assert lengths == [5, 14]  # ceil(1.3 x words) + </s>
    assert "1.3 tokens per word" in how


def test_table_output_shows_every_phase(tmp_path, capsys):
    r = run_plan(tmp_path, "--samples", N, "--gpu", "h100", "--nodes", 8)
    out = capsys.readouterr().out
    assert out.strip() == plan.format_table(r)
    for word in ("raw", "filtered", "embeddings", "checkpoints", "base64", "sr256", "sr1024", "embed tasks"):
        assert word in out
    json.dumps(r)  # the CLI prints it as one JSON line


# ---------------------------------------------------------------------------------------
# imagen/flops.py


def test_flops_of_one_conv_and_one_linear_match_a_hand_count():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    # 2 FLOPs per multiply-add: out channels x output pixels x (in channels x 3 x 3)
    assert count_flops(conv, torch.empty(1, 3, 32, 32)) == 2 * 8 * 32 * 32 * 3 * 3 * 3
    assert count_flops(torch.nn.Linear(16, 32), torch.empty(4, 16)) == 2 * 4 * 16 * 32


def test_flops_of_a_convolutional_unet_grow_4x_from_32_to_64_px():
    from imagen.config import UNetConfig

    cfg = UNetConfig(image_size=32, channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1),
                     self_attn_levels=(False, False), cross_attn_levels=(False, False), mid_self_attn=False,
                     text_embed_dim=32, num_groups=8)
    ratio = unet_forward_flops(cfg, 64, text_tokens=8) / unet_forward_flops(cfg, 32, text_tokens=8)
    assert 3.95 < ratio <= 4.0  # only the text pooling and time MLP do not scale with pixels


def test_meta_counts_match_a_real_model():
    import dataclasses

    # no attention in the levels: a real CPU forward runs SDPA as one fused kernel that
    # FlopCounterMode does not count, while on the meta device it decomposes into counted
    # matmuls; what is left of it (the text pooling's one query) is ~1e-6 of the total
    cfg = dataclasses.replace(preset("tiny", "sr256").unet, self_attn_levels=(False,) * 3,
                              cross_attn_levels=(False,) * 3, mid_self_attn=False)
    model = UNet(cfg)
    assert unet_params(cfg) == sum(p.numel() for p in model.parameters())
    size, tokens = 64, 8
    real = count_flops(model, torch.randn(2, 3, size, size), torch.rand(2), torch.randn(2, tokens, 32),
                       torch.ones(2, tokens, dtype=torch.bool), lowres=torch.randn(2, 3, size // 4, size // 4),
                       lowres_t=torch.rand(2))
    assert unet_forward_flops(cfg, size, tokens, batch=2) == pytest.approx(real / 2, rel=1e-5)
    with_attention = preset("tiny", "sr256").unet
    assert unet_forward_flops(with_attention, size, tokens) > unet_forward_flops(cfg, size, tokens)
