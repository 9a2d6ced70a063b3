"""The Kubernetes launcher without a cluster: the rendered TrainJob matches a golden file and
the API schemas (Kubeflow Trainer's models, core v1 Pod schema for the container parts), and
the submit/wait logic is driven through a CustomObjectsApi mocked at its boundary. Also checks
that infra/k8s/ manifests validate against the Kubernetes 1.37 schemas.

Regenerate the golden file after an intended change: UPDATE_GOLDEN=1 pytest tests/unit/test_launch_k8s.py
"""

import glob
import json
import os
from unittest import mock

import pytest

from pipeline.layout import RunLayout
from pipeline.train import launch, launchers
from pipeline.train.job import TrainJob, job_to_argv
from pipeline.train.launchers import kubernetes as k8s

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes launcher's client: pip install kubernetes")
kv = pytest.importorskip("kubernetes_validate", reason="schema checks need kubernetes-validate")
trainer_models = pytest.importorskip("kubeflow_trainer_api.models",
                                     reason="TrainJob checks need kubeflow-trainer-api")
yaml = pytest.importorskip("yaml")

from kubernetes.client import CustomObjectsApi  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(REPO, "tests", "golden", "trainjob_sr256.json")
K8S_VERSION = "1.37.0"


def sr256_job() -> TrainJob:
    return TrainJob(stage="sr256", preset="sr256", data="/data/imagen/filtered",
                    embeddings="/data/imagen/embeddings/google-t5-v1_1-xxl",
                    checkpoint_dir="/data/imagen/checkpoints/sr256/sr256-0123456789ab", max_steps=2500000,
                    resume="latest", run_name="sr256-sr256-0123456789ab")


@pytest.fixture(autouse=True)
def deployment(monkeypatch):
    """The allowlists a deployment sets in the Airflow services' environment."""
    monkeypatch.setenv("IMAGEN_K8S_IMAGES", "registry.example.com/imagen-pipeline:*, img:1")
    monkeypatch.setenv("IMAGEN_K8S_VOLUME_CLAIMS", "imagen-data,scratch")
    monkeypatch.setenv("IMAGEN_K8S_MLFLOW_TRACKING_URI", "http://mlflow.ml.svc:5000")


def render(**kw):
    opts = {"image": "registry.example.com/imagen-pipeline:0.1.0", "namespace": "ml",
            "volume_claim": "imagen-data", "mount_path": "/data", **kw}
    return k8s.render_trainjob(sr256_job(), 4, 8, **opts)


def test_trainjob_matches_golden_file():
    manifest = render()
    if os.environ.get("UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        assert manifest == json.load(f)


def test_trainjob_runs_the_local_command_on_every_node():
    """One builder (pipeline.train.torchrun.torchrun_command) for both: the pod runs what
    ``imagen-pipeline train --nnodes 4 --nproc-per-node 8 --node-rank R --master-addr ..``
    runs, minus the per-pod flags Kubeflow's runtime sets as PET_NODE_RANK/PET_MASTER_*."""
    from pipeline.train.torchrun import LOCAL_PROGRAM, Torchrun, torchrun_command

    trainer = render()["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "--nnodes=4", "--nproc-per-node=8", "-m", "pipeline.train"]
    assert trainer["args"] == job_to_argv(sr256_job())  # the very flags the local launcher passes
    local = torchrun_command(Torchrun(4, 8, node_rank=2, master_addr="10.0.0.5", master_port=29500),
                             job_to_argv(sr256_job()))
    from_pod_env = ("--node-rank=", "--master-addr=", "--master-port=")
    assert trainer["command"][1:] + trainer["args"] == [
        x for x in local[len(LOCAL_PROGRAM):] if not x.startswith(from_pod_env)]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert "nvidia.com/gpu" not in render(gpu_resource="")["spec"]["trainer"]["resourcesPerNode"]["limits"]


def test_trainjob_is_valid_against_the_trainer_api_models():
    for manifest in (render(), render(volume_claim=None)):
        model = trainer_models.TrainerV1alpha1TrainJob.from_dict(manifest)
        # from_dict drops unknown keys and strict types reject wrong ones: a round trip that
        # gives back the same dict means every field is known and well typed.
        assert model.to_dict() == manifest
    broken = render()
    broken["spec"]["trainer"]["numNodes"] = "4"
    with pytest.raises(ValueError, match="numNodes"):
        trainer_models.TrainerV1alpha1TrainJob.from_dict(broken)


def test_trainjob_container_parts_are_valid_core_v1():
    """The trainer's container and the patched volume, assembled as the Pod they become."""
    manifest = render()
    t = manifest["spec"]["trainer"]
    patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod_spec = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    container = {"name": "node", "image": t["image"], "command": t["command"], "args": t["args"],
                 "env": t["env"], "resources": t["resourcesPerNode"],
                 "volumeMounts": pod_spec["containers"][0]["volumeMounts"]}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**manifest["metadata"]},
           "spec": {"containers": [container], "volumes": pod_spec["volumes"]}}
    kv.validate(pod, K8S_VERSION, strict=True)
    container["volumeMount"] = container.pop("volumeMounts")  # a typo the strict schema rejects
    with pytest.raises(kv.ValidationError):
        kv.validate(pod, K8S_VERSION, strict=True)


