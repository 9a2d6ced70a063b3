"""The torchrun command line (pipeline/train/torchrun.py) and the local node agents without a
subprocess: the flags are torchrun's own (its parser reads them back, and reads the ones a
Kubernetes pod leaves out from PET_*), the local launcher's nodes differ by --node-rank only,
and run_agents kills every agent's process group when one fails. The real two-node runs are
tests/integration/test_multinode.py."""

import itertools
import signal
import sys

import pytest

from pipeline import cli
from pipeline.train import torchrun
from pipeline.train.job import TrainJob, job_to_argv
from pipeline.train.launchers import local, make_launcher
from pipeline.train.torchrun import (
    Torchrun,
    local_node_commands,
    local_node_envs,
    run_agents,
    torchrun_command,
)

JOB = TrainJob(stage="base64", preset="tiny", data="/d/filtered", embeddings="/d/emb", checkpoint_dir="/d/ckpt",
               max_steps=12, resume="latest")


def parse(cmd: list[str], program: tuple[str, ...] = torchrun.LOCAL_PROGRAM):
    """What torchrun itself makes of ``cmd`` (read PET_* from the environment of the call)."""
    from torch.distributed.run import get_args_parser

    assert tuple(cmd[:len(program)]) == program
    return get_args_parser().parse_args(cmd[len(program):])


def test_node_command_is_torchrun_flags_then_the_job():
    spec = Torchrun(2, 4, node_rank=1, master_addr="10.0.0.5", master_port=29400)
    cmd = torchrun_command(spec, job_to_argv(JOB))
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4",
                   "--node-rank=1", "--master-addr=10.0.0.5", "--master-port=29400", "-m", "pipeline.train",
                   *job_to_argv(JOB)]
    a = parse(cmd)
    assert (a.nnodes, a.nproc_per_node, a.node_rank, a.master_addr, a.master_port) == ("2", "4", 1, "10.0.0.5",
                                                                                          29400)
    assert a.rdzv_backend == "static" and not a.standalone
    assert a.module and a.training_script == "pipeline.train" and a.training_script_args == job_to_argv(JOB)


def test_one_local_node_is_standalone():
    a = parse(torchrun_command(Torchrun(1, 2, standalone=True), ["--stage", "base64"]))
    assert a.standalone and (a.nnodes, a.nproc_per_node) == ("1", "2")


def test_cluster_command_leaves_the_per_pod_values_to_pet_variables(monkeypatch):
    """Kubeflow Trainer's torch runtime sets PET_NODE_RANK/PET_MASTER_ADDR/PET_MASTER_PORT on
    every pod; torchrun reads PET_<FLAG> for a flag missing from its command line."""
    for name, value in {"PET_NODE_RANK": "3", "PET_MASTER_ADDR": "job-node-0-0.job", "PET_MASTER_PORT": "29400",
                        "PET_NNODES": "99", "PET_NPROC_PER_NODE": "99"}.items():
        monkeypatch.setenv(name, value)
    cmd = torchrun_command(Torchrun(4, 8), ["--stage", "sr256"], program=torchrun.CLUSTER_PROGRAM)
    assert cmd[:4] == ["torchrun", "--nnodes=4", "--nproc-per-node=8", "-m"]
    a = parse(cmd, torchrun.CLUSTER_PROGRAM)
    assert (a.node_rank, a.master_addr, a.master_port) == (3, "job-node-0-0.job", 29400)
    assert (a.nnodes, a.nproc_per_node) == ("4", "8")  # the rendered values win over the env


@pytest.mark.parametrize("kwargs, error", [
    ({"nnodes": 2, "node_rank": 2}, r"--node-rank 2 is not in \[0, --nnodes 2\)"),
    ({"nnodes": 0}, "at least 1"),
    ({"nnodes": 2, "standalone": True}, "standalone torchrun is one node"),
])
def test_settings_that_cannot_work_are_refused(kwargs, error):
    with pytest.raises(ValueError, match=error):
        Torchrun(**kwargs)


