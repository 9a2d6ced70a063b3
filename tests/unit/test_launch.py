"""Launchers in this process: the registry of launchers, each launcher's options schema and
the one-line mistakes, run_stage's check of the trigger form's options against the chosen
launcher, and the local launcher's single-process path (the CLI's) without a subprocess (its
several nodes: tests/unit/test_torchrun.py). The local launcher's real trainer subprocess and
run_stage's reuse are tests/integration/test_launch.py; the kubernetes launcher's options and
TrainJob are tests/unit/test_launch_k8s.py."""

import re

import pytest

from pipeline.layout import RunLayout
from pipeline.train import launch, launchers
from pipeline.train.job import TrainJob
from pipeline.train.launchers import local


def test_registry_lists_builtin_launchers_and_explains_mistakes():
    assert {"local", "kubernetes"} <= set(launchers.launcher_names())
    assert isinstance(launchers.make_launcher("local"), local.LocalLauncher)
    with pytest.raises(ValueError, match="unknown launcher 'slurm'.*kubernetes.*local"):
        launchers.make_launcher("slurm")
    with pytest.raises(TypeError, match="launcher 'local' does not take these options"):
        launchers.make_launcher("local", image="x")
    with pytest.raises(ValueError, match="unknown launcher 'slurm'"):
        launchers.options_schema("slurm")


def test_each_launcher_owns_its_options_schema():
    from pipeline.train.launchers.kubernetes import OPTION_SCHEMA, KubernetesLauncher

    assert launchers.options_schema("local") == {"type": "object", "additionalProperties": False, "properties": {}}
    k8s = launchers.options_schema("kubernetes")
    assert k8s["additionalProperties"] is False and k8s["properties"] == OPTION_SCHEMA
    assert launchers.option_keys("kubernetes") == list(OPTION_SCHEMA)
    assert launchers.option_keys("kubernetes")[:2] == ["image", "namespace"] and launchers.option_keys("local") == []
    assert launchers.LAUNCHERS["kubernetes"] is KubernetesLauncher
    k8s["properties"]["image"]["maxLength"] = 1  # a copy: the owner's schema is untouched
    assert OPTION_SCHEMA["image"]["maxLength"] == 512
    # the Param's union: every launcher's keys, one schema each
    assert launchers.launcher_options_schema()["properties"] == OPTION_SCHEMA


def test_a_third_launcher_brings_its_own_schema(monkeypatch):
    class Slurm:
        OPTION_SCHEMA = {"partition": {"type": "string", "pattern": "^[a-z]+$"}}

        def __init__(self, partition: str = "gpu"):
            self.partition = partition

    monkeypatch.setitem(launchers.LAUNCHERS, "slurm", Slurm)
    assert launchers.option_keys("slurm") == ["partition"]
    assert "partition" in launchers.launcher_options_schema()["properties"]
    assert launchers.check_options("slurm", {"partition": "a100"}) == {"partition": "a100"}
    with pytest.raises(ValueError, match=r"unknown keys \['image'\] for the 'slurm' launcher; allowed: partition"):
        launchers.check_options("slurm", {"image": "img:1"})

    class Clash:
        OPTION_SCHEMA = {"partition": {"type": "number"}}

    monkeypatch.setitem(launchers.LAUNCHERS, "clash", Clash)
    with pytest.raises(ValueError, match="option 'partition' with another schema"):
        launchers.launcher_options_schema()


def test_checkpoint_dir_names_the_settings(tmp_path):
    filtered = tmp_path / "filtered"  # the key hashes the filter step's manifest, nothing else of it
    filtered.mkdir()
    (filtered / "manifest.json").write_text('{"kept": 120, "shards": {"000000.tar": 120}}')

    def job(**kw):
        args = {"layout": RunLayout(str(tmp_path)), "stage": "sr256", "preset": "tiny", "data": str(filtered),
                "embeddings": "/e/enc-a", "max_steps": 10, **kw}
        return launch.stage_job(**args).checkpoint_dir

    same = job()
    assert same == job() and same.startswith(str(tmp_path / "checkpoints" / "sr256" / "tiny-"))
    assert len({same, job(max_steps=11), job(run_tag="again"), job(embeddings="/e/enc-b"),
                job(world_size=2), job(preset="sr256")}) == 6
    with pytest.raises(FileNotFoundError, match="manifest.json is missing: run the filter step"):
        job(data=str(tmp_path))
    (filtered / "manifest.json").write_text('{"kept": 119, "shards": {"000000.tar": 119}}')
    assert job() != same  # refiltered data: a new checkpoint directory


