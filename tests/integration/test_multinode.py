"""Two torchrun nodes on 127.0.0.1, for real (gloo, CPU, one process per node).

- ``imagen-pipeline train --nnodes 2 --node-rank R --master-addr 127.0.0.1`` run twice, as on two
  machines: each node prints the sha256 of the weights and EMA *its own* process holds at the
  end, and both equal the checksums of the files global rank 0 saved.
- a run whose two agents (and their workers' process groups) are SIGKILLed after a checkpoint,
  resumed on both nodes by the local launcher (``nodes=2``), ends bitwise equal, weights and
  EMA, to the run that never stopped; node 1's own checksums say so too.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline.train import torchrun
from pipeline.train.job import TrainJob, job_to_argv
from pipeline.train.launchers.local import LocalLauncher
from pipeline.train.trainer import tensors_sha256

STEPS, EVERY = 12, 4
BIN = os.path.join(os.path.dirname(sys.executable), "imagen-pipeline")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one thread per process (2 cores), no tracking server, and gloo on the loopback interface only
LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"} if os.path.exists("/sys/class/net/lo") else {}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": "", **LOOPBACK}


def tiny_job(data: str, embeddings: str, ckpt) -> TrainJob:
    return TrainJob(stage="base64", preset="tiny", data=data, embeddings=embeddings, checkpoint_dir=str(ckpt),
                    max_steps=STEPS, global_batch=8, checkpoint_every=EVERY, keep_checkpoints=10, log_every=EVERY,
                    sample_every=0, tracking_uri="off", resume="latest", device="cpu")


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def kill_trees(procs) -> None:
    """SIGKILL every process group under each agent: its own and its workers' sessions."""
    groups = set().union(*(torchrun.process_groups(p.pid) for p in procs if p.poll() is None))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for p in procs:
        p.wait()
    deadline = time.monotonic() + 30
    while any(_alive(g) for g in groups):  # the workers are not our children: wait until gone
        assert time.monotonic() < deadline, "worker processes survived SIGKILL"
        time.sleep(0.05)


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def file_sums(final: str) -> tuple[str, str]:
    return (tensors_sha256(load_file(os.path.join(final, "model.safetensors"))),
            tensors_sha256(load_file(os.path.join(final, "ema.safetensors"))))


