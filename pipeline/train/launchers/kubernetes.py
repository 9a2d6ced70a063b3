"""The ``kubernetes`` launcher: a Kubeflow Trainer v2 ``TrainJob`` per training stage.

    from pipeline.train.launchers.kubernetes import KubernetesLauncher, render_trainjob
    KubernetesLauncher(image="registry/imagen-pipeline:0.1").launch(job, nodes=4, procs_per_node=8)
    render_trainjob(job, 4, 8, image="registry/imagen-pipeline:0.1")   # the manifest, for kubectl

The TrainJob runs the same ``torchrun -m pipeline.train`` command as the local launcher on N
nodes (``pipeline/train/torchrun.py``); the launcher submits it, waits for it, and on a retry
attaches to the job its first try submitted (or replaces it if it failed).

Its options (``launcher_options`` on the trigger form) are :class:`KubernetesOptions`, typed by
``OPTION_SCHEMA`` (the JSON schema the Airflow Param uses as is). The deployment decides what
a form may pick, in the Airflow services' environment: ``IMAGEN_K8S_IMAGES`` (comma-separated
images; an entry ending in ``*`` is a prefix), ``IMAGEN_K8S_VOLUME_CLAIMS`` (PersistentVolumeClaim
names) and ``IMAGEN_K8S_MLFLOW_TRACKING_URI`` (the pods' MLflow; default: the worker's own).
The ``kubernetes`` client is imported only when a job is submitted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.train.job import TrainJob

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
# JSON schema of each option: the Airflow Param uses it as is (pipeline.train.launchers), and
# KubernetesOptions.parse checks it.
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


class KubernetesLauncher:
    """Submit a Kubeflow Trainer ``TrainJob`` (the cluster needs Kubeflow Trainer v2 and its
    ``torch-distributed`` ClusterTrainingRuntime) and wait for it.

    Options: the fields of :class:`KubernetesOptions` (``image`` required; image and volume
    claim from the deployment's allowlists), checked when the launcher is made. ``api`` (a
    ``kubernetes.client.CustomObjectsApi``; by default built from the in-cluster config, else
    ``~/.kube/config``) and ``sleep`` are hooks for tests, not launcher options.
    """

    OPTION_SCHEMA = OPTION_SCHEMA  # what a trigger form may set (pipeline.train.launchers)

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
        from pipeline.layout import RunDir

        return {"checkpoint": RunDir(job.checkpoint_dir).final, "stage": job.stage, "root": job.root,
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
