"""dags/imagen_common.py imported in this process: the Params (the trigger form) validate with
JSON schema, stage and preset names come from the model library, embed batches stay under the
map limit. Parsing the DAG files as Airflow does is tests/integration/test_dags.py."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DAGS = os.path.join(REPO, "dags")
STAGES = ["base64", "sr256", "sr1024"]

# BundleDagBag, as the dag-processor, `airflow dags test` and task runners use it: it puts the
# DAGs folder on sys.path, so DAG files can import dags/imagen_common.py.
PARSE = r"""
import json, sys, time
from airflow.dag_processing.dagbag import BundleDagBag
t1 = time.perf_counter()
bag = BundleDagBag(dag_folder=sys.argv[1], bundle_path=sys.argv[1])
t2 = time.perf_counter()
heavy = sorted(m for m in ("torch", "transformers", "mlflow", "img2dataset", "pyarrow", "webdataset",
                           "kubernetes") if m in sys.modules)
def sched(dag):
    cond = getattr(dag.timetable, "asset_condition", None)
    return None if cond is None else sorted(a.name for a in cond.objects)
def outlets(task):
    return sorted(getattr(o, "name", "") for o in task.outlets)
dags = {d: {"tasks": sorted(t.task_id for t in dag.tasks),
            "retries": {t.task_id: t.retries for t in dag.tasks},
            "backoff": {t.task_id: t.retry_exponential_backoff for t in dag.tasks},
            "pools": {t.task_id: t.pool for t in dag.tasks},
            "deps": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
            "outlets": {t.task_id: outlets(t) for t in dag.tasks if t.outlets},
            "schedule": sched(dag)}
        for d, dag in bag.dags.items()}
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "parse_s": t2 - t1,
                  "per_file_s": {s.file: s.duration.total_seconds() for s in bag.dagbag_stats},
                  "heavy": heavy, "dags": dags}))
