"""Run the download on Spark: img2dataset's pyspark distributor, in a SparkSession we create.

``download(..., distributor="pyspark")`` (CLI: ``--distributor pyspark [--spark-master URL]``)
runs img2dataset as ``python -m pipeline.data.spark SPEC``: this module creates the SparkSession
(img2dataset's distributor takes the active session, and builds a 16 GB ``local[N]`` one only
when there is none), then calls :func:`pipeline.data.fetch_guard.run_img2dataset` in it. The
driver reads the URL list and writes the input shards; each download shard is one Spark task,
run by :class:`pipeline.data.fetch_guard.GuardedDownloader` in an executor's Python worker.

How the fetch guard reaches the executors: the function img2dataset maps over the shards is
the ``GuardedDownloader`` (pickled by reference to this module's package, with the driver's
resolved :class:`FetchPolicy` as an attribute). Its ``__call__`` installs the guard in the Python
worker that runs it, before the first request of every shard, whatever process that is: no
executor runs img2dataset's own ``download_image``. The deployment's guard settings also travel
as ``spark.executorEnv.IMAGEN_ALLOW_PRIVATE_NETWORKS`` / ``IMAGEN_ALLOW_HOSTS`` (the resolved
values), so anything in an executor that reads :func:`deployment_policy` agrees with the driver.
The spec's per-host politeness (:mod:`pipeline.data.politeness`) travels the same way, inside the
``GuardedDownloader``: its caps hold per executor machine (each has its own lock dir; a set
``IMAGEN_POLITENESS_DIR`` is passed on), so M executor machines may send one host M times them.

Masters: ``local[N]`` (default ``local[processes]``: one machine, N Python workers),
``local-cluster[W,C,MB]`` (W executor JVMs of C cores and MB MiB on this machine; what the tests
use), ``spark://HOST:PORT`` (standalone), ``k8s://https://HOST:PORT`` (Spark on Kubernetes: the
executors run ``spark.kubernetes.container.image``, an image with ``imagen-pipeline[spark]``
installed), ``yarn``. Executors need the package importable and ``output`` on storage they all
reach (an object store or a shared file system); the driver needs Java 17+.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Iterator

from pipeline.data.politeness import ENV_DIR as ENV_POLITENESS_DIR
from pipeline.netguard import ENV_ALLOW_HOSTS, ENV_ALLOW_PRIVATE, FetchPolicy, decoder_env

DISTRIBUTORS = ("multiprocessing", "pyspark")
ENV_MASTER = "IMAGEN_SPARK_MASTER"  # the deployment's cluster: the DAG's default master
ENV_MASTERS = "IMAGEN_SPARK_MASTERS"  # comma-separated other masters a DAG run may name
_LOCAL = re.compile(r"local(\[(\*|[1-9]\d*)(,\d+)?\])?")
_LOCAL_CLUSTER = re.compile(r"local-cluster\[([1-9]\d*),([1-9]\d*),([1-9]\d*)\]")
_HOST = r"([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(:\d+)?"
_REMOTE = re.compile(rf"spark://{_HOST}(,{_HOST})*|k8s://https?://{_HOST}/?|yarn")


def is_local(master: str) -> bool:
    return bool(_LOCAL.fullmatch(master) or _LOCAL_CLUSTER.fullmatch(master))


def check_master(master: str) -> str:
    """``master`` if it is a Spark master URL we know how to run on, else ValueError."""
    master = master.strip()
    if is_local(master) or _REMOTE.fullmatch(master):
        return master
    raise ValueError(f"--spark-master {master!r}: use local[N], local-cluster[WORKERS,CORES,MB], "
                     "spark://HOST:PORT, k8s://https://HOST:PORT or yarn")


def master_for_run(requested: str | None, processes: int = 1, environ: dict | None = None) -> str:
    """The master a DAG run may use: empty -> the deployment's ``IMAGEN_SPARK_MASTER`` (else
    ``local[processes]``); a local master; or a cluster the deployment lists (``IMAGEN_SPARK_MASTER``,
    ``IMAGEN_SPARK_MASTERS``). A trigger form cannot send the driver to any other address."""
    env = os.environ if environ is None else environ
    default = env.get(ENV_MASTER, "").strip()
    if not (requested or "").strip():
        return check_master(default) if default else f"local[{max(processes, 1)}]"
    master = check_master(requested)
    allowed = {default, *(m.strip() for m in env.get(ENV_MASTERS, "").split(","))} - {""}
    if is_local(master) or master in allowed:
        return master
    raise ValueError(f"spark_master {master!r} is not a cluster this deployment lists: set {ENV_MASTER} "
                     f"or add it to {ENV_MASTERS} on the workers")


def require_spark() -> None:
    """RuntimeError naming what to install when pyspark or Java is missing (before any work)."""
    if importlib.util.find_spec("pyspark") is None:
        raise RuntimeError("the pyspark distributor needs pyspark: pip install 'imagen-pipeline[spark]'")
    java_home = os.environ.get("JAVA_HOME")
    if not (shutil.which("java") or (java_home and os.path.exists(os.path.join(java_home, "bin", "java")))):
        raise RuntimeError("the pyspark distributor needs Java 17 or newer on PATH or in JAVA_HOME "
                           "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)")


def session_conf(master: str, policy: FetchPolicy, conf: dict[str, str] | None = None) -> dict[str, str]:
    """Spark settings for the download: ours, then ``conf`` (``--spark-conf``) on top."""
    out = {
        "spark.app.name": "imagen-download",
        "spark.ui.showConsoleProgress": "false",
        f"spark.executorEnv.{ENV_ALLOW_PRIVATE}": "1" if policy.allow_private_networks else "0",
        f"spark.executorEnv.{ENV_ALLOW_HOSTS}": ",".join(policy.allow_hosts),
        "spark.executorEnv.NO_ALBUMENTATIONS_UPDATE": "1",
        "spark.executorEnv.WANDB_MODE": "disabled",
        "spark.executorEnv.PYTHONUNBUFFERED": "1",
        **{f"spark.executorEnv.{k}": v for k, v in decoder_env(policy).items()},  # OpenCV's pixel cap
    }
    if os.environ.get(ENV_POLITENESS_DIR):  # the deployment's lock dir, on every executor machine
        out[f"spark.executorEnv.{ENV_POLITENESS_DIR}"] = os.environ[ENV_POLITENESS_DIR]
    if is_local(master):  # this machine: the same interpreter, loopback only, no UI port
        out.update({"spark.pyspark.python": sys.executable, "spark.driver.host": "127.0.0.1",
                    "spark.driver.bindAddress": "127.0.0.1", "spark.ui.enabled": "false",
                    "spark.driver.memory": "1g"})
        # The JVMs only schedule tasks and pass (status, shard) pairs; the work is in the Python
        # workers. Without the optimising JIT and with the serial GC they start in half the time
        # (local-cluster[2,1,1024] on 2 busy cores: 19 s instead of 44 s).
        jvm = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
        out.update({"spark.driver.extraJavaOptions": jvm, "spark.executor.extraJavaOptions": jvm})
        cluster = _LOCAL_CLUSTER.fullmatch(master)
        if cluster:  # an executor asking for more than a worker has would wait forever
            out["spark.executor.memory"] = f"{min(int(cluster.group(3)), 1024)}m"
    out.update({str(k): str(v) for k, v in (conf or {}).items()})
    return out


@contextlib.contextmanager
def spark_session(master: str, conf: dict[str, str]) -> Iterator:
    """A SparkSession, active for img2dataset's distributor, stopped on the way out."""
    from pyspark.sql import SparkSession

    if conf.get("spark.pyspark.python"):  # the executors' interpreter: PySpark reads only the variable
        os.environ["PYSPARK_PYTHON"] = conf["spark.pyspark.python"]
    builder = SparkSession.builder.master(master)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    ok = False
    try:
        spark.sparkContext.setLogLevel("WARN")
        if SparkSession.getActiveSession() is None:  # img2dataset would build its own 16 GB one
            raise RuntimeError("the SparkSession is not active in this thread")
        print(f"spark: master {master}, default parallelism {spark.sparkContext.defaultParallelism}", flush=True)
        yield spark
        ok = True
    finally:
        app = spark.sparkContext.applicationId
        spark.stop()
        if _LOCAL_CLUSTER.fullmatch(master):
            _local_cluster_logs(app, keep=not ok)


def _local_cluster_logs(app: str, keep: bool) -> None:
    """local-cluster executors log into ``$SPARK_HOME/work/APP`` (pip's pyspark: inside the
    virtualenv): removed after a good run, kept and named after a failed one."""
    from pyspark.find_spark_home import _find_spark_home

    logs = os.path.join(_find_spark_home(), "work", app)
    if keep:
        print(f"spark: the executors' logs are in {logs}", flush=True)
    else:
        shutil.rmtree(logs, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(logs))  # only when no other run's logs are there


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.data.spark SPEC``: SPEC is fetch_guard's, plus ``"spark": {master, conf}``."""
    from pipeline.data import fetch_guard

    spec = fetch_guard.read_spec(argv, __doc__)
    if spec is None:
        return 2
    with spark_session(spec["spark"]["master"], spec["spark"]["conf"]):
        return fetch_guard.run_spec(spec)


if __name__ == "__main__":
    from pipeline.proc import exit_now

    exit_now(main())  # the session is stopped by now