@pytest.fixture(scope="module")
def two_node_run(filtered_shards, tiny_embeddings, tmp_path_factory):
    """The uninterrupted run: the CLI on "node 0" and "node 1", side by side."""
    ckpt = tmp_path_factory.mktemp("multinode") / "full"
    job = tiny_job(filtered_shards, tiny_embeddings, ckpt)
    port = torchrun.free_port()
    logs = [ckpt.parent / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    t0 = time.monotonic()
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as out:  # files, not pipes: a full pipe would stall a node mid-collective
                nodes.append(subprocess.Popen(
                    [BIN, "train", *job_to_argv(job), "--nnodes", "2", "--node-rank", str(rank),
                     "--master-addr", "127.0.0.1", "--master-port", str(port)],
                    stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True))
        for p in nodes:
            p.wait(timeout=300)
    finally:
        kill_trees(nodes)
    texts = [log.read_text() for log in logs]
    for p, text in zip(nodes, texts, strict=True):
        assert p.returncode == 0, text[-6000:]
    print(f"two-node run: {time.monotonic() - t0:.1f}s")
    return ckpt, [last_json(text) for text in texts]


def test_two_nodes_finish_with_identical_weights(two_node_run):
    from imagen.checkpoint import load_config

    ckpt, (node0, node1) = two_node_run
    assert node0["step"] == node1["step"] == STEPS
    # each node's summary is its own process's: the checksums of what it holds in memory
    assert node1["weights_sha256"] == node0["weights_sha256"] and node1["ema_sha256"] == node0["ema_sha256"]
    # ... and they are the checksums of the files global rank 0 wrote
    assert file_sums(node0["checkpoint"]) == (node1["weights_sha256"], node1["ema_sha256"])
    assert load_config(node0["checkpoint"])[1]["world_size"] == 2
    # one RNG file per global rank in every step directory, the full state once
    assert sorted(os.listdir(ckpt / f"step-{EVERY:08d}")) == [
        "config.json", "ema.safetensors", "model.safetensors", "optimizer.pt", "rng-0.pt", "rng-1.pt"]


def test_killed_on_both_nodes_then_resumed_is_bitwise_equal(two_node_run, filtered_shards, tiny_embeddings,
                                                            tmp_path, monkeypatch, capsys):
    full_ckpt, (full0, full1) = two_node_run
    ckpt = tmp_path / "killed"
    job = tiny_job(filtered_shards, tiny_embeddings, ckpt)
    # the local launcher's own two agents (node ranks 0 and 1 on a free port), killed like two
    # machines losing power once the first checkpoint is complete
    cmds = torchrun.local_node_commands(job_to_argv(job), 2, 1)
    agents = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=e,
                               start_new_session=True)
              for c, e in zip(cmds, torchrun.local_node_envs(2, 1, ENV), strict=True)]
    try:
        deadline = time.monotonic() + 300
        while not (ckpt / f"step-{EVERY:08d}").exists():
            assert all(a.poll() is None for a in agents), "an agent exited before the checkpoint to kill at"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        kill_trees(agents)
    assert not (ckpt / "final").exists(), "the run finished before it was killed: nothing was tested"
    kept = sorted(n for n in os.listdir(ckpt) if n.startswith("step-") and not n.endswith(".tmp"))
    assert kept and kept[-1] < f"step-{STEPS:08d}"

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    for name, value in LOOPBACK.items():
        monkeypatch.setenv(name, value)
    resumed = LocalLauncher().launch(job, nodes=2, procs_per_node=1)
    printed = capsys.readouterr().out
    (line,) = [x for x in printed.splitlines() if x.startswith("[node 0] [train base64] resumed from")]
    assert line.endswith(f"{kept[-1]} at step {int(kept[-1][5:])}")
    node1 = last_json("\n".join(line[len("[node 1] "):] for line in printed.splitlines()
                                if line.startswith("[node 1] ")))
    assert resumed["step"] == node1["step"] == STEPS
    for summary in (resumed, node1):  # node 0's and node 1's own weights and EMA
        assert (summary["weights_sha256"], summary["ema_sha256"]) == (full0["weights_sha256"], full0["ema_sha256"])
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(os.path.join(full0["checkpoint"], name)), load_file(os.path.join(resumed["checkpoint"], name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert full1["weights_sha256"] == full0["weights_sha256"]


def test_process_groups_sees_a_workers_own_session():
    """torchrun's workers run in sessions of their own: killing the agent's group would leave
    them; process_groups (what run_agents kills) finds them under the agent."""
    inner = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(60)'], start_new_session=True); time.sleep(60)")
    agent = subprocess.Popen([sys.executable, "-c", inner], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(found := torchrun.process_groups(agent.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert agent.pid in found
    finally:
        kill_trees([agent])


def test_a_node_that_does_not_see_the_checkpoint_dir_stops_both_nodes(filtered_shards, tiny_embeddings, tmp_path):
    """A relative --checkpoint-dir from two working directories: two "machines" without a shared
    filesystem. Rank 1 cannot write its rng file into the step directory rank 0 made; every rank
    gets the error at that save (parallel.agreed), instead of rank 0 waiting in a barrier."""
    job = tiny_job(filtered_shards, tiny_embeddings, "ckpt")
    job.max_steps, job.checkpoint_every = 4, 2
    cwds = iter([tmp_path / "machine0", tmp_path / "machine1"])

    def popen(cmd, **kwargs):
        cwd = next(cwds)
        cwd.mkdir()
        return subprocess.Popen(cmd, cwd=cwd, **kwargs)

    envs = [{**e, "PYTHONPATH": REPO} for e in torchrun.local_node_envs(2, 1, ENV)]
    t0 = time.monotonic()
    # whichever node is seen first: rank 0 names rank 1's error, rank 1 has its own
    with pytest.raises(RuntimeError, match=r"(?s)torchrun node \d of 2 exited with 1.*(failed on another rank "
                                           r"\(rank 1: .*step-00000002\.tmp|step-00000002\.tmp does not exist)"):
        torchrun.run_agents(torchrun.local_node_commands(job_to_argv(job), 2, 1), envs, popen=popen)
    assert time.monotonic() - t0 < 240  # not the process group's 30-minute timeout
    assert (tmp_path / "machine0" / "ckpt" / "step-00000002.tmp").is_dir()
    assert not (tmp_path / "machine0" / "ckpt" / "step-00000002").exists()