"""


def test_params_reject_bad_values(common):
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    full = common.full_params()
    with pytest.raises(ParamValidationError, match="sr512"):
        full["stages"].resolve(["base64", "sr512"])
    with pytest.raises(ParamValidationError):
        full["stages"].resolve([])
    with pytest.raises(ParamValidationError, match="minimum|less"):
        full["max_steps"].resolve(-5)
    with pytest.raises(ParamValidationError, match="huge"):
        full["presets"].resolve({"base64": "huge"})
    with pytest.raises(ParamValidationError, match="slurm"):
        full["launcher"].resolve("slurm")
    with pytest.raises(ParamValidationError):
        full["nodes"].resolve(0)
    with pytest.raises(ParamValidationError, match="sr512"):
        common.stage_params()["stage"].resolve("sr512")
    for name in ("run_tag", "model_prefix"):  # names end at the end of the text, not before a newline
        with pytest.raises(ParamValidationError):
            full[name].resolve("abc\n")
        assert full[name].resolve("abc-1.x") == "abc-1.x"
    assert full["max_steps"].resolve(10) == 10
    defaults = ParamsDict(full).validate()  # every default is valid: the trigger form opens filled
    assert defaults["stages"] == STAGES and defaults["launcher"] == "local"
    # production defaults: the paper presets and each preset's own step count (the smoke test, the
    # demo and the tests ask for "tiny" by name)
    fresh = ParamsDict(common.full_params()).validate()  # resolve() above set some values
    assert fresh["presets"] == {s: s for s in STAGES} and fresh["max_steps"] is None
    assert ParamsDict(common.stage_params()).validate()["preset"] is None  # the stage's paper preset
    assert common.stage_params()["preset"].resolve("tiny") == "tiny"


def test_private_networks_are_not_a_trigger_form_switch(common):
    # Which private networks the fetch guard lets through is the deployment's
    # (IMAGEN_ALLOW_PRIVATE_NETWORKS / IMAGEN_ALLOW_HOSTS in the services' environment): anyone
    # who may trigger a run must not be able to turn the guard off.
    for params in (common.data_params(), common.full_params(), common.stage_params(), common.embed_params()):
        assert not [name for name in params if "private" in name or "allow" in name]
    for name in os.listdir(DAGS):
        if name.endswith(".py"):
            with open(os.path.join(DAGS, name)) as f:
                assert "allow_private_networks" not in f.read(), name


def test_launcher_options_param_takes_every_launchers_keys_and_names_them(common):
    """The Param's schema is static: it holds every launcher's keys (the union), its description
    lists them per launcher, and the train task checks them against the chosen launcher's own
    schema (tests/unit/test_launch.py). A default trigger validates."""
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    from pipeline.train.launchers import launcher_options_schema, option_keys

    for params in (common.full_params(), common.stage_params()):
        form = ParamsDict(params).validate()
        assert form["launcher"] == "local" and form["launcher_options"] == {}
    param = common.train_params()["launcher_options"]
    assert {k: param.schema[k] for k in ("type", "additionalProperties", "properties")} == launcher_options_schema()
    assert "local: none" in param.description
    assert f"kubernetes: {', '.join(option_keys('kubernetes'))}" in param.description
    k8s = {"image": "registry.example.com/imagen-pipeline:0.1", "namespace": "ml", "volume_claim": "imagen-data"}
    assert param.resolve(k8s) == k8s
    with pytest.raises(ParamValidationError, match="gpus"):
        param.resolve({"gpus": 8})


def test_stage_and_preset_names_come_from_the_model_library(common):
    from imagen.config import PRESETS
    from imagen.config import STAGES as LIB_STAGES

    assert list(LIB_STAGES) == STAGES == list(common.MODELS)
    assert common.full_params()["presets"].schema["properties"]["sr256"]["enum"] == list(PRESETS)


def test_embed_batches_stay_under_the_map_limit(common, tmp_path):
    for i in range(10):
        (tmp_path / f"{i:06d}.tar").write_bytes(b"")
    (tmp_path / "manifest.json").write_text("{}")
    assert common.embed_batches(str(tmp_path), 4, 1024) == [
        [f"{i:06d}.tar" for i in range(0, 4)], [f"{i:06d}.tar" for i in range(4, 8)],
        ["000008.tar", "000009.tar"]]
    batches = common.embed_batches(str(tmp_path), 1, 3)  # a limit of 3 mapped tasks wins
    assert len(batches) == 3 and sum(batches, []) == [f"{i:06d}.tar" for i in range(10)]
    with pytest.raises(ValueError, match="no filtered shards.*run the filter step"):
        common.embed_batches(str(tmp_path / "empty"), 4, 1024)


def test_asset_event_extra_overrides_params_root(common):
    class Event:
        def __init__(self, extra):
            self.extra = extra

    events = {common.FILTERED: [Event({"root": "/old"}), Event({"root": "/new", "path": "/new/filtered"})]}
    assert common.upstream(events, common.FILTERED) == {"root": "/new", "path": "/new/filtered"}
    assert common.upstream(events, common.EMBEDDINGS) == {}
    assert common.upstream(None, common.FILTERED) == {}


def test_tasks_find_the_run_through_its_layout(common):
    """The root of the triggering event wins over the root Param; every folder then comes from
    pipeline.layout.RunLayout: the root is the one thing that travels."""

    class Event:
        def __init__(self, extra):
            self.extra = extra

    layout = common.run_layout({"root": "s3://bucket/run"}, None)
    assert (layout.root, layout.filtered) == ("s3://bucket/run", "s3://bucket/run/filtered")
    events = {common.FILTERED: [Event({"root": "s3://b/old"}), Event({"root": "s3://b/new", "path": "s3://b/x"})]}
    layout = common.run_layout({"root": "/ignored"}, events)
    assert (layout.root, layout.filtered) == ("s3://b/new", "s3://b/new/filtered")  # newest event; path: UI only
    embedded = {common.EMBEDDINGS: [Event({"root": "s3://c/run", "path": "s3://c/run/embeddings/t5"})]}
    assert common.run_layout({"root": "/r"}, embedded, common.EMBEDDINGS).root == "s3://c/run"
    assert common.run_layout({"root": "/r"}, embedded).root == "/r"  # no imagen_data event


def test_dags_hold_no_step_logic():
    """Task bodies call into pipeline/: no MLflow client, checkpoint loading or folder joining
    in dags/ (the step logic that lived here is in pipeline/release and pipeline/layout.py)."""
    for name in sorted(os.listdir(DAGS)):
        if name.endswith(".py"):
            with open(os.path.join(DAGS, name)) as f:
                text = f.read()
            for word in ("mlflow", "load_config", "os.path.join", "_known_run", "root_of"):
                assert word not in text, (name, word)


def test_weights_dtype_param_reaches_both_registrations(common, monkeypatch):
    """The `weights_dtype` Param as the trigger form sets it: bf16 or fp32, nothing else, and the
    value is what registering a stage and the cascade pass on."""
    from airflow.sdk.exceptions import ParamValidationError

    for params in (common.full_params(), common.stage_params()):
        assert params["weights_dtype"].value == "fp32" and params["weights_dtype"].resolve("bf16") == "bf16"
        with pytest.raises(ParamValidationError):
            params["weights_dtype"].resolve("fp16")
    seen = []
    monkeypatch.setattr("pipeline.release.registry.register_trained",
                        lambda trained, prefix, weights_dtype: seen.append((prefix, weights_dtype)) or {})
    monkeypatch.setattr("pipeline.release.registry.register_cascade",
                        lambda ckpts, name, weights_dtype: seen.append((name, ckpts, weights_dtype)) or {})
    params = {"model_prefix": "p", "weights_dtype": "bf16"}
    common.register_stage(params, {"checkpoint": "/c/final", "stage": "base64"})
    common.register_chain(params, [{"checkpoint": "/b/final"}, None, {"checkpoint": "/s/final"}])
    assert seen == [("p", "bf16"), ("p-cascade", ["/b/final", "/s/final"], "bf16")]


# --- issue 28: the trigger form, the conf, task docs, fail-fast errors -----------------------------


@pytest.fixture(scope="module")
def dags(common):
    """The DAG objects, parsed in this process as the dag-processor parses them."""
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=DAGS, bundle_path=DAGS)
    assert bag.import_errors == {}
    assert set(bag.dags) == {"imagen_full", "imagen_data", "imagen_embed", "imagen_train_stage"}
    return bag.dags


def ui_required(schema: dict) -> bool:
    """Airflow 3.3's trigger form (ui/dist: the `isRequired` test of FlexibleForm): a field is
    required when its schema has a type and that type does not allow null; an emptied field
    sends null, and Trigger stays disabled while a required field is null or ""."""
    types = schema.get("type")
    return bool(types) and (not isinstance(types, list) or "null" not in types)


def form_blockers(params) -> list[str]:
    """Why the trigger form could not be submitted with these Params' defaults, as the UI sees
    it: a default its own schema refuses, or an empty default on a required field."""
    import jsonschema

    out = []
    for name, param in params.items():
        try:
            jsonschema.validate(param.value, param.schema)
        except jsonschema.ValidationError as e:
            out.append(f"{name}: default {param.value!r} invalid: {e.message}")
        if param.value in (None, "") and ui_required(param.schema):
            out.append(f"{name}: empty default {param.value!r} on a required field")
    return out


def test_trigger_form_submits_with_its_defaults(dags, common):
    """Issue 28, item 1: every Param default of every DAG validates against its own schema, no
    field with an empty default is required, and the conf the form then submits is accepted."""
    from airflow.sdk import Param

    # the mirror catches the bug the issue reports: an empty string default on a "string" Param
    assert form_blockers({"url_list": Param("", type="string")}) == [
        "url_list: empty default '' on a required field"]
    for dag_id, dag in dags.items():
        params = {k: dag.params.get_param(k) for k in dag.params}
        assert form_blockers(params) == [], dag_id
        submitted = {k: p.value for k, p in params.items()}  # what the form sends untouched
        assert common.conf_problems(submitted, dag) == [], dag_id
    full = common.full_params()
    for name in ("url_list", "spark_master", "run_tag", "attributes"):
        assert full[name].value is None and full[name].resolve("") == ""  # typed-then-cleared: accepted too
        assert common.text_or_none(full[name].resolve("")) is None
    assert common.text_or_none("  ") is None and common.text_or_none("x") == "x"
    assert common.stage_params()["embeddings"].value is None


def test_conf_keys_are_checked(dags, common):
    """Issue 28, item 2: the conf's schema has additionalProperties false and every task's
    pre_execute refuses an unknown key, naming the nearest Param, without retries."""
    import jsonschema
    from airflow.sdk.exceptions import AirflowFailException

    dag = dags["imagen_full"]
    schema = common.conf_schema(dag)
    assert schema["additionalProperties"] is False and set(schema["properties"]) == set(dag.params)
    jsonschema.validate({"max_steps": 5, "url_list": None}, schema)
    with pytest.raises(jsonschema.ValidationError, match="max_stepz"):
        jsonschema.validate({"max_stepz": 5}, schema)
    assert common.conf_problems({"max_stepz": 5}, dag) == ["unknown conf key 'max_stepz': did you mean 'max_steps'?"]
    assert "valid keys: " in common.conf_problems({"zzz": 1}, dag)[0]
    assert common.conf_problems({"max_steps": 0}, dag) == ["max_steps: 0 is less than the minimum of 1"]

    class Run:
        conf = {"max_stepz": 5}

    for task in dag.tasks:  # the hook is every task's (a mapped one's too), from DEFAULT_ARGS
        hook = task.partial_kwargs["pre_execute"] if hasattr(task, "partial_kwargs") else task._pre_execute_hook
        assert hook is common.check_conf, task.task_id
    with pytest.raises(AirflowFailException, match="did you mean 'max_steps'"):
        common.check_conf({"dag_run": Run(), "dag": dag})
    Run.conf = {"max_steps": 5}
    assert common.check_conf({"dag_run": Run(), "dag": dag}) is None


def test_stages_is_a_multi_select(dags):
    """Issue 28, item 3: Airflow 3's form renders an array Param as a multi-select when its
    schema lists `examples` (its `isFieldMultiSelect`); the choices are the stages, each once."""
    for dag_id in ("imagen_full", "imagen_data"):
        schema = dags[dag_id].params.get_param("stages").schema
        assert schema["type"] == "array" and schema["uniqueItems"] is True
        assert schema["examples"] == schema["items"]["enum"] == STAGES


def test_every_task_has_docs_and_every_param_a_title(dags):
    """Issue 28, item 4: task docs in the UI (doc_md, mapped tasks too) and human Param labels."""
    for dag_id, dag in dags.items():
        undocumented = [t.task_id for t in dag.tasks if not (t.doc_md or "").strip()]
        assert undocumented == [], dag_id
        untitled = [k for k in dag.params if not dag.params.get_param(k).schema.get("title")]
        assert untitled == [], dag_id


def test_input_errors_fail_fast_and_others_retry(dags, common):
    """Issue 28, item 6: every task body is wrapped by fail_fast; an input error becomes
    AirflowFailException (no retry), any other error keeps the retry policy."""
    from airflow.sdk.exceptions import AirflowFailException

    for dag_id, dag in dags.items():
        bare = [t.task_id for t in dag.tasks if not getattr(t.python_callable, "fails_fast", False)]
        assert bare == [], dag_id

    def missing(path):
        raise FileNotFoundError(path)

    with pytest.raises(AirflowFailException, match="/no/urls.parquet.*not retried"):
        common.fail_fast(missing)("/no/urls.parquet")
    with pytest.raises(AirflowFailException, match="url_list"):
        common.fail_fast(lambda: (_ for _ in ()).throw(ValueError("url_list is empty")))()

    def transient():
        raise ConnectionError("mlflow server down")

    with pytest.raises(ConnectionError):
        common.fail_fast(transient)()


def test_phase_dags_leave_imagen_full_events_alone(common):
    """imagen_full emits the data Assets (item 5); the per-phase DAGs they schedule skip its events."""
    from airflow.sdk.exceptions import AirflowSkipException

    class Event:
        def __init__(self, dag_id):
            self.source_dag_id, self.extra = dag_id, {"root": "/r"}

    assert common.from_full_run({common.FILTERED: [Event("imagen_data"), Event("imagen_full")]}, common.FILTERED)
    assert not common.from_full_run({common.FILTERED: [Event("imagen_data")]}, common.FILTERED)
    assert not common.from_full_run(None, common.EMBEDDINGS)
    with pytest.raises(AirflowSkipException, match="imagen_full"):
        common.skip_full_run_events({common.EMBEDDINGS: [Event("imagen_full")]}, common.EMBEDDINGS)


def test_gpu_pool_lets_the_stages_train_at_once(monkeypatch):
    """Issue 28, item 7: the local services' `gpu` pool has a slot per cascade stage on CPU (the
    stages imagen_full trains "in parallel" do), one per GPU where there are GPUs, or the knob."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("infra_services", os.path.join(REPO, "infra", "services.py"))
    services = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(services)
    monkeypatch.setattr(services, "_gpu_count", lambda: 0)
    assert services.default_gpu_slots({}) == len(STAGES) == 3
    assert services.default_gpu_slots({"IMAGEN_GPU_POOL_SLOTS": "5"}) == 5
    monkeypatch.setattr(services, "_gpu_count", lambda: 8)
    assert services.default_gpu_slots({}) == 8
    with pytest.raises(SystemExit, match="IMAGEN_GPU_POOL_SLOTS"):
        services.default_gpu_slots({"IMAGEN_GPU_POOL_SLOTS": "0"})


def test_politeness_params_reach_the_download(common):
    """Issue 27: the per-host caps and robots.txt are Params with the library's defaults, and a
    run's values (or, for a run of an older form, the defaults) are what the download gets."""
    from airflow.sdk.exceptions import ParamValidationError

    from pipeline.data.download import DownloadConfig

    params = common.data_params()
    config = DownloadConfig()
    assert {k: params[k].value for k in ("per_host_connections", "per_host_rate", "per_host_burst", "robots_txt")} == {
        "per_host_connections": config.per_host_connections, "per_host_rate": config.per_host_rate,
        "per_host_burst": config.per_host_burst, "robots_txt": True}
    with pytest.raises(ParamValidationError):
        params["per_host_rate"].resolve(-1)
    assert params["per_host_connections"].resolve(0) == 0  # 0: no cap
    chosen = {"per_host_connections": 2, "per_host_rate": 0.5, "per_host_burst": 3, "robots_txt": False}
    assert common.download_politeness(chosen) == chosen
    assert common.download_politeness({})["robots_txt"] is True