def test_trainjob_name_is_a_dns_label_stable_per_checkpoint_dir():
    name = render()["metadata"]["name"]
    assert name == k8s.trainjob_name(sr256_job()) and len(name) <= 63
    assert name.replace("-", "").isalnum() and name == name.lower()
    other = TrainJob(**{**sr256_job().__dict__, "checkpoint_dir": "/data/imagen/checkpoints/sr256/x"})
    assert k8s.trainjob_name(other) != name


def test_kubernetes_launcher_rejects_unknown_options():
    with pytest.raises(ValueError, match=r"unknown keys \['gpus'\]; allowed: image, namespace"):
        launchers.make_launcher("kubernetes", image="img:1", gpus=8)


def test_kubernetes_launcher_needs_an_image():
    with pytest.raises(ValueError, match="needs an image.*infra/Dockerfile.*IMAGEN_K8S_IMAGES"):
        launchers.make_launcher("kubernetes")


# --- launcher_options: a schema and the deployment's allowlists ------------------------------

@pytest.mark.parametrize("options, error", [
    ({"image": "evil.example.com/miner:latest"}, r"image 'evil.example.com/miner:latest' is not allowed "
                                                 r"\(allowed: registry.example.com/imagen-pipeline:\*, img:1\)"),
    ({"image": "registry.example.com/imagen-pipeline-evil:1"}, "is not allowed"),
    ({"env": {"LD_PRELOAD": "/data/x.so"}}, r"unknown keys \['env'\]"),
    ({"volumes": [{"hostPath": {"path": "/"}}]}, r"unknown keys \['volumes'\]"),
    ({"volume_claim": "someone-elses-data"}, "volume_claim 'someone-elses-data' is not allowed.*IMAGEN_K8S_VOLUME"),
    ({"mount_path": "/"}, "mount_path='/' is not a valid mount_path"),
    ({"mount_path": "/etc"}, "mount_path='/etc' is not a valid mount_path.*not / or a system directory"),
    ({"mount_path": "/opt/imagen"}, "mount_path='/opt/imagen' is not a valid mount_path"),
    ({"mount_path": "/usr/local/lib"}, "is not a valid mount_path"),
    ({"mount_path": "/data/x"}, None),  # fine
    ({"mount_path": "/optical"}, None),
    ({"mount_path": "/data/../etc"}, "is not a valid mount_path"),
    ({"mount_path": "data"}, "is not a valid mount_path"),
    ({"namespace": "kube-system; rm"}, "namespace='kube-system; rm' is not a valid namespace"),
    ({"gpu_resource": "memory"}, "is not a valid gpu_resource"),
    ({"cpu": 8}, "cpu must be string, got 8"),
    ({"poll_seconds": True}, "poll_seconds must be number"),
    ({"poll_seconds": 0}, r"poll_seconds=0 is out of \[1, 3600\]"),
])
def test_render_refuses_what_the_deployment_did_not_allow(options, error):
    if error is None:
        assert render(**options)["spec"]["runtimePatches"]
        return
    with pytest.raises(ValueError, match=error) as caught:
        render(**options)
    assert "\n" not in str(caught.value)  # one line
    with pytest.raises(ValueError, match=error):
        launchers.make_launcher("kubernetes", **{"image": "img:1", **options})


