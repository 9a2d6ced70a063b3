"""Launch training the same way on a laptop and on a cluster: launchers behind one tiny interface.

    from pipeline.train.launch import make_launcher, train_stage
    result = train_stage(job, make_launcher("local"), nodes=1, procs_per_node=2)
    result = train_stage(job, make_launcher("kubernetes", image="registry/imagen:0.1"), nodes=4,
                         procs_per_node=8)

A launcher has one method, ``launch(job, nodes, procs_per_node) -> summary``, and is chosen by
name from ``LAUNCHERS`` (``local``, ``kubernetes``), as img2dataset picks its distributors:

- ``local`` runs ``torchrun`` (or plain ``python -m pipeline.train`` for one process) as a
  subprocess, streams its output line by line (into the Airflow task log when called from a
  task) and fails with the trainer's last lines. ``nodes > 1`` starts that many torchrun
  agents on this machine, as the nodes of one job (pipeline/train/torchrun.py). Keeping training out of the caller's
  process keeps DataLoader workers and torch threads out of the Airflow task process.
  It refuses more processes (``nodes x procs_per_node``) than this machine has devices (CUDA
  devices, else CPU cores) unless ``IMAGEN_LOCAL_MAX_PROCESSES`` in the environment of the
  launching process, or ``LocalLauncher(max_processes=N)``, allows more.
- ``kubernetes`` renders a Kubeflow Trainer ``TrainJob`` running the same
  ``torchrun -m pipeline.train`` command on N nodes, submits it and waits for it.

``train_stage`` adds what makes a retry or a rerun cheap: the checkpoint directory is named
after the settings that decide the result (``checkpoint_key``), the trainer resumes from its
newest step checkpoint, and a finished run leaves ``result.json`` so the same settings later
reuse it instead of training again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import posixpath
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.proc import run_streaming

if TYPE_CHECKING:
    from pipeline.layout import RunLayout
    from pipeline.train.job import TrainJob
    from pipeline.train.torchrun import Torchrun

RESULT_NAME = "result.json"  # written last, after the trainer succeeded: the completion marker


def last_json(lines: list[str]) -> dict[str, Any]:
    """The JSON summary a verb prints as its last line."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("the child process printed no JSON summary; see its output above")


def torchrun_train(train_args: list[str], nproc_per_node: int = 1, max_processes: int | None = None) -> dict[str, Any]:
    """``torchrun --standalone`` over ``python -m pipeline.train``; returns rank 0's summary.
    Refuses more processes than this machine has devices (see :class:`LocalLauncher`)."""
    from pipeline.train.torchrun import Torchrun, check_local_processes, device_of, torchrun_command

    check_local_processes(1, nproc_per_node, device_of(train_args), max_processes)
    cmd = torchrun_command(Torchrun(1, nproc_per_node, standalone=True), train_args)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if nproc_per_node > 1 else {}
    return last_json(run_streaming(cmd, env=env))


def train_subprocess(train_args: list[str], nproc_per_node: int = 1, max_processes: int | None = None
                     ) -> dict[str, Any]:
    """Single process without torchrun, or torchrun for several."""
    if nproc_per_node > 1:
        return torchrun_train(train_args, nproc_per_node, max_processes)
    return last_json(run_streaming([sys.executable, "-m", "pipeline.train", *train_args]))


class Launcher(Protocol):
    """Runs one training job to completion and returns the trainer's summary
    (``{"checkpoint", "step", "loss", "run_id", "stage"}``; ``run_id`` may be None)."""

    def launch(self, job: TrainJob, nodes: int, procs_per_node: int) -> dict[str, Any]: ...


LAUNCHERS: dict[str, Callable[..., Launcher]] = {}


def register_launcher(name: str):
    """Class decorator: make a launcher available as ``make_launcher(name, **options)``."""
    def wrap(factory):
        LAUNCHERS[name] = factory
        return factory
    return wrap


