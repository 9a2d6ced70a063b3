"""``python -m pipeline.train`` (job, worker, trainer, checkpointing): real training runs on the tiny data.

Exact resume (SIGKILL mid-run, then --resume latest) must end bitwise identical to an
uninterrupted run, in one process and under torchrun with 2 processes (gloo, CPU).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

STEP_ARGS = ["--global-batch", "8", "--sample-every", "0", "--log-every", "2"]


def train_cmd(data, emb, ckpt, steps, *extra, nproc=1):
    args = ["--stage", "base64", "--preset", "tiny", "--data", data, "--embeddings", emb,
            "--checkpoint-dir", str(ckpt), "--max-steps", str(steps), *STEP_ARGS, *extra]
    if nproc == 1:
        return [sys.executable, "-m", "pipeline.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pipeline.train", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}


def run_ok(cmd, timeout=600):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_killed_at(cmd, ckpt, step, timeout=300):
    """Start cmd, SIGKILL its whole process group as soon as step-<step> exists."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    target = ckpt / f"step-{step:08d}"
    deadline = time.monotonic() + timeout
    while not target.exists():
        assert proc.poll() is None, "training exited before the checkpoint to kill at"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpt / "final").exists(), "the run finished before it was killed: nothing was tested"


def weights(final):
    return load_file(os.path.join(final, "model.safetensors")), load_file(os.path.join(final, "ema.safetensors"))


def assert_bitwise_equal(a, b):
    for sa, sb in zip(weights(a), weights(b), strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.fixture()
def tracking(tmp_path):
    return ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]


def test_exact_resume_single_process(filtered_shards, tiny_embeddings, tmp_path):
    n = 8
    # with gradient accumulation, so the data position (2 micro-batches a step) is checked too
    full = run_ok(train_cmd(filtered_shards, tiny_embeddings, tmp_path / "a", 2 * n, "--micro-batch", "4",
                            "--checkpoint-every", str(n), "--tracking-uri", "off"))
    assert full["step"] == 2 * n
    cmd = train_cmd(filtered_shards, tiny_embeddings, tmp_path / "b", 2 * n, "--checkpoint-every", str(n),
                    "--micro-batch", "4", "--tracking-uri", "off", "--resume", "latest")
    run_killed_at(cmd, tmp_path / "b", n)
    resumed = run_ok(cmd)
    assert resumed["step"] == 2 * n
    assert_bitwise_equal(full["checkpoint"], resumed["checkpoint"])
    assert resumed["weights_sha256"] == full["weights_sha256"]


def test_ddp_two_processes_identical_weights_and_exact_resume(filtered_shards, tiny_embeddings, tmp_path):
    n = 4
    full = run_ok(train_cmd(filtered_shards, tiny_embeddings, tmp_path / "a", 2 * n, "--checkpoint-every",
                            str(n), "--tracking-uri", "off", nproc=2))
    # the trainer all-gathers a checksum of every rank's weights and fails if they differ
    assert len(full["weights_sha256"]) == 64
    cmd = train_cmd(filtered_shards, tiny_embeddings, tmp_path / "b", 2 * n, "--checkpoint-every", str(n),
                    "--tracking-uri", "off", "--resume", "latest", nproc=2)
    run_killed_at(cmd, tmp_path / "b", n)
    assert sorted(os.listdir(tmp_path / "b" / f"step-{n:08d}")) == [
        "config.json", "ema.safetensors", "model.safetensors", "optimizer.pt", "rng-0.pt", "rng-1.pt"]
    resumed = run_ok(cmd)
    assert_bitwise_equal(full["checkpoint"], resumed["checkpoint"])


def test_fsdp_two_processes_trains_and_saves_whole_weights(filtered_shards, tiny_embeddings, tmp_path):
    from imagen.checkpoint import load_model

    out = run_ok(train_cmd(filtered_shards, tiny_embeddings, tmp_path / "f", 4, "--parallel", "fsdp",
                           "--checkpoint-every", "2", "--tracking-uri", "off", nproc=2))
    model, cfg, meta = load_model(out["checkpoint"])  # plain tensors, loadable without FSDP
    assert meta["step"] == 4 and meta["world_size"] == 2
    assert cfg.stage == "base64"


def test_tracking_server_down_does_not_stop_training(filtered_shards, tiny_embeddings, tmp_path):
    from pipeline.dev.services import free_port

    out = run_ok(train_cmd(filtered_shards, tiny_embeddings, tmp_path / "c", 4, "--checkpoint-every", "2",
                           "--keep-checkpoints", "5", "--tracking-uri", f"http://127.0.0.1:{free_port()}"))
    assert out["run_id"] is None
    assert sorted(os.listdir(tmp_path / "c")) == ["final", "step-00000002", "step-00000004"]