def test_local_launcher_in_process_is_the_clis_road(monkeypatch):
    """``in_process`` (the CLI's train verb) runs a one-process job here, through the worker's
    ``run``; several processes, and every job without it (the DAGs'), go to a child process."""
    _machine(monkeypatch, gpus=0, cores=2)
    calls = []
    monkeypatch.setattr("pipeline.train.worker.run", lambda job: calls.append(("here", 1)) or {"step": 1})
    monkeypatch.setattr(local, "train_subprocess", lambda argv, n, **kw: calls.append(("child", n)) or {"step": 2})
    job = TrainJob(stage="base64", preset="tiny", data="d", embeddings="e", checkpoint_dir="c")
    assert launchers.make_launcher("local", in_process=True).launch(job, 1, 1) == {"step": 1}
    assert launchers.make_launcher("local", in_process=True).launch(job, 1, 2) == {"step": 2}
    assert launchers.make_launcher("local").launch(job, 1, 1) == {"step": 2}
    assert calls == [("here", 1), ("child", 2), ("child", 1)]


def test_run_stage_refuses_the_in_process_hook_from_a_trigger_form(tmp_path):
    with pytest.raises(ValueError, match="unknown keys \\['in_process'\\]"):
        launch.run_stage(layout=RunLayout(str(tmp_path)), stage="base64", preset="tiny", data=str(tmp_path),
                         embeddings=str(tmp_path), max_steps=1, launcher_options={"in_process": True})


def test_run_stage_checks_options_against_the_chosen_launchers_schema(tmp_path, monkeypatch):
    """Kubernetes options given with the local launcher are refused before anything starts,
    naming the launcher and the keys it takes; the same options pass the kubernetes check."""
    monkeypatch.setattr(launch, "stage_job", _no_process)
    kw = {"layout": RunLayout(str(tmp_path)), "stage": "base64", "preset": "tiny", "data": str(tmp_path),
          "embeddings": str(tmp_path), "max_steps": 1}
    with pytest.raises(ValueError) as err:
        launch.run_stage(**kw, launcher="local", launcher_options={"image": "img:1", "namespace": "ml"})
    assert str(err.value) == ("launcher_options: unknown keys ['image', 'namespace'] for the 'local' launcher; "
                              "allowed: none (it takes no launcher_options)")
    with pytest.raises(ValueError, match=r"unknown keys \['nodes'\] for the 'kubernetes' launcher; "
                                         r"allowed: image, namespace, runtime, gpu_resource"):
        launch.run_stage(**kw, launcher="kubernetes", launcher_options={"image": "img:1", "nodes": 2})
    with pytest.raises(ValueError, match="unknown launcher 'slurm'"):
        launch.run_stage(**kw, launcher="slurm")
    assert launchers.check_options("kubernetes", {"image": "img:1", "namespace": "ml"}) == {
        "image": "img:1", "namespace": "ml"}
    assert launchers.check_options("local", None) == {}


# --- issue 24 item 7: no more local processes than the machine has devices --------------------

def _machine(monkeypatch, gpus: int, cores: int) -> None:
    from pipeline.train import torchrun

    monkeypatch.setattr(torchrun, "cuda_device_count", lambda: gpus)
    monkeypatch.setattr(torchrun.os, "cpu_count", lambda: cores)
    monkeypatch.delenv(torchrun.MAX_PROCESSES_ENV, raising=False)


def _no_process(*args, **kwargs):
    raise AssertionError("a process was started")