def launcher_names() -> list[str]:
    return sorted(LAUNCHERS)


def make_launcher(name: str, **options: Any) -> Launcher:
    """The launcher called ``name``, built with its ``options`` (see each launcher's doc)."""
    if name not in LAUNCHERS:
        raise ValueError(f"unknown launcher {name!r}; choose one of {', '.join(sorted(LAUNCHERS))}")
    try:
        return LAUNCHERS[name](**options)
    except TypeError as e:
        raise TypeError(f"launcher {name!r} does not take these options: {e}. "
                        f"See the docstring of {LAUNCHERS[name].__name__}") from None


def train_node(train_args: list[str], spec: Torchrun, max_processes: int | None = None) -> dict[str, Any]:
    """This machine's node of a multi-node job (``imagen-pipeline train --nnodes N --node-rank R
    --master-addr HOST``): one torchrun agent, killed with its workers if this call is stopped;
    returns the summary this node's first process prints. Its ``nproc_per_node`` processes
    must fit this machine's devices (see :class:`LocalLauncher`)."""
    from pipeline.train.torchrun import (
        check_local_processes,
        device_of,
        run_agents,
        torchrun_command,
    )

    check_local_processes(1, spec.nproc_per_node, device_of(train_args), max_processes)
    (lines,) = run_agents([torchrun_command(spec, train_args)])
    return last_json(lines)


def train_local_nodes(train_args: list[str], nodes: int, procs_per_node: int,
                      runner: Callable[..., list[list[str]]] | None = None,
                      max_processes: int | None = None) -> dict[str, Any]:
    """``nodes`` torchrun agents on this machine as the nodes of one job (127.0.0.1, a free
    port, node ranks 0..nodes-1, each with its own GPUs); waits for all, kills every agent's
    process group when one fails, and returns node 0's summary (global rank 0's). Refuses
    more processes than this machine has devices (see :class:`LocalLauncher`)."""
    from pipeline.train.torchrun import (
        check_local_processes,
        device_of,
        local_node_commands,
        local_node_envs,
        run_agents,
    )

    check_local_processes(nodes, procs_per_node, device_of(train_args), max_processes)
    cmds = local_node_commands(train_args, nodes, procs_per_node)
    lines = (runner or run_agents)(cmds, local_node_envs(nodes, procs_per_node, os.environ))
    return last_json(lines[0])


@register_launcher("local")
class LocalLauncher:
    """``torchrun`` on this machine: ``--standalone`` for one node, and for ``nodes > 1`` that
    many agents, one per node, meeting on 127.0.0.1 (tests, a workstation with several GPUs:
    agent ``i`` gets GPUs ``i*procs_per_node ..``). For nodes on several machines, use the
    ``kubernetes`` launcher, or ``imagen-pipeline train --nnodes`` on each machine.

    ``in_process=True`` (the CLI's ``train`` verb; never a trigger-form option) trains a
    one-process job in the caller's process instead of a child ``python -m pipeline.train``;
    several processes always run under torchrun. ``runner`` (tests) replaces
    :func:`pipeline.train.torchrun.run_agents` for several nodes.

    ``nodes x procs_per_node`` processes all run here, so at most one per device: the visible
    CUDA devices, or the CPU cores for a CPU job or a machine without GPUs. More is refused
    before anything starts, unless ``max_processes=N`` (Python only, not a trigger-form option)
    or ``IMAGEN_LOCAL_MAX_PROCESSES=N`` in the environment of the launching process (the
    deployment's Airflow workers, or the shell of ``imagen-pipeline train``) allows N.
    """

    def __init__(self, *, in_process: bool = False, runner: Callable[..., list[list[str]]] | None = None,
                 max_processes: int | None = None):
        self.in_process = in_process
        self.runner = runner
        self.max_processes = max_processes

    def launch(self, job: TrainJob, nodes: int, procs_per_node: int) -> dict[str, Any]:
        from pipeline.train.job import job_to_argv
        from pipeline.train.torchrun import check_local_processes

        if nodes < 1 or procs_per_node < 1:
            raise ValueError(f"nodes and procs_per_node must be at least 1, got {nodes} and {procs_per_node}")
        check_local_processes(nodes, procs_per_node, job.device, self.max_processes)
        checked = nodes * procs_per_node  # passed on as the limit: no second count of the devices
        if nodes > 1:
            return train_local_nodes(job_to_argv(job), nodes, procs_per_node, self.runner, max_processes=checked)
        if self.in_process and procs_per_node == 1:
            from pipeline.train.worker import run

            return run(job)
        return train_subprocess(job_to_argv(job), procs_per_node, max_processes=checked)