def test_local_nodes_differ_by_node_rank_only():
    cmds = local_node_commands(["--stage", "base64"], 3, 2, port=41234)
    parsed = [parse(c) for c in cmds]
    assert [a.node_rank for a in parsed] == [0, 1, 2]
    assert {(a.nnodes, a.nproc_per_node, a.master_addr, a.master_port) for a in parsed} == {
        ("3", "2", "127.0.0.1", 41234)}
    assert all(c[:3] == list(torchrun.LOCAL_PROGRAM) and c[-2:] == ["--stage", "base64"] for c in cmds)
    assert isinstance(torchrun.free_port(), int)


def test_local_nodes_get_their_own_gpus_and_one_thread():
    envs = local_node_envs(2, 2, {"PATH": "/bin"})
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    assert all(e["OMP_NUM_THREADS"] == "1" and e["PATH"] == "/bin" for e in envs)
    envs = local_node_envs(2, 1, {"CUDA_VISIBLE_DEVICES": "5,7,9", "OMP_NUM_THREADS": "4"})
    assert [(e["CUDA_VISIBLE_DEVICES"], e["OMP_NUM_THREADS"]) for e in envs] == [("5", "4"), ("7", "4")]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in local_node_envs(2, 1, {"CUDA_VISIBLE_DEVICES": ""})] == ["", ""]
    with pytest.raises(ValueError, match="lists 3 devices but 2 local nodes x 2 processes need 4"):
        local_node_envs(2, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2"})


# --- run_agents with fake processes ----------------------------------------------------------

class FakeAgent:
    """A torchrun agent that prints ``lines`` and exits with ``code`` at its ``exit_at``-th poll
    (never, if None), unless its process group is killed first."""

    pids = itertools.count(1000)

    def __init__(self, lines, code=0, exit_at=1):
        self.stdout = iter(line + "\n" for line in lines)
        self.code, self.exit_at, self.polls = code, exit_at, 0
        self.pid, self.killed, self.kwargs, self.waited = next(self.pids), False, None, False

    def poll(self):
        if self.killed:
            return -signal.SIGKILL
        self.polls += 1
        return self.code if self.exit_at is not None and self.polls >= self.exit_at else None

    def wait(self):
        self.waited = True
        return self.poll()


def fake_popen(agents, started):
    def popen(cmd, **kwargs):
        agent = agents[len(started)]
        agent.kwargs = kwargs
        started.append(cmd)
        return agent
    return popen


def fake_killpg(agents, killed):
    def killpg(pid, sig):
        killed.append((pid, sig))
        for a in agents:
            if a.pid == pid:
                a.killed = True
    return killpg


def test_run_agents_waits_for_all_and_returns_each_ones_output(capsys):
    agents = [FakeAgent(["a", '{"step": 2}'], exit_at=3), FakeAgent(["b", '{"step": 2}'], exit_at=1)]
    started, killed = [], []
    out = run_agents([["n0"], ["n1"]], [{"X": "0"}, {"X": "1"}], popen=fake_popen(agents, started),
                     killpg=fake_killpg(agents, killed), groups=lambda pid: {pid}, poll_seconds=0)
    assert out == [["a", '{"step": 2}'], ["b", '{"step": 2}']]
    assert started == [["n0"], ["n1"]] and killed == []
    assert [a.kwargs["env"] for a in agents] == [{"X": "0"}, {"X": "1"}]
    assert all(a.kwargs["start_new_session"] for a in agents)  # a process group per agent
    printed = capsys.readouterr().out
    assert "[node 0] a\n" in printed and "[node 1] b\n" in printed


def test_one_failed_agent_kills_every_other_agents_process_group():
    agents = [FakeAgent(["waiting in all_reduce"], exit_at=None), FakeAgent(["Traceback", "OSError: disk"], code=1,
                                                                            exit_at=2),
              FakeAgent(["also waiting"], exit_at=None)]
    started, killed = [], []
    with pytest.raises(RuntimeError, match=r"(?s)node 1 of 3 exited with 1; the other 2 node\(s\) were "
                                           r"stopped.*OSError: disk"):
        run_agents([["n0"], ["n1"], ["n2"]], popen=fake_popen(agents, started), killpg=fake_killpg(agents, killed),
                   groups=lambda pid: {pid, pid + 500}, poll_seconds=0)  # its workers' groups too
    assert killed == [(agents[0].pid, signal.SIGKILL), (agents[0].pid + 500, signal.SIGKILL),
                      (agents[2].pid, signal.SIGKILL), (agents[2].pid + 500, signal.SIGKILL)]
    assert all(a.waited for a in agents)


def test_agents_are_killed_when_the_caller_is_stopped(monkeypatch):
    agents = [FakeAgent([], exit_at=None), FakeAgent([], exit_at=None)]
    killed = []

    def interrupted(_):
        raise KeyboardInterrupt  # the task was stopped while waiting

    monkeypatch.setattr(torchrun.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_agents([["n0"], ["n1"]], popen=fake_popen(agents, []), killpg=fake_killpg(agents, killed),
                   groups=lambda pid: {pid})
    assert sorted(killed) == sorted((a.pid, signal.SIGKILL) for a in agents)


# --- the local launcher's node loop and the CLI's flags --------------------------------------

def test_local_launcher_starts_one_agent_per_node_and_returns_node_0s_summary():
    seen = {}

    def runner(cmds, envs):
        seen["cmds"], seen["envs"] = cmds, envs
        return [["[train] step 12", '{"step": 12, "run_id": "r0"}'], ['{"step": 12, "run_id": null}']]

    result = make_launcher("local", runner=runner).launch(JOB, nodes=2, procs_per_node=1)
    assert result == {"step": 12, "run_id": "r0"}
    parsed = [parse(c) for c in seen["cmds"]]
    assert [a.node_rank for a in parsed] == [0, 1]
    assert {(a.nnodes, a.nproc_per_node, a.master_addr, a.master_port) for a in parsed} == {
        ("2", "1", "127.0.0.1", parsed[0].master_port)}
    assert all(a.training_script_args == job_to_argv(JOB) for a in parsed)
    assert len(seen["envs"]) == 2
    with pytest.raises(ValueError, match="at least 1"):
        local.LocalLauncher(runner=runner).launch(JOB, nodes=0, procs_per_node=1)


def test_cli_train_passes_the_node_flags_to_torchrun(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(local, "train_node", lambda args, spec: calls.append((args, spec)) or {"step": 1})
    base = ["train", "--stage", "base64", "--data", "/d/filtered", "--embeddings", "/d/emb", "--checkpoint-dir",
            "/d/ckpt"]
    assert cli.main([*base, "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.5",
                     "--nproc-per-node", "4"]) == 0
    ((args, spec),) = calls
    assert spec == Torchrun(2, 4, node_rank=1, master_addr="10.0.0.5", master_port=29500)
    assert args[:2] == ["--stage", "base64"]
    assert cli.main([*base, "--nnodes", "2", "--master-addr", "10.0.0.5"]) == 2
    assert "needs --node-rank" in capsys.readouterr().err
    assert cli.main([*base, "--node-rank", "1"]) == 2
    assert "add --nnodes N" in capsys.readouterr().err


def test_cli_train_refuses_more_processes_than_the_machine_has(monkeypatch, capsys):
    """Issue 24 item 7, the CLI's road: ``train --nproc-per-node`` on one machine, and this
    machine's share of a job of several (``--nnodes``)."""
    monkeypatch.setattr(torchrun, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(torchrun.os, "cpu_count", lambda: 2)
    monkeypatch.delenv(torchrun.MAX_PROCESSES_ENV, raising=False)

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(torchrun, "run_agents", no_process)
    monkeypatch.setattr(local, "run_streaming", no_process)
    base = ["train", "--stage", "base64", "--data", "/d/filtered", "--embeddings", "/d/emb", "--checkpoint-dir",
            "/d/ckpt"]
    for extra in (["--nproc-per-node", "64"], ["--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                                               "--nproc-per-node", "64"]):
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("imagen-pipeline train: error: ")
        assert "64 training processes on this machine, which has 2 CPU core(s)" in err
        assert "--nproc-per-node" in err and "IMAGEN_LOCAL_MAX_PROCESSES=64" in err