def test_no_image_is_allowed_without_the_deployment_allowlist(monkeypatch):
    monkeypatch.delenv("IMAGEN_K8S_IMAGES")
    with pytest.raises(ValueError, match=r"image 'img:1' is not allowed \(the deployment allows none\).*"
                                         r"IMAGEN_K8S_IMAGES"):
        render(image="img:1")
    monkeypatch.setenv("IMAGEN_K8S_IMAGES", "img:1")
    monkeypatch.delenv("IMAGEN_K8S_VOLUME_CLAIMS")
    with pytest.raises(ValueError, match="volume_claim 'imagen-data' is not allowed"):
        render(image="img:1")
    assert "runtimePatches" not in render(image="img:1", volume_claim=None)["spec"]  # no volume: fine


def test_pod_env_comes_from_the_deployment_only(monkeypatch):
    env = {e["name"]: e["value"] for e in render()["spec"]["trainer"]["env"]}
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow.ml.svc:5000", "MLFLOW_DISABLE_TELEMETRY": "true"}
    monkeypatch.delenv("IMAGEN_K8S_MLFLOW_TRACKING_URI")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # the Airflow worker's own
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"} in render()["spec"]["trainer"]["env"]


def test_run_stage_takes_only_schema_fields(tmp_path):
    for options in ({"api": "x"}, {"sleep": 0}, ["image"]):
        with pytest.raises(ValueError, match="launcher_options"):
            launch.run_stage(layout=RunLayout(str(tmp_path)), stage="base64", preset="tiny", data=str(tmp_path),
                             embeddings=str(tmp_path), max_steps=1, launcher="kubernetes",
                             launcher_options=options)
    # the local launcher takes none of the kubernetes launcher's options from a trigger form
    with pytest.raises(ValueError, match=r"unknown keys \['image'\] for the 'local' launcher; allowed: none"):
        launch.run_stage(layout=RunLayout(str(tmp_path)), stage="base64", preset="tiny", data=str(tmp_path),
                         embeddings=str(tmp_path), max_steps=1, launcher_options={"image": "img:1"})


def test_param_schema_refuses_what_render_refuses():
    jsonschema = pytest.importorskip("jsonschema")
    schema = launchers.launcher_options_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    valid = jsonschema.Draft7Validator(schema)
    good = {"image": "registry.example.com/imagen-pipeline:0.1.0", "namespace": "ml", "runtime": "torch-distributed",
            "gpu_resource": "nvidia.com/gpu", "cpu": "8", "memory": "64Gi", "volume_claim": "imagen-data",
            "mount_path": "/data", "poll_seconds": 30, "timeout_seconds": 3600}
    assert valid.is_valid(good) and valid.is_valid({}) and valid.is_valid({"volume_claim": None})
    assert schema == launchers.options_schema("kubernetes")  # the local launcher adds no keys
    for bad in ({"env": {"LD_PRELOAD": "x"}}, {"image": 1}, {"mount_path": "/"}, {"mount_path": "data"},
                {"volume_claim": "a b"}, {"poll_seconds": "1"}, {"gpu_resource": "memory"}):
        assert not valid.is_valid(bad), bad
    assert render(**good)["spec"]["trainer"]["image"] == good["image"]