def checkpoint_key(settings: dict[str, Any]) -> str:
    """A short, stable name for the settings that decide a training result: the same settings
    give the same checkpoint directory, so a retry resumes it and a rerun reuses it."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def data_fingerprint(filtered: str) -> str:
    """Hash of the filtered shards' manifest (it records the input shards and filter settings),
    so new or refiltered data gets a new checkpoint directory."""
    from pipeline import storage
    from pipeline.layout import manifest_sha256

    digest = manifest_sha256(filtered)
    if digest is None:
        uri = storage.join(filtered, "manifest.json")
        raise FileNotFoundError(f"{uri} is missing: run the filter step on {filtered} first")
    return digest[:16]


def train_stage(job: TrainJob, launcher: Launcher, nodes: int = 1, procs_per_node: int = 1
                ) -> dict[str, Any]:
    """Train ``job`` with ``launcher`` unless ``job.checkpoint_dir`` already holds a finished
    result; returns the trainer's summary plus ``"reused": bool``.

    ``job.resume`` should be ``"latest"`` so a retry after a crash continues from the newest
    step checkpoint instead of starting over.
    """
    from imagen.checkpoint import CONFIG_NAME
    from pipeline import storage

    marker = storage.join(job.checkpoint_dir, RESULT_NAME)
    if storage.exists(marker):
        done = storage.read_json(marker)
        if done.get("checkpoint") and storage.exists(storage.join(done["checkpoint"], CONFIG_NAME)):
            print(f"[launch] {job.stage}: reusing the finished run in {job.checkpoint_dir} "
                  f"(step {done.get('step')}); change a training setting or run_tag to train again",
                  flush=True)
            return {**done, "reused": True}
    result = {"root": job.root, **launcher.launch(job, nodes, procs_per_node)}
    storage.write_json(marker, result)  # the run's completion marker, written last
    return {**result, "reused": False}


# --- Kubernetes: a Kubeflow Trainer v2 TrainJob per stage -------------------------------------

TRAINJOB = {"group": "trainer.kubeflow.org", "version": "v1alpha1", "plural": "trainjobs"}
# The command is torchrun_command's (pipeline/train/torchrun.py), as for the local launcher, minus
# --node-rank/--master-addr/--master-port: torchrun reads them from the PET_* variables that the
# Trainer's torch runtime sets on every pod.
NODE = "node"  # replicated job and container name in Kubeflow's torch-distributed runtime


# --- launcher_options: typed fields; image and volume claims from the deployment's allowlists --

IMAGES_ENV = "IMAGEN_K8S_IMAGES"  # comma-separated images (an entry ending in * is a prefix)
VOLUME_CLAIMS_ENV = "IMAGEN_K8S_VOLUME_CLAIMS"  # comma-separated PersistentVolumeClaim names
POD_MLFLOW_ENV = "IMAGEN_K8S_MLFLOW_TRACKING_URI"  # the pods' MLflow (default: the worker's own)
_DNS = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
# Mounting over these would hide or replace the image's system, its Python packages
# (/usr/local, the user site under /home), or the code itself (/opt/imagen, the workdir).
SYSTEM_DIRS = frozenset({"bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "opt", "proc",
                         "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var"})
_NOT_SYSTEM = "|".join(sorted(SYSTEM_DIRS))
# JSON schema of each option: the Airflow Param uses it as is, KubernetesOptions.parse checks it.
OPTION_SCHEMA: dict[str, dict[str, Any]] = {
    "image": {"type": "string", "maxLength": 512,
              "pattern": r"^[a-z0-9][a-z0-9._/:-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?$",
              "description": f"container image, one of the deployment's {IMAGES_ENV}"},
    "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
    "runtime": {"type": "string", "pattern": _DNS, "description": "ClusterTrainingRuntime name"},
    "gpu_resource": {"type": "string", "pattern": r"^$|^[a-z0-9.-]+/[a-z0-9._-]+$",
                     "description": 'extended resource per GPU, e.g. nvidia.com/gpu; "" for CPU nodes'},
    "cpu": {"type": "string", "pattern": r"^[0-9]{1,4}(\.[0-9]{1,3})?m?$"},
    "memory": {"type": "string", "pattern": r"^[0-9]{1,6}(\.[0-9]{1,3})?([KMGTPE]i?|k)?$"},
    "volume_claim": {"type": ["null", "string"], "pattern": _DNS,
                     "description": f"PersistentVolumeClaim, one of the deployment's {VOLUME_CLAIMS_ENV}"},
    "mount_path": {"type": "string", "pattern": rf"^(?!/({_NOT_SYSTEM})(/|$))(/[A-Za-z0-9_][A-Za-z0-9._-]*)+$",
                   "description": "where the claim is mounted: absolute, not / or a system directory"},
    "poll_seconds": {"type": "number", "minimum": 1, "maximum": 3600},
    "timeout_seconds": {"type": "number", "minimum": 60, "maximum": 90 * 24 * 3600},
}


def launcher_options_schema() -> dict[str, Any]:
    """The JSON schema of ``launcher_options`` (for the trigger form's Param)."""
    return {"type": "object", "additionalProperties": False, "properties": copy.deepcopy(OPTION_SCHEMA)}


def _allowlist(env_var: str) -> list[str]:
    return [x.strip() for x in os.environ.get(env_var, "").split(",") if x.strip()]


def _allowed(value: str, env_var: str, what: str) -> None:
    allowed = _allowlist(env_var)
    if not any(value == a or (a.endswith("*") and value.startswith(a[:-1])) for a in allowed):
        listed = f"allowed: {', '.join(allowed)}" if allowed else "the deployment allows none"
        raise ValueError(f"launcher_options: {what} {value!r} is not allowed ({listed}); the deployment "
                         f"lists them in {env_var} (comma-separated) in the Airflow services' environment")


@dataclasses.dataclass(frozen=True)
class KubernetesOptions:
    """What a trigger form may set for a TrainJob (``launcher_options``); nothing else gets in.

    ``image`` must be listed in ``IMAGEN_K8S_IMAGES`` and ``volume_claim`` in
    ``IMAGEN_K8S_VOLUME_CLAIMS``; ``mount_path`` is absolute and not ``/`` or a system directory.
    """

    image: str = ""
    namespace: str = "default"
    runtime: str = "torch-distributed"
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = "8"
    memory: str = "64Gi"
    volume_claim: str | None = None
    mount_path: str = "/data"
    poll_seconds: float = 30.0
    timeout_seconds: float = 14 * 24 * 3600.0

    @classmethod
    def parse(cls, options: dict[str, Any]) -> KubernetesOptions:
        """Check ``options`` against the schema and the allowlists; one-line ValueError if not."""
        unknown = sorted(set(options) - set(OPTION_SCHEMA))
        if unknown:
            raise ValueError(f"launcher_options: unknown keys {unknown}; allowed: {', '.join(OPTION_SCHEMA)}")
        for key, value in options.items():
            _check_value(key, value, OPTION_SCHEMA[key])
        opts = cls(**options)
        if not opts.image:
            raise ValueError("the kubernetes launcher needs an image: build infra/Dockerfile, push it, list it in "
                             f"{IMAGES_ENV}, and pass launcher_options={{'image': 'REGISTRY/imagen-pipeline:TAG'}}")
        _allowed(opts.image, IMAGES_ENV, "image")
        if opts.volume_claim:
            _allowed(opts.volume_claim, VOLUME_CLAIMS_ENV, "volume_claim")
        parts = opts.mount_path.split("/")[1:]
        if posixpath.normpath(opts.mount_path) != opts.mount_path or parts[0] in SYSTEM_DIRS:
            raise ValueError(f"launcher_options: mount_path {opts.mount_path!r} is a system directory or not a "
                             "plain absolute path; mount the data volume at e.g. /data")
        return opts


def _check_value(key: str, value: Any, schema: dict[str, Any]) -> None:
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    ok = ((value is None and "null" in types) or (isinstance(value, str) and "string" in types)
          or (isinstance(value, int | float) and not isinstance(value, bool) and "number" in types))
    if not ok:
        raise ValueError(f"launcher_options: {key} must be {' or '.join(types)}, got {value!r}")
    if isinstance(value, str) and (len(value) > schema.get("maxLength", 253)
                                   or not re.fullmatch(schema["pattern"], value)):
        why = f" ({schema['description']})" if "description" in schema else ""
        raise ValueError(f"launcher_options: {key}={value!r} is not a valid {key}{why}")
    if isinstance(value, int | float) and not schema["minimum"] <= value <= schema["maximum"]:
        raise ValueError(f"launcher_options: {key}={value} is out of [{schema['minimum']}, {schema['maximum']}]")


def pod_env() -> dict[str, str]:
    """The training pods' environment: set by the deployment, never by a trigger form."""
    env = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    uri = os.environ.get(POD_MLFLOW_ENV) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def trainjob_name(job: TrainJob) -> str:
    """Stable per checkpoint directory: a retried task finds the job its first try submitted."""
    from pipeline import storage

    digest = hashlib.sha256(storage.normalize(job.checkpoint_dir).encode()).hexdigest()[:10]
    return f"imagen-{job.stage}-{digest}"


def render_trainjob(job: TrainJob, nodes: int, procs_per_node: int, **options: Any) -> dict[str, Any]:
    """The TrainJob manifest for ``job`` (a plain dict, ready for the API or ``kubectl apply``).

    ``options`` are :class:`KubernetesOptions` fields, checked here (the one place a TrainJob is
    rendered): unknown keys, an image or volume claim outside the deployment's allowlists, and
    a system ``mount_path`` are refused. ``procs_per_node`` GPUs of ``gpu_resource`` per node
    (``gpu_resource=""`` for CPU nodes); ``volume_claim`` mounts a PersistentVolumeClaim at
    ``mount_path``, where the data root of the job's paths must live (object-store roots need
    no volume). The pods' environment comes from the deployment (:func:`pod_env`) only.
    """
    from pipeline.train.job import job_to_argv
    from pipeline.train.torchrun import CLUSTER_PROGRAM, Torchrun, torchrun_command

    opts = KubernetesOptions.parse(options)
    limits = {"cpu": opts.cpu, "memory": opts.memory}
    if opts.gpu_resource:
        limits[opts.gpu_resource] = str(procs_per_node)
    args = job_to_argv(job)
    command = torchrun_command(Torchrun(nodes, procs_per_node), args, program=CLUSTER_PROGRAM)
    trainer = {"image": opts.image, "command": command[:len(command) - len(args)], "args": args,
               "numNodes": nodes, "numProcPerNode": procs_per_node,
               "resourcesPerNode": {"limits": limits, "requests": {"cpu": opts.cpu, "memory": opts.memory}},
               "env": [{"name": k, "value": v} for k, v in sorted(pod_env().items())]}
    spec: dict[str, Any] = {"runtimeRef": {"name": opts.runtime}, "trainer": trainer}
    if opts.volume_claim:
        spec["runtimePatches"] = [_volume_patch(opts.volume_claim, opts.mount_path)]
    return {"apiVersion": f"{TRAINJOB['group']}/{TRAINJOB['version']}", "kind": "TrainJob",
            "metadata": {"name": trainjob_name(job), "namespace": opts.namespace,
                         "labels": {"app.kubernetes.io/part-of": "imagen-pipeline",
                                    "imagen-pipeline/stage": job.stage}},
            "spec": spec}


def _volume_patch(claim: str, mount_path: str) -> dict[str, Any]:
    pod = {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
           "containers": [{"name": NODE, "volumeMounts": [{"name": "data", "mountPath": mount_path}]}]}
    job_patch = {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}
    return {"manager": "imagen-pipeline",
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job_patch]}}}}


