"""pipeline/train/trainer.py in one process: the schedule, the optimizers, the checksums, and the
loop itself (Trainer.fit on a few hand-written shards and a tiny T5, no subprocess, tracking off):
its summary, its checkpoints, and a resume that ends bitwise where an uninterrupted run ends."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.embed import embed_shards
from pipeline.dev.tinymodels import build_tiny_t5
from pipeline.layout import manifest_sha256
from pipeline.train.job import TrainJob
from pipeline.train.step import build_optimizer
from pipeline.train.trainer import Trainer, lr_at, weights_sha256

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_lr_schedule_warmup_and_cosine():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.55)  # halfway down the cosine to 10%
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)


def test_constant_lr_after_warmup_is_the_paper_presets_and_the_tiny_preset_decays():
    from imagen.config import StageConfig, preset
    from pipeline.train.job import TrainJob, resolve_config

    assert [lr_at(s, 1.0, 10, 100, "constant") for s in (0, 9, 10, 55, 100, 500)] == \
        pytest.approx([0.1, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert {preset(s).train.lr_schedule for s in ("base64", "sr256", "sr1024")} == {"constant"}
    assert preset("tiny", "sr256").train.lr_schedule == "cosine"
    # a config written before the choice existed trained with the cosine decay, and resumes with it
    old = preset("tiny").to_dict()
    del old["train"]["lr_schedule"]
    assert StageConfig.from_dict(old).train.lr_schedule == "cosine"
    job = TrainJob(stage="base64", preset="tiny", lr_schedule="constant")
    assert resolve_config(job, None).train.lr_schedule == "constant"
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'; choose one of constant, cosine"):
        preset("tiny").train.__class__(lr_schedule="linear")


def test_optimizers_by_name():
    params = [torch.nn.Parameter(torch.zeros(2))]
    cpu = torch.device("cpu")
    adamw = build_optimizer("adamw", params, 1e-3, 0.0, cpu)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]  # step counters on the device
    assert isinstance(build_optimizer("adafactor", params, 1e-3, 0.0, cpu), torch.optim.Adafactor)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; choose adamw or adafactor"):
        build_optimizer("sgd", params, 1e-3, 0.0, cpu)


def test_weights_checksum():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    assert weights_sha256(a) == weights_sha256(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert weights_sha256(a) != weights_sha256(b)


def write_shards(root: Path, num_shards: int = 2, per_shard: int = 4, val: int = 0) -> None:
    """The filter step's layout: NNNNNN.tar of KEY.png/.txt/.json (40 px: above the 32 px stage),
    and with ``val`` one validation shard ``val-000000.tar`` of that many samples (shard 9)."""
    root.mkdir(parents=True)
    names = [f"{s:06d}.tar" for s in range(num_shards)] + (["val-000000.tar"] if val else [])
    for s, name in enumerate(names):
        if name.startswith("val-"):
            s, per_shard = 9, val
        with tarfile.open(root / name, "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(per_shard):
                key, caption = f"{s:05d}{i:04d}", f"shape {i} of shard {s}"
                buf = io.BytesIO()
                pixels = np.random.default_rng([s, i]).integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buf, "PNG")
                meta = json.dumps({"key": key, "caption": caption}).encode()
                for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "manifest.json").write_text(json.dumps({"shards": {name: val if name.startswith("val-") else per_shard
                                                               for name in names}}))


@pytest.fixture(autouse=True)
def no_git(monkeypatch):
    """The trainer records the code version with `git rev-parse`: no subprocess in this tier."""
    monkeypatch.setattr("pipeline.train.trainer.code_version", lambda: "test")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("run")
    write_shards(root / "filtered")
    t5 = build_tiny_t5(str(root / "t5"))
    out = embed_shards(str(root / "filtered"), str(root / "embeddings"), t5, max_length=16)
    return str(root / "filtered"), out["output"]


def job(data, checkpoint_dir, **kw) -> TrainJob:
    filtered, embeddings = data
    return dataclasses.replace(
        TrainJob(stage="base64", preset="tiny", data=filtered, embeddings=embeddings,
                 checkpoint_dir=str(checkpoint_dir), global_batch=2, tracking_uri="off", sample_every=0,
                 log_every=2, checkpoint_every=2, keep_checkpoints=1, device="cpu"), **kw)


def fit(j: TrainJob) -> dict:
    return Trainer(j, rank=0, world=1, device=torch.device("cpu")).fit()


def test_fit_trains_checkpoints_and_publishes_final(data, tmp_path):
    out = fit(job(data, tmp_path / "a", max_steps=3))
    assert out["step"] == 3 and out["stage"] == "base64" and np.isfinite(out["loss"])
    assert out["checkpoint"] == str(tmp_path / "a" / "final") and out["run_id"] is None  # tracking off
    assert out["data_samples"] == 8 and out["data_excluded_too_small"] == 0
    assert sorted(os.listdir(tmp_path / "a")) == ["final", "step-00000003"]  # keep_checkpoints=1
    assert sorted(os.listdir(tmp_path / "a" / "final")) == ["config.json", "ema.safetensors",
                                                            "model.safetensors"]
    meta = json.loads((tmp_path / "a" / "final" / "config.json").read_text())["metadata"]
    assert meta["step"] == 3 and meta["encoder_id"] and meta["manifest_sha256"] == \
        manifest_sha256(data[0])


def test_resume_ends_bitwise_where_an_uninterrupted_run_ends(data, tmp_path):
    straight = fit(job(data, tmp_path / "straight", max_steps=3))
    first = fit(job(data, tmp_path / "resumed", max_steps=2))  # checkpoint_every=2: step 2 saved
    assert first["step"] == 2
    resumed = fit(job(data, tmp_path / "resumed", max_steps=3, resume="latest"))
    assert resumed["step"] == 3
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    assert resumed["loss"] == straight["loss"]


def test_a_non_finite_step_stops_before_any_checkpoint_holds_it(data, tmp_path):
    """The loss is read only at logging and checkpoint steps: a step that went non-finite is
    caught there, on every rank, before the checkpoint that would hold its weights."""
    trainer = Trainer(job(data, tmp_path / "n", max_steps=6, log_every=4), 0, 1, torch.device("cpu"))
    loss = trainer.runner.diffusion.loss
    trainer.runner.diffusion.loss = lambda out, *a, **k: loss(out, *a, **k) * (
        float("nan") if trainer.step >= 2 else 1.0)  # steps 3 and 4 (1-based) go NaN
    with pytest.raises(FloatingPointError, match="non-finite in steps 3-4.*Lower --lr.*--resume latest"):
        trainer.fit()
    assert sorted(os.listdir(tmp_path / "n")) == ["step-00000002"]  # the good one; no step 4, no final


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")


def test_no_host_read_inside_a_training_step(data, tmp_path, monkeypatch):
    """STYLE #14: a step never reads a device value back (on CUDA each read stalls the GPU). Every
    Tensor method that returns a host value is counted over steps between logging steps: none;
    the logging read itself is counted too, so the counter is known to work."""
    trainer = Trainer(job(data, tmp_path / "s", max_steps=8, log_every=100), 0, 1, torch.device("cpu"))
    trainer.train_step()  # first step: lazy initialisation (optimizer state) is not the hot path
    # the loader's host-side work (numpy in its workers) is not the step's: batches made first
    trainer.batches = iter([next(trainer.batches) for _ in range(5)])
    reads: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(5):
        trainer.train_step()
    assert reads == []
    metrics = trainer.runner.read_metrics()
    assert reads == ["tolist"] and np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


def test_training_draws_come_from_the_device_generator(data, tmp_path, monkeypatch):
    """Noise, levels and dropout are drawn on the training device from the checkpointed generator:
    no CPU draw is copied over. On CPU the generator is the CPU one; the draws all use it."""
    trainer = Trainer(job(data, tmp_path / "g", max_steps=2), 0, 1, torch.device("cpu"))
    seen = []
    for name in ("rand", "randn"):
        original = getattr(torch, name)

        def spy(*a, _original=original, **k):
            seen.append((k.get("generator"), str(k.get("device"))))
            return _original(*a, **k)

        monkeypatch.setattr(torch, name, spy)
    trainer.train_step()
    assert seen and all(g is trainer.runner.generator and d == "cpu" for g, d in seen)
    state = trainer.runner.generator.get_state()
    trainer.train_step()
    assert not torch.equal(state, trainer.runner.generator.get_state())  # it advanced


@pytest.fixture(scope="module")
def data_with_val(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("run-val")
    write_shards(root / "filtered", val=3)
    t5 = build_tiny_t5(str(root / "t5"))
    out = embed_shards(str(root / "filtered"), str(root / "embeddings"), t5, max_length=16)
    return str(root / "filtered"), out["output"]


def test_validation_loss_is_logged_on_its_cadence_and_at_the_end(data_with_val, tmp_path, monkeypatch):
    """eval_every (but at least four times in a run) and the last step: ``val/loss`` and a term
    per noise level, on the held-out samples only; the sample grid draws their captions."""
    trainer = Trainer(job(data_with_val, tmp_path / "v", max_steps=6, eval_every=3, sample_every=6), 0, 1,
                      torch.device("cpu"))
    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(trainer.tracker, "log_metrics", lambda m, step=None: logged.append((step, dict(m))))
    monkeypatch.setattr(trainer.tracker, "log_image", lambda *a, **k: None)
    assert trainer.eval_every == 1  # min(eval_every 3, 6 // 4): a short run still logs a series
    assert trainer.val_batch["keys"] == [f"00009{i:04d}" for i in range(3)]  # the val shard's, in order
    assert trainer.val_batch["captions"] == [f"shape {i} of shard 9" for i in range(3)]
    out = trainer.fit()
    val = [(step, m) for step, m in logged if "val/loss" in m]
    assert [step for step, _ in val] == [1, 2, 3, 4, 5, 6]
    assert all(m["val/samples"] == 3 and len([k for k in m if k.startswith("val/loss_t")]) == 8 for _, m in val)
    assert out["val_loss"] == val[-1][1]["val/loss"] and np.isfinite(out["val_loss"])
    assert len({m["val/loss"] for _, m in val}) > 1  # it follows the weights


def test_without_a_validation_split_training_goes_on_and_says_so(data, tmp_path, capsys):
    out = fit(job(data, tmp_path / "nv", max_steps=2))
    assert out["val_loss"] is None and "has no validation split" in capsys.readouterr().out


def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint_that_resumes_exactly(data, tmp_path):
    """SIGINT mid-step only sets a flag: the step finishes, its checkpoint is written (between
    the cadence's), TrainingStopped says where, and resuming from it ends where a run that never
    stopped ends."""
    import signal

    from pipeline.train.stopping import TrainingStopped

    straight = fit(job(data, tmp_path / "straight", max_steps=5))
    before = signal.getsignal(signal.SIGINT)  # Python's default; SIG_IGN in a pytest-xdist worker
    trainer = Trainer(job(data, tmp_path / "stopped", max_steps=5), rank=0, world=1, device=torch.device("cpu"))
    real_step = trainer.train_step

    def step_then_ctrl_c():
        wait = real_step()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C, in the middle of the loop
        return wait

    trainer.train_step = step_then_ctrl_c
    with pytest.raises(TrainingStopped) as stopped:
        trainer.fit()
    assert stopped.value.summary == {"stopped": True, "signal": "SIGINT", "step": 3, "stage": "base64",
                                     "checkpoint": str(tmp_path / "stopped" / "step-00000003"),
                                     "checkpoint_dir": str(tmp_path / "stopped"), "run_id": None}
    assert str(stopped.value) == "stopped at step 3 (resume with --resume latest)"
    assert sorted(os.listdir(tmp_path / "stopped")) == ["step-00000003"]  # step 3 is off the cadence of 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler is gone again
    resumed = fit(job(data, tmp_path / "stopped", max_steps=5, resume="latest"))
    assert resumed["weights_sha256"] == straight["weights_sha256"]


def test_ctrl_c_while_starting_ends_the_mlflow_run_killed(data, tmp_path, monkeypatch):
    """A Ctrl-C after the MLflow run opened but before the loop (reading the data): the run is
    ended KILLED, not left RUNNING, and the interrupt goes on to the CLI."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_loader", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(job(data, tmp_path / "ckpt", tracking_uri=uri, max_steps=2), rank=0, world=1,
                device=torch.device("cpu"))
    runs = mlflow.MlflowClient(uri).search_runs([e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()])
    assert [r.info.status for r in runs] == ["KILLED"]