def status(kind):
    conds = [] if kind is None else [{"type": kind, "status": "True", "reason": "Done" if kind == "Complete"
                                      else "BackoffLimitExceeded", "message": f"job {kind.lower()}"}]
    return {"metadata": {"name": "x"}, "status": {"conditions": conds}}


def k8s_launcher(api):
    return launchers.make_launcher("kubernetes", image="img:1", namespace="ml", api=api, poll_seconds=1,
                                sleep=lambda s: None)


def test_submit_then_wait_until_complete(capsys):
    api = mock.create_autospec(CustomObjectsApi, instance=True)
    api.get_namespaced_custom_object.side_effect = [status(None), status(None), status("Complete")]
    result = k8s_launcher(api).launch(sr256_job(), 2, 8)
    body = api.create_namespaced_custom_object.call_args.kwargs["body"]
    assert api.create_namespaced_custom_object.call_args.kwargs["plural"] == "trainjobs"
    assert body["spec"]["trainer"]["numNodes"] == 2 and body["metadata"]["namespace"] == "ml"
    assert api.get_namespaced_custom_object.call_count == 3
    assert result["checkpoint"] == "/data/imagen/checkpoints/sr256/sr256-0123456789ab/final"
    assert result["job"] == f"ml/{body['metadata']['name']}"
    assert "Complete" in capsys.readouterr().out


def test_failed_trainjob_fails_the_task_with_its_reason():
    api = mock.create_autospec(CustomObjectsApi, instance=True)
    api.get_namespaced_custom_object.side_effect = [status(None), status("Failed")]
    with pytest.raises(RuntimeError, match="failed: BackoffLimitExceeded: job failed.*kubectl logs -n ml"):
        k8s_launcher(api).launch(sr256_job(), 1, 8)


def test_retry_attaches_to_the_running_job_instead_of_submitting_twice():
    api = mock.create_autospec(CustomObjectsApi, instance=True)
    api.create_namespaced_custom_object.side_effect = ApiException(status=409, reason="AlreadyExists")
    api.get_namespaced_custom_object.side_effect = [status(None), status("Complete")]
    k8s_launcher(api).launch(sr256_job(), 1, 8)
    assert api.create_namespaced_custom_object.call_count == 1
    api.delete_namespaced_custom_object.assert_not_called()


def test_retry_replaces_a_failed_job():
    api = mock.create_autospec(CustomObjectsApi, instance=True)
    api.create_namespaced_custom_object.side_effect = [ApiException(status=409, reason="AlreadyExists"), {}]
    api.get_namespaced_custom_object.side_effect = [status("Failed"), ApiException(status=404),
                                                    status("Complete")]
    k8s_launcher(api).launch(sr256_job(), 1, 8)
    assert api.delete_namespaced_custom_object.call_count == 1
    assert api.create_namespaced_custom_object.call_count == 2


def test_forbidden_submit_says_what_to_check():
    api = mock.create_autospec(CustomObjectsApi, instance=True)
    api.create_namespaced_custom_object.side_effect = ApiException(status=403, reason="Forbidden")
    with pytest.raises(RuntimeError, match="403 Forbidden.*Kubeflow Trainer is installed"):
        k8s_launcher(api).launch(sr256_job(), 1, 8)


def test_infra_manifests_validate_against_kubernetes_schemas():
    files = sorted(glob.glob(os.path.join(REPO, "infra", "k8s", "*.yaml")))
    assert files, "infra/k8s/*.yaml is missing"
    kinds = set()
    for path in files:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc["kind"] != "Kustomization":  # kustomize's own file, not an API object
                    kv.validate(doc, K8S_VERSION, strict=True)
                    kinds.add(doc["kind"])
    assert {"Deployment", "StatefulSet", "Service", "PersistentVolumeClaim"} <= kinds