def test_local_process_limit_counts_gpus_else_cores(monkeypatch):
    from pipeline.train.torchrun import MAX_PROCESSES_ENV, local_process_limit

    _machine(monkeypatch, gpus=0, cores=4)
    assert local_process_limit() == (4, "has 4 CPU core(s)")
    _machine(monkeypatch, gpus=2, cores=16)
    assert local_process_limit() == (2, "has 2 CUDA device(s)")
    assert local_process_limit("cpu") == (16, "has 16 CPU core(s)")  # a CPU job on a GPU machine
    assert local_process_limit("cuda:1") == (2, "has 2 CUDA device(s)")
    monkeypatch.setenv(MAX_PROCESSES_ENV, "64")
    assert local_process_limit() == (64, f"is limited to 64 by {MAX_PROCESSES_ENV}=64")
    for bad in ("0", "-1", "lots", "1.5", "²"):
        monkeypatch.setenv(MAX_PROCESSES_ENV, bad)
        with pytest.raises(ValueError, match=f"^{MAX_PROCESSES_ENV}='{re.escape(bad)}': set it to"):
            local_process_limit()


def test_local_launcher_refuses_more_processes_than_the_machine_has(monkeypatch):
    """The trigger form allows nodes 1024 x gpus_per_node 64: the local launcher would start
    65,536 processes on one machine. It refuses, in one line that says what to pass."""
    _machine(monkeypatch, gpus=0, cores=4)
    monkeypatch.setattr(local, "train_subprocess", _no_process)
    monkeypatch.setattr(local, "train_local_nodes", _no_process)
    job = TrainJob(stage="base64", preset="tiny", data="d", embeddings="e", checkpoint_dir="c")
    for nodes, procs in ((1024, 64), (1, 5), (5, 1), (2, 3)):
        with pytest.raises(ValueError) as err:
            launchers.make_launcher("local").launch(job, nodes, procs)
        message = str(err.value)
        assert "\n" not in message and f"{nodes * procs} training processes" in message
        assert "4 CPU core(s)" in message and f"IMAGEN_LOCAL_MAX_PROCESSES={nodes * procs}" in message
        assert "--nproc-per-node" in message and "gpus_per_node" in message


def test_local_launcher_starts_what_fits_or_what_it_is_told(monkeypatch):
    _machine(monkeypatch, gpus=2, cores=64)
    calls = []
    monkeypatch.setattr(local, "train_subprocess",
                        lambda argv, n, **kw: calls.append(("one node", n, kw)) or {"step": 1})
    job = TrainJob(stage="base64", preset="tiny", data="d", embeddings="e", checkpoint_dir="c")
    assert launchers.make_launcher("local").launch(job, 1, 2) == {"step": 1}  # one process per GPU
    with pytest.raises(ValueError, match="3 training processes.*2 CUDA device"):
        launchers.make_launcher("local").launch(job, 1, 3)
    cpu_job = TrainJob(stage="base64", preset="tiny", data="d", embeddings="e", checkpoint_dir="c", device="cpu")
    assert launchers.make_launcher("local").launch(cpu_job, 1, 8) == {"step": 1}  # CPU training: the cores count
    # Told otherwise: the Python option (not a trigger-form key) and the deployment's variable.
    assert local.LocalLauncher(max_processes=4).launch(job, 1, 4) == {"step": 1}
    with pytest.raises(ValueError, match=r"5 training processes on this machine, which is limited to 4 by its "
                                         r"caller \(max_processes\)"):
        local.LocalLauncher(max_processes=4).launch(job, 1, 5)
    monkeypatch.setenv("IMAGEN_LOCAL_MAX_PROCESSES", "3")
    assert launchers.make_launcher("local").launch(job, 1, 3) == {"step": 1}
    with pytest.raises(ValueError, match="4 training processes on this machine, which is limited to 3 by "
                                         "IMAGEN_LOCAL_MAX_PROCESSES=3: ask for at most 3"):
        launchers.make_launcher("local").launch(job, 1, 4)
    assert [c[1] for c in calls] == [2, 8, 4, 3]