def test_metrics_params_and_grid_logged_to_mlflow(filtered_shards, tiny_embeddings, tmp_path, mlflow_uri):
    import mlflow

    out = run_ok(train_cmd(filtered_shards, tiny_embeddings, tmp_path / "m", 4, "--checkpoint-every", "4",
                           "--sample-every", "4", "--tracking-uri", mlflow_uri))
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(out["run_id"])
    assert run.data.params["stage"] == "base64" and run.data.params["unet.channels"] == "32"
    assert len(run.data.params["manifest_sha256"]) == 64
    assert run.data.params["encoder_id"].startswith("t5-tiny")
    history = client.get_metric_history(out["run_id"], "perf/images_per_s")
    assert [m.step for m in history] == [2, 4] and all(m.value > 0 for m in history)
    # on a CPU no peak is known: achieved TFLOP/s instead of MFU (pipeline/train/perf.py)
    assert run.data.metrics["perf/tflops"] > 0 and "perf/mfu" not in run.data.metrics
    assert (run.data.params["global_batch"], run.data.params["micro_batch"], run.data.params["grad_accum"],
            run.data.params["world_size"]) == ("8", "8", "1", "1")
    assert 0 <= run.data.metrics["data_wait_fraction"] < 1
    artifacts = [a.path for a in client.list_artifacts(out["run_id"])]
    assert "config.json" in artifacts and "validation_prompts.json" in artifacts
    # the filtered shards are the run's dataset input, named by the manifest's digest
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    assert (dataset.name, dataset.digest) == ("filtered-shards", run.data.params["manifest_sha256"][:16])
    assert "ema_decay" in run.data.metrics  # the warmed-up EMA decay, logged per step


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(filtered_shards, tiny_embeddings,
                                                                          tmp_path):
    cmd = train_cmd(filtered_shards, tiny_embeddings, tmp_path / "n", 20, "--lr", "1e30", "--warmup-steps", "1",
                    "--checkpoint-every", "1", "--keep-checkpoints", "50", "--tracking-uri", "off")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0
    assert re.search(r"FloatingPointError: the loss or gradient became non-finite in step \d+ \(last loss "
                     r"(nan|inf)\); no checkpoint was written after it", proc.stderr), proc.stderr[-2000:]
    kept = sorted(os.listdir(tmp_path / "n"))
    assert kept and not (tmp_path / "n" / "final").exists()
    last = load_file(os.path.join(tmp_path / "n", kept[-1], "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in last.values())


def test_checkpoint_of_another_stage_is_refused(filtered_shards, tiny_embeddings, tmp_path):
    run_ok(train_cmd(filtered_shards, tiny_embeddings, tmp_path / "s", 2, "--tracking-uri", "off"))
    cmd = train_cmd(filtered_shards, tiny_embeddings, tmp_path / "s", 4, "--tracking-uri", "off",
                    "--resume", "latest")
    cmd[cmd.index("base64")] = "sr256"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode != 0
    assert "is for stage 'base64', not 'sr256'" in proc.stderr


def test_loss_decreases_clearly_on_tiny_data(filtered_shards, tiny_embeddings, tmp_path):
    cmd = train_cmd(filtered_shards, tiny_embeddings, tmp_path / "l", 120, "--checkpoint-every", "1000",
                    "--tracking-uri", "off")
    cmd[cmd.index("--log-every") + 1] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split(" loss ")[1].split()[0]) for line in proc.stdout.splitlines()
              if line.startswith("[train base64] step ")]
    assert len(losses) == 120
    first, last = sum(losses[:15]) / 15, sum(losses[-30:]) / 30
    # v-prediction keeps its full weight at high noise (imagen/diffusion.py), where the target
    # is unpredictable: the loss has a floor. Measured here: ~0.55 -> ~0.37 by step 120.
    assert last / first < 0.75, (first, last)


def test_sr1024_trains_on_crops_and_samples_its_full_size(filtered_shards, tiny_embeddings, tmp_path, mlflow_uri):
    """The tiny 128 px stage (like the paper's 1024 px one) learns from 64 px crops of sources at
    least 128 px, with 32 px inputs made from the same crops, and samples whole 128 px images."""
    import mlflow

    from imagen.checkpoint import load_model
    from imagen.config import preset
    from imagen.diffusion import GaussianDiffusion
    from imagen.sampling import sample

    audit = tmp_path / "audit"
    cmd = [sys.executable, "-m", "pipeline.train", "--stage", "sr1024", "--preset", "tiny", "--data",
           filtered_shards, "--embeddings", tiny_embeddings, "--checkpoint-dir", str(tmp_path / "sr"),
           "--max-steps", "2", "--global-batch", "4", "--sample-every", "2", "--log-every", "1",
           "--checkpoint-every", "2", "--tracking-uri", mlflow_uri]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**ENV, "IMAGEN_DATA_AUDIT": str(audit)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    spec = preset("tiny", "sr1024").spec
    assert (spec.image_size, spec.crop_size, spec.lowres_crop_size) == (128, 64, 32)
    # what this stage can use: the kept sources of at least 128 px; the rest are counted out
    assert out["data_excluded_too_small"] > 0 and out["data_samples"] > 0
    run = mlflow.MlflowClient(mlflow_uri).get_run(out["run_id"])
    assert int(run.data.params["data_excluded_too_small"]) == out["data_excluded_too_small"]
    assert int(run.data.params["data_samples"]) == out["data_samples"]
    lines = [json.loads(x) for f in audit.iterdir() for x in f.read_text().splitlines()]
    crops = {tuple(x["crop"]) for x in lines}
    assert crops == {(64, 64), (128, 128)}  # training batches are crops; the validation grid is whole
    assert all(min(x["stored"]) >= 128 for x in lines)
    # sampled fully convolutionally at the full size, from a 64 px low-res image
    model, cfg, _ = load_model(out["checkpoint"])
    text, mask = torch.zeros(1, 4, cfg.unet.text_embed_dim), torch.ones(1, 4, dtype=torch.bool)
    x = sample(model, GaussianDiffusion(cfg.diffusion), text, mask, (1, 3, 128, 128), steps=2,
               lowres=torch.zeros(1, 3, 64, 64), lowres_t=torch.zeros(1))
    assert x.shape == (1, 3, 128, 128) and torch.isfinite(x).all()
