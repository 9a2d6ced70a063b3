"""pipeline.data.spark without starting Spark: master URLs, which masters a DAG run may name, the
session settings that carry the guard's policy to the executors, and the download options that
choose the distributor. The Spark run itself is tests/integration/test_spark_download.py."""

from __future__ import annotations

import os
import sys

import pytest

from pipeline.data import spark
from pipeline.data.download import DownloadConfig, _img2dataset_spec, _resolve
from pipeline.netguard import FetchPolicy

DAGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dags")


@pytest.mark.parametrize("master", ["local", "local[2]", "local[*]", "local[4,2]", "local-cluster[2,1,1024]",
                                    "spark://10.0.0.5:7077", "spark://a:7077,b:7077",
                                    "k8s://https://kubernetes.default.svc:443", "yarn"])
def test_known_masters(master):
    assert spark.check_master(master) == master


@pytest.mark.parametrize("master", ["", "local[0]", "local-cluster[2,1]", "mesos://x:5050", "http://x:7077",
                                    "spark://", "k8s://x:443", "local[2]; rm -rf /"])
def test_unknown_masters_name_the_flag(master):
    with pytest.raises(ValueError, match="--spark-master"):
        spark.check_master(master)


def test_a_dag_run_names_only_local_or_listed_masters():
    env = {"IMAGEN_SPARK_MASTER": "k8s://https://k8s.example:443", "IMAGEN_SPARK_MASTERS": "spark://big:7077"}
    assert spark.master_for_run("", 4, env) == "k8s://https://k8s.example:443"
    assert spark.master_for_run(None, 4, {}) == "local[4]"
    assert spark.master_for_run("local-cluster[2,1,1024]", 1, env) == "local-cluster[2,1,1024]"
    assert spark.master_for_run("spark://big:7077", 1, env) == "spark://big:7077"
    with pytest.raises(ValueError, match="IMAGEN_SPARK_MASTERS"):
        spark.master_for_run("spark://elsewhere:7077", 1, env)


def test_session_conf_carries_the_policy_to_the_executors():
    policy = FetchPolicy(allow_hosts=("127.0.0.1:8799",))
    conf = spark.session_conf("local-cluster[2,1,512]", policy, {"spark.executor.cores": "1"})
    assert conf["spark.executorEnv.IMAGEN_ALLOW_PRIVATE_NETWORKS"] == "0"
    assert conf["spark.executorEnv.IMAGEN_ALLOW_HOSTS"] == "127.0.0.1:8799"
    assert conf["spark.pyspark.python"] == sys.executable and conf["spark.driver.host"] == "127.0.0.1"
    assert conf["spark.executor.memory"] == "512m" and conf["spark.executor.cores"] == "1"
    remote = spark.session_conf("k8s://https://k8s.example:443", FetchPolicy(allow_private_networks=True))
    assert remote["spark.executorEnv.IMAGEN_ALLOW_PRIVATE_NETWORKS"] == "1"
    assert "spark.pyspark.python" not in remote and "spark.driver.host" not in remote  # the cluster's own


def test_download_options_choose_the_distributor():
    cfg = _resolve(DownloadConfig(distributor="pyspark", processes=3))
    assert cfg.spark_master == "local[3]"
    spec = _img2dataset_spec("l.parquet", "out", cfg, FetchPolicy())
    assert spec["download"]["distributor"] == "pyspark" and spec["spark"]["master"] == "local[3]"
    assert spec["spark"]["conf"]["spark.executorEnv.IMAGEN_ALLOW_PRIVATE_NETWORKS"] == "0"
    plain = _img2dataset_spec("l.parquet", "out", _resolve(DownloadConfig()), FetchPolicy())
    assert plain["download"]["distributor"] == "multiprocessing" and "spark" not in plain
    with pytest.raises(ValueError, match="distributor"):
        _resolve(DownloadConfig(distributor="ray"))
    with pytest.raises(ValueError, match="--distributor pyspark"):
        _resolve(DownloadConfig(spark_master="local[2]"))


def test_cli_passes_the_spark_flags(monkeypatch):
    from pipeline import cli

    seen = {}
    monkeypatch.setattr("pipeline.data.download.download", lambda url_list, output, **kw: seen.update(kw) or {})
    assert cli.main(["download", "--url-list", "u.parquet", "--output", "o", "--distributor", "pyspark",
                     "--spark-master", "local[2]", "--spark-conf", "spark.executor.memory=2g"]) == 0
    assert seen["distributor"] == "pyspark" and seen["spark_master"] == "local[2]"
    assert seen["spark_conf"] == {"spark.executor.memory": "2g"}


def test_dag_params_choose_the_engine(monkeypatch):
    from airflow.sdk.exceptions import ParamValidationError

    sys.path.insert(0, DAGS)
    try:
        import imagen_common
    finally:
        sys.path.remove(DAGS)
    params = imagen_common.data_params()
    assert params["distributor"].resolve("pyspark") == "pyspark"
    with pytest.raises(ParamValidationError, match="ray"):
        params["distributor"].resolve("ray")
    monkeypatch.setenv("IMAGEN_SPARK_MASTER", "spark://cluster:7077")
    assert imagen_common.download_engine({"distributor": "pyspark", "spark_master": ""}) == {
        "distributor": "pyspark", "spark_master": "spark://cluster:7077"}
    assert imagen_common.download_engine({"distributor": "multiprocessing", "spark_master": ""}) == {
        "distributor": "multiprocessing"}
    with pytest.raises(ValueError, match="IMAGEN_SPARK_MASTERS"):
        imagen_common.download_engine({"distributor": "pyspark", "spark_master": "spark://evil:7077"})