def trainjob_state(obj: dict[str, Any]) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", message) from a TrainJob's status conditions."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"], f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return "Running", ""


@register_launcher("kubernetes")
class KubernetesLauncher:
    """Submit a Kubeflow Trainer ``TrainJob`` (the cluster needs Kubeflow Trainer v2 and its
    ``torch-distributed`` ClusterTrainingRuntime) and wait for it.

    Options: the fields of :class:`KubernetesOptions` (``image`` required; image and volume
    claim from the deployment's allowlists), checked when the launcher is made. ``api`` (a
    ``kubernetes.client.CustomObjectsApi``; by default built from the in-cluster config, else
    ``~/.kube/config``) and ``sleep`` are hooks for tests, not launcher options.
    """

    def __init__(self, *, api: Any = None, sleep=None, **options: Any):
        import time

        # Fail at construction (the task's first line), not after the job was rendered.
        self.options = KubernetesOptions.parse(options)
        self.namespace = self.options.namespace
        self.poll_seconds, self.timeout_seconds = self.options.poll_seconds, self.options.timeout_seconds
        self._api, self._sleep, self._clock = api, sleep or time.sleep, time.monotonic

    def render(self, job: TrainJob, nodes: int, procs_per_node: int) -> dict[str, Any]:
        return render_trainjob(job, nodes, procs_per_node, **dataclasses.asdict(self.options))

    def launch(self, job: TrainJob, nodes: int, procs_per_node: int) -> dict[str, Any]:
        body = self.render(job, nodes, procs_per_node)
        name = body["metadata"]["name"]
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            raise RuntimeError("the kubernetes launcher needs the Kubernetes client in the Airflow "
                               "workers' environment: pip install kubernetes==37.0.1") from None
        api = self._api or _custom_objects_api()
        self._submit(api, body)
        self._wait(api, name)
        from pipeline import storage

        return {"checkpoint": storage.join(job.checkpoint_dir, "final"), "stage": job.stage, "root": job.root,
                "step": job.max_steps, "loss": None, "run_id": None,
                "job": f"{self.namespace}/{name}"}

    def _submit(self, api: Any, body: dict[str, Any]) -> None:
        """Create the TrainJob; on a retry, attach to the one already there, or replace it
        if it failed (the new one resumes from the newest checkpoint)."""
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        try:
            api.create_namespaced_custom_object(**TRAINJOB, namespace=self.namespace, body=body)
            print(f"[launch] submitted TrainJob {self.namespace}/{name}", flush=True)
            return
        except ApiException as e:
            if e.status != 409:
                raise RuntimeError(f"could not create TrainJob {self.namespace}/{name}: {e.status} "
                                   f"{e.reason}; check that Kubeflow Trainer is installed and that "
                                   "this service account may create trainjobs") from None
        state, _ = trainjob_state(self._get(api, name))
        if state != "Failed":
            print(f"[launch] TrainJob {self.namespace}/{name} exists ({state}): waiting for it", flush=True)
            return
        print(f"[launch] TrainJob {self.namespace}/{name} failed before: replacing it", flush=True)
        api.delete_namespaced_custom_object(**TRAINJOB, namespace=self.namespace, name=name,
                                            propagation_policy="Foreground")
        self._wait_deleted(api, name)
        api.create_namespaced_custom_object(**TRAINJOB, namespace=self.namespace, body=body)

    def _get(self, api: Any, name: str) -> dict[str, Any]:
        return api.get_namespaced_custom_object(**TRAINJOB, namespace=self.namespace, name=name)

    def _wait_deleted(self, api: Any, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        deadline = self._clock() + 600
        while self._clock() < deadline:
            try:
                self._get(api, name)
            except ApiException as e:
                if e.status == 404:
                    return
                raise
            self._sleep(self.poll_seconds)
        raise TimeoutError(f"TrainJob {self.namespace}/{name} was not deleted within 10 minutes")

    def _wait(self, api: Any, name: str) -> None:
        deadline, last = self._clock() + self.timeout_seconds, None
        while self._clock() < deadline:
            state, message = trainjob_state(self._get(api, name))
            if state != last:
                print(f"[launch] TrainJob {self.namespace}/{name}: {state} {message}".rstrip(), flush=True)
                last = state
            if state == "Complete":
                return
            if state == "Failed":
                raise RuntimeError(
                    f"TrainJob {self.namespace}/{name} failed: {message}. Its logs: kubectl logs -n "
                    f"{self.namespace} -l jobset.sigs.k8s.io/jobset-name={name} --tail 100")
            self._sleep(self.poll_seconds)
        raise TimeoutError(f"TrainJob {self.namespace}/{name} did not finish within "
                           f"{self.timeout_seconds:.0f}s; it is still running on the cluster")


def _custom_objects_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def stage_job(layout: RunLayout, stage: str, preset: str, embeddings: str, max_steps: int,
              world_size: int = 1, run_tag: str = "", data: str | None = None) -> TrainJob:
    """The TrainJob of one stage of the run ``layout``, in ``layout.checkpoints(stage,
    "<preset>-<key>")``, where the key hashes everything that decides the result
    (``checkpoint_key``). ``data``: the filtered shards (default: ``layout.filtered``)."""
    from pipeline import storage
    from pipeline.train.job import TrainJob

    data = data or layout.filtered
    key = checkpoint_key({"stage": stage, "preset": preset, "max_steps": max_steps,
                          "data": data_fingerprint(data), "embeddings": storage.basename(embeddings),
                          "world_size": world_size, "run_tag": run_tag})
    return TrainJob(stage=stage, preset=preset, data=data, embeddings=embeddings,
                    checkpoint_dir=layout.checkpoints(stage, f"{preset}-{key}"), root=layout.root,
                    max_steps=max_steps, resume="latest", run_name=f"{stage}-{preset}-{key}")


def run_stage(*, layout: RunLayout, stage: str, preset: str, embeddings: str, max_steps: int,
              data: str | None = None, launcher: str = "local", launcher_options: dict[str, Any] | None = None,
              nodes: int = 1, procs_per_node: int = 1, run_tag: str = "") -> dict[str, Any]:
    """One call for an orchestrator task: build the stage's job under ``layout``, pick the
    launcher by name, train (or reuse a finished run with the same settings)."""
    if not isinstance(launcher_options or {}, dict):
        raise ValueError(f"launcher_options must be an object, got {type(launcher_options).__name__}")
    options = dict(launcher_options or {})
    if not set(options) <= set(OPTION_SCHEMA):
        # Only schema fields come from a trigger form: never the Python-only hooks (api, sleep).
        raise ValueError(f"launcher_options: unknown keys {sorted(set(options) - set(OPTION_SCHEMA))}; "
                         f"allowed: {', '.join(OPTION_SCHEMA)}")
    runner = make_launcher(launcher, **options)  # checks the options before anything else
    job = stage_job(layout, stage, preset, embeddings, max_steps, nodes * procs_per_node, run_tag, data)
    return train_stage(job, runner, nodes, procs_per_node)
