"""The pure parts of pipeline/release/evaluate.py: progress lines, the deployment's evaluator
weights (read from the environment, as an operator sets them), FID/CLIP skipped with their
reasons, the validation split's reasons, and ``evaluate_run`` / ``evaluate_runs`` (one result
per stage, reused from ``eval.json``, the stages side by side)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from imagen.config import tiny
from pipeline.release import evaluate as ev


def test_progress_says_what_and_how_many_and_no_more_often_than_asked(capsys):
    now = [0.0]
    say = ev.Progress("base64", "prompt set, guided", 24, every=15.0, clock=lambda: now[0])
    say.begin()
    for step in range(1, 33):
        now[0] += 1.0  # one second per sampling step
        say.step("base64", step, 32)
    assert say.end() == pytest.approx(32.0)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert captured.err == ""  # progress is information: stdout, never the error stream
    assert lines[0] == "[evaluate base64] prompt set, guided: 24 images"
    # 32 steps of 1 s with a line at most every 15 s: at 15 s and 30 s
    assert lines[1:3] == ["[evaluate base64] prompt set, guided: sampling base64: step 15/32, run 1/1, 24 images, 15 s",
                          "[evaluate base64] prompt set, guided: sampling base64: step 30/32, run 1/1, 24 images, 30 s"]
    assert lines[3] == "[evaluate base64] prompt set, guided: done in 32.0 s" and len(lines) == 4


def test_progress_counts_the_sampler_runs_of_a_sweep(capsys):
    now = [0.0]
    say = ev.Progress("sr256", "super-resolution", 48, every=20.0, clock=lambda: now[0], runs=3)
    say.begin()
    for _ in range(3):  # three settings of 10 steps of 1 s: a line every 20 s of work, never a gap
        for step in range(1, 11):
            now[0] += 1.0
            say.step("sr256", step, 10)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[evaluate sr256] super-resolution: 48 images, 3 sampler runs"
    assert lines[1:] == ["[evaluate sr256] super-resolution: sampling sr256: step 10/10, run 2/3, 48 images, 20 s"]


def test_one_metric_name_per_figure_in_every_stages_run_and_settings_as_tags():
    base = {"alignment_guided": 0.5, "seconds_per_image/base64": 0.2, "seconds_per_image_guided": 0.2,
            "fid": 3.0, "guidance_scale": 3.0, "chance_alignment": 0.25}
    sr = {"sr256/psnr": 20.0, "sr256/psnr_bicubic": 19.0, "sr256/seconds_per_image_sr": 0.1, "sr256/fid": 4.0,
          "sr256/guidance_scale": 1.0, "sr256/lowres_aug": 0.0, "sr256/sweep/psnr_aug0_w1.0": 20.0}
    b_metrics, b_tags = ev.run_metrics(base, ["base64"])
    s_metrics, s_tags = ev.run_metrics(sr, ["sr256"])
    assert b_metrics == {"eval/alignment_guided": 0.5, "eval/seconds_per_image": 0.2,
                         "eval/seconds_per_image_guided": 0.2, "eval/fid": 3.0}
    assert s_metrics == {"eval/psnr": 20.0, "eval/psnr_bicubic": 19.0, "eval/seconds_per_image": 0.1,
                         "eval/fid": 4.0, "eval/sweep/psnr_aug0_w1.0": 20.0}
    assert {"eval/fid", "eval/seconds_per_image"} <= set(b_metrics) & set(s_metrics)  # the compare view lines up
    assert b_tags == {"eval.guidance_scale": "3", "eval.chance_alignment": "0.25"}
    assert s_tags == {"eval.guidance_scale": "1", "eval.lowres_aug": "0"}
    # a cascade's own run keeps the stage in the name
    assert "eval/sr256/psnr" in ev.run_metrics(sr, ["base64", "sr256"])[0]


def test_parts_run_side_by_side_costliest_first_and_threads_are_given_back():
    import torch

    threads = torch.get_num_threads()
    seen, lock = [], threading.Lock()

    def part(name):
        def run():
            with lock:
                seen.append((name, threading.current_thread().name, torch.get_num_threads()))
        return run

    parts = [ev.Part(n, cost, part(n)) for n, cost in (("small", 1), ("big", 9), ("mid", 5))]
    ev.run_parts(parts, workers=1)
    assert [n for n, _, _ in seen] == ["big", "mid", "small"]  # one after another, costliest first
    assert {t for _, t, _ in seen} == {threading.current_thread().name}
    seen.clear()
    ev.run_parts(parts, workers=2)
    assert sorted(n for n, _, _ in seen) == ["big", "mid", "small"]
    assert all(t.startswith("evaluate") and n == max(1, threads // 2) for _, t, n in seen)
    assert torch.get_num_threads() == threads

    def boom():
        raise ValueError("a part failed")

    with pytest.raises(ValueError, match="a part failed"):
        ev.run_parts([ev.Part("bad", 1, boom), *parts], workers=2)
    assert torch.get_num_threads() == threads


def test_deployment_weights_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(ev.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(ev.CLIP_MODEL_ENV, "")
    assert ev.deployment_weights() == {"fid_weights": None, "clip_model": None}  # empty is unset
    monkeypatch.setenv(ev.FID_WEIGHTS_ENV, "/models/inception-2015-12-05.pt")
    monkeypatch.setenv(ev.CLIP_MODEL_ENV, "/models/clip")
    assert ev.deployment_weights() == {"fid_weights": "/models/inception-2015-12-05.pt", "clip_model": "/models/clip"}


def test_cli_defaults_are_the_deployment_settings(monkeypatch):
    from pipeline.cli import build_parser

    monkeypatch.setenv(ev.FID_WEIGHTS_ENV, "/models/inception.pt")
    monkeypatch.setenv(ev.CLIP_MODEL_ENV, "/models/clip")
    a = build_parser().parse_args(["evaluate", "--checkpoint", "x"])
    assert (a.fid_weights, a.clip_model, a.data, a.num_validation) == ("/models/inception.pt", "/models/clip",
                                                                        None, 16)
    a = build_parser().parse_args(["evaluate", "--checkpoint", "x", "--fid-weights", "other.pt"])
    assert a.fid_weights == "other.pt"  # a flag wins over the deployment's default
    monkeypatch.delenv(ev.FID_WEIGHTS_ENV)
    monkeypatch.delenv(ev.CLIP_MODEL_ENV)
    a = build_parser().parse_args(["evaluate", "--checkpoint", "x"])
    assert (a.fid_weights, a.clip_model) == (None, None)


def test_fid_and_clip_are_skipped_with_what_to_set():
    opts, metrics = ev.EvalOptions(), {}
    images = np.zeros((4, 8, 8, 3), np.uint8)
    ev.quality_metrics(images, images, ["a"] * 4, "sr256/", opts, metrics, "unused")
    assert metrics == {}
    assert ev.FID_WEIGHTS_ENV in opts.skipped["sr256/fid"] and "--fid-weights" in opts.skipped["sr256/fid"]
    assert ev.CLIP_MODEL_ENV in opts.skipped["sr256/clip_score"]
    opts = ev.EvalOptions(fid_weights="w.pt", clip_model="clip")
    ev.quality_metrics(images, None, None, "", opts, metrics, "the validation split (--data)")
    assert opts.skipped == {"fid": "no reference images: the validation split (--data)",
                            "clip_score": "the validation shards hold no caption text"}
    opts = ev.EvalOptions(fid_weights="w.pt")
    ev.quality_metrics(images[:1], images, None, "", opts, metrics, "")
    assert opts.skipped["fid"] == "FID needs at least 2 images per set, got 4 real, 1"


def test_validation_split_says_why_it_is_missing(tmp_path):
    cfg = tiny("sr256")
    assert ev.ValidationSplit(ev.EvalOptions(), None).get(cfg) is None
    assert "--data ROOT/filtered" in ev.ValidationSplit(ev.EvalOptions(), None).reason(cfg)
    missing = ev.ValidationSplit(ev.EvalOptions(data=str(tmp_path / "nope")), None)
    assert missing.get(cfg) is None and "does not exist" in missing.reason(cfg)
    (tmp_path / "000000.tar").write_bytes(b"")  # training shards only: filtered before the split existed
    old = ev.ValidationSplit(ev.EvalOptions(data=str(tmp_path), embeddings=str(tmp_path)), None)
    assert old.get(cfg) is None and "rerun the filter and embed steps" in old.reason(cfg)
    (tmp_path / "val-000000.tar").write_bytes(b"")
    no_emb = ev.ValidationSplit(ev.EvalOptions(data=str(tmp_path)), None)
    assert no_emb.get(cfg) is None and "--embeddings" in no_emb.reason(cfg)


class FakeEvaluation:
    """Stands in for :class:`pipeline.release.evaluate.Evaluation`: one part, fixed result."""

    made: list[FakeEvaluation] = []

    def __init__(self, checkpoint, opts):
        self.checkpoint, self.opts, self.thread = checkpoint, opts, None
        FakeEvaluation.made.append(self)

    def parts(self):
        return [ev.Part(self.checkpoint, 1.0, self.run)]

    def run(self):
        self.thread = threading.current_thread().name

    def finish(self):
        return {"metrics": {"n": 1.0}, "grids": {}, "run_id": "r", "skipped": {}}


@pytest.fixture()
def fake(monkeypatch):
    FakeEvaluation.made = []
    monkeypatch.setattr(ev, "Evaluation", FakeEvaluation)
    return FakeEvaluation.made


def test_evaluate_run_reads_the_deployment_weights_and_reuses_its_result(tmp_path, monkeypatch, fake):
    monkeypatch.setenv(ev.FID_WEIGHTS_ENV, "/models/inception.pt")
    monkeypatch.delenv(ev.CLIP_MODEL_ENV, raising=False)
    trained = {"checkpoint": str(tmp_path / "run1" / "final"), "stage": "sr256",
               "data": "/root/filtered", "embeddings": "/root/embeddings/enc"}
    first = ev.evaluate_run(trained, steps=2)
    assert first["reused"] is False and first["metrics"] == {"n": 1.0}
    (made,) = fake
    o = made.opts
    assert (o.data, o.embeddings, o.fid_weights, o.clip_model, o.steps, o.attributes) == (
        "/root/filtered", "/root/embeddings/enc", "/models/inception.pt", None, 2, None)
    assert (tmp_path / "run1" / "eval.json").exists()
    again = ev.evaluate_run(trained)
    assert again["reused"] is True and again["metrics"] == {"n": 1.0} and len(fake) == 1


def test_evaluate_runs_does_every_stage_side_by_side(tmp_path, fake):
    trained = [{"checkpoint": str(tmp_path / s / "run1" / "final"), "stage": s} for s in ("base64", "sr256")]
    out = ev.evaluate_runs([trained[0], None, trained[1]], attributes="attrs.json", workers=2)  # None: skipped
    assert list(out) == ["base64", "sr256"] and all(not r["reused"] for r in out.values())
    assert all(e.thread.startswith("evaluate") and e.opts.attributes == "attrs.json" for e in fake)
    assert ev.evaluate_runs(trained)["sr256"]["reused"] is True and len(fake) == 2
    assert ev.evaluate_runs([]) == {}