def test_several_local_nodes_are_checked_before_any_agent_starts(monkeypatch):
    _machine(monkeypatch, gpus=0, cores=2)
    job = TrainJob(stage="base64", preset="tiny", data="d", embeddings="e", checkpoint_dir="c")
    with pytest.raises(ValueError, match="3 node\\(s\\) x 1 process\\(es\\) per node = 3 training processes"):
        local.LocalLauncher(runner=_no_process).launch(job, 3, 1)
    with pytest.raises(ValueError, match="6 training processes"):
        local.train_local_nodes(["--stage", "base64"], 3, 2, runner=_no_process)
    started = []
    local.train_local_nodes(["--stage", "base64"], 2, 1,
                             runner=lambda cmds, envs: started.append(len(cmds)) or [['{"step": 1}'], []])
    assert started == [2]


def test_run_stage_from_the_trigger_form_refuses_65536_local_processes(tmp_path, monkeypatch):
    """The DAG's road: the trigger form's Params, validated as Airflow does, into run_stage."""
    import os
    import sys

    from airflow.sdk.definitions.param import ParamsDict

    _machine(monkeypatch, gpus=0, cores=4)
    monkeypatch.setattr("pipeline.train.torchrun.run_agents", _no_process)
    monkeypatch.setattr(local, "train_subprocess", _no_process)
    dags = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dags")
    sys.path.insert(0, dags)
    try:
        import imagen_common
    finally:
        sys.path.remove(dags)
    params = ParamsDict(imagen_common.train_params())
    for name, value in {"root": str(tmp_path), "nodes": 1024, "gpus_per_node": 64}.items():
        params[name] = value
    form = params.validate()  # the form accepts it: the Params' own bounds
    filtered = tmp_path / "filtered"
    filtered.mkdir()
    (filtered / "manifest.json").write_text('{"kept": 1, "shards": {"000000.tar": 1}}')
    with pytest.raises(ValueError, match=r"1024 node\(s\) x 64 process\(es\) per node = 65536 training processes "
                                         r"on this machine, which has 4 CPU core\(s\)"):
        imagen_common.train_stage({**form, "presets": {"base64": "tiny"}}, RunLayout(str(tmp_path)), "base64",
                                  str(tmp_path / "emb"))
    assert not list(tmp_path.rglob("result.json"))


def test_settings_key_is_the_dags_folder_key_and_counts_every_changed_option(tmp_path):
    """One owner for "the same settings": the DAG's folder key hashes job_settings, which adds
    any option a CLI user changed; where or how often a run is saved, printed or tracked is
    not a setting."""
    import dataclasses

    filtered = tmp_path / "filtered"
    filtered.mkdir()
    (filtered / "manifest.json").write_text('{"kept": 120}')
    job = launch.stage_job(RunLayout(str(tmp_path)), "base64", "tiny", "/e/enc-a", 10, data=str(filtered))
    legacy = launch.checkpoint_key({"stage": "base64", "preset": "tiny", "max_steps": 10,
                                    "data": launch.data_fingerprint(str(filtered)), "embeddings": "enc-a",
                                    "world_size": 1, "run_tag": ""})
    assert job.checkpoint_dir.endswith(f"tiny-{legacy}")  # folders named before this change are still found
    base = launch.job_settings(job, 1)
    same = dataclasses.replace(job, checkpoint_dir="/elsewhere", log_every=1, checkpoint_every=1, num_workers=4,
                               tracking_uri="off", resume=None)
    assert launch.job_settings(same, 1) == base
    changed = launch.job_settings(dataclasses.replace(job, lr=1e-3), 1)
    assert changed == {**base, "lr": 1e-3}
    assert launch._differences(base, changed) == "lr default -> 0.001"


def test_new_run_dir_is_the_first_free_numbered_sibling(tmp_path):
    run = tmp_path / "run1"
    assert launch.new_run_dir(str(run)) == str(run)  # nothing there yet: the folder itself
    run.mkdir()
    assert launch.new_run_dir(str(run)) == str(run)  # empty
    (run / "result.json").write_text("{}")
    assert launch.new_run_dir(str(run)) == f"{run}-2"
    (tmp_path / "run1-2").mkdir()
    assert launch.new_run_dir(str(run)) == f"{run}-3"
