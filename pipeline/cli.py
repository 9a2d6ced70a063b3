"""``imagen-pipeline``: one entry point, one verb per pipeline step.

    imagen-pipeline tiny-data --output /tmp/tiny --port 8799 [--serve]
    imagen-pipeline download --url-list /tmp/tiny/urls.parquet --output ROOT/raw --allow-private-networks
    imagen-pipeline filter --input ROOT/raw --output ROOT/filtered
    imagen-pipeline embed --input ROOT/filtered --output ROOT/embeddings --encoder google/t5-v1_1-xxl
    imagen-pipeline train --stage base64 --preset tiny --data ROOT/filtered --embeddings DIR \\
        --max-steps 60 --checkpoint-dir ROOT/checkpoints/base64/run1 [--resume latest] [--new-run] \\
        [--nproc-per-node 8 --nnodes 2 --node-rank 0 --master-addr HOST0 --master-port 29500]
    imagen-pipeline evaluate --checkpoint ROOT/checkpoints/base64/run1/final
    imagen-pipeline register --checkpoint ROOT/checkpoints/base64/run1/final --name imagen-base64
    imagen-pipeline gate --name imagen-base64 --version 3 --data ROOT/filtered --embeddings DIR
    imagen-pipeline sample "a red circle" --model models:/imagen-base64@challenger --output x.png

Every verb takes ``--help``. Heavy libraries are imported inside each verb, so ``--help``
answers at once. Each verb prints a JSON summary as its last line, for scripts.
Ctrl-C or SIGTERM ends a verb with exit code 130 and one line, never a traceback; ``train``
first checkpoints the step it reached and prints the command that resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

# no heavy imports: main() catches TrainingStopped
from pipeline.train.stopping import EXIT_STOPPED, TrainingStopped

VERBS: dict[str, Callable[[argparse.Namespace], Any]] = {}
# verb -> (its one-line help, the function adding its flags to its sub-parser)
FLAGS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def verb(name: str, help: str, flags: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn(args)`` as verb ``name``, its flags added by ``flags(sub_parser)``."""
    def deco(fn):
        VERBS[name] = fn
        FLAGS[name] = (help, flags)
        return fn

    return deco


def _stage_arguments(s: argparse.ArgumentParser, stages_help: str) -> None:
    from imagen.config import PRESETS, STAGES

    s.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES), help=stages_help)
    s.add_argument("--preset", default=None, choices=[p for p in PRESETS if p not in STAGES],
                   help="model preset whose sizes apply to every stage (default: each stage's paper "
                        "preset; tiny for the tiny dataset)")


def _network_arguments(s: argparse.ArgumentParser) -> None:
    # The user running the CLI is the deployer: these add to IMAGEN_ALLOW_PRIVATE_NETWORKS /
    # IMAGEN_ALLOW_HOSTS (pipeline.netguard.deployment_policy) for this command's remote reads.
    s.add_argument("--allow-private-networks", action="store_true",
                   help="fetch private/loopback/link-local addresses (refused by default; the services "
                        "read IMAGEN_ALLOW_PRIVATE_NETWORKS=1 instead)")
    s.add_argument("--allow-host", action="append", metavar="HOST:PORT",
                   help="exempt exactly this host:port from the private-address check (repeatable; "
                        "the services read IMAGEN_ALLOW_HOSTS instead)")


def _presets(preset: str | None) -> dict[str, str]:
    """--preset as a stage -> preset map, by the one preset rule (imagen.config.resolve_presets)."""
    from imagen.config import resolve_presets

    return resolve_presets(preset)


def _tiny_data_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--output", required=True, help="directory to write images, urls.parquet, t5-tiny/")
    s.add_argument("--n", type=int, default=240, help="number of good images (default 240)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--port", type=int, default=8799, help="loopback port the URLs point at")
    s.add_argument("--serve", action="store_true", help="then serve the directory on 127.0.0.1:PORT")
    s.add_argument("--no-encoder", action="store_true", help="skip building the tiny T5 encoder")


@verb("tiny-data", "render the synthetic tiny dataset (+ tiny T5) and serve it", _tiny_data_flags)
def _tiny_data(a: argparse.Namespace) -> Any:
    from pipeline.dev.tinydata import make_tiny_dataset, serve_forever
    from pipeline.dev.tinymodels import build_tiny_t5

    result = make_tiny_dataset(a.output, n=a.n, seed=a.seed, port=a.port)
    if not a.no_encoder:
        result["encoder"] = build_tiny_t5(os.path.join(a.output, "t5-tiny"), seed=a.seed)
    if a.serve:
        print(json.dumps(result), flush=True)
        print(f"serving {a.output} on http://127.0.0.1:{a.port}/ (Ctrl-C to stop)", flush=True)
        serve_forever(a.output, a.port)
    return result


def _download_flags(s: argparse.ArgumentParser) -> None:
    from pipeline.data.download import DownloadConfig
    from pipeline.options import add_options

    s.add_argument("--url-list", help="parquet/csv/tsv/jsonl file or folder (any fsspec URI); required "
                                      "unless --retry-failed")
    s.add_argument("--output", required=True, help="raw shards directory (ROOT/raw)")
    s.add_argument("--retry-failed", action="store_true",
                   help="only the retry pass on the finished download in --output: fetch its transient failures "
                        "again, up to --retry-attempts times (the download's own settings)")
    _stage_arguments(s, "the stages the data is for: downloaded once at the largest one's size, "
                        "ratio kept, never upscaled")
    add_options(s, DownloadConfig)  # --image-size, --resize-mode, ... --distributor, --spark-master
    s.add_argument("--spark-conf", action="append", metavar="KEY=VALUE",
                   help="pyspark: a Spark setting, e.g. spark.kubernetes.container.image=IMAGE (repeatable)")
    _network_arguments(s)


@verb("download", "img2dataset through the fetch guard: URL list -> raw WebDataset shards", _download_flags)
def _download(a: argparse.Namespace) -> Any:
    from pipeline.data.download import DownloadConfig, download
    from pipeline.lock import Holder, hold
    from pipeline.options import options_from_args

    options = options_from_args(DownloadConfig, a)
    if a.retry_failed:
        from pipeline.data.download import retry_download

        with hold(a.output, Holder("download")):  # the pass writes the download's folder
            return retry_download(a.output, options["retry_attempts"], options["retry_base_delay"],
                                  options["retry_max_delay"])
    if not a.url_list:
        raise ValueError("download needs --url-list (or --retry-failed to retry a finished download's failures)")
    options["caption_col"] = options["caption_col"] or None  # --caption-col "": a list without captions
    with hold(a.output, Holder("download")):  # one run at a time writes this folder (pipeline/lock.py)
        return download(a.url_list, a.output, stages=tuple(a.stages), presets=_presets(a.preset),
                        allow_private_networks=a.allow_private_networks, allow_hosts=tuple(a.allow_host or ()),
                        spark_conf=_spark_conf(a.spark_conf), **options)


def _spark_conf(pairs: list[str] | None) -> dict[str, str]:
    bad = [p for p in pairs or [] if "=" not in p]
    if bad:
        raise ValueError(f"--spark-conf {bad[0]!r}: expected KEY=VALUE, e.g. spark.executor.memory=4g")
    return dict(p.split("=", 1) for p in pairs or [])


def _filter_flags(s: argparse.ArgumentParser) -> None:
    from pipeline.data.filter_config import FilterConfig
    from pipeline.data.filters import filter_shards
    from pipeline.options import add_options

    s.add_argument("--input", required=True, help="raw shards directory")
    s.add_argument("--output", required=True, help="filtered shards directory (ROOT/filtered)")
    _stage_arguments(s, "the stages the data is for: the smallest sets the size floor, and each "
                        "stage's too-small samples are counted")
    add_options(s, FilterConfig)  # --min-caption-chars ... --no-dedup ... --val-max
    # Not FilterConfig options: its default follows the stages; a scorer is NAME=JSON to parse.
    s.add_argument("--min-side", type=int, help="reject images smaller than this (default: the smallest "
                                                 "stage's size)")
    s.add_argument("--scorer", action="append", metavar="NAME=JSON",
                   help='model-based score filter, e.g. image_classifier=\'{"weights": "DIR", "label": "nsfw", '
                        '"max": 0.5}\'; runs only with weights')
    s.add_argument("--samples-per-shard", type=int, help="(default %(default)s)",
                   default=inspect.signature(filter_shards).parameters["samples_per_shard"].default)
    s.add_argument("--workers", type=int, default=1, help="processes for the per-shard pass")


def _scorers(specs: list[str] | None) -> dict[str, dict]:
    scorers = {}
    for spec in specs or []:
        name, _, options = spec.partition("=")
        try:
            scorers[name] = json.loads(options or "{}")
        except ValueError as e:
            raise ValueError(f"--scorer {spec!r}: expected NAME='{{\"weights\": DIR, \"min\": X}}' ({e})") from e
    return scorers


@verb("filter", "caption/language/size/decode/dedup filters -> even shards + reject table", _filter_flags)
def _filter(a: argparse.Namespace) -> Any:
    from pipeline.data.filter_config import FilterConfig
    from pipeline.data.filters import filter_shards, format_reject_table, stage_config
    from pipeline.lock import Holder, hold
    from pipeline.options import options_from_args

    sized = {"min_side": a.min_side} if a.min_side else {}
    cfg = stage_config(_presets(a.preset), a.stages, **sized, scorers=_scorers(a.scorer),
                       **options_from_args(FilterConfig, a))
    with hold(a.output, Holder("filter")):
        manifest = filter_shards(a.input, a.output, cfg, samples_per_shard=a.samples_per_shard, workers=a.workers)
    print(format_reject_table(manifest))
    return {k: manifest[k] for k in manifest if k not in ("shards", "input_fingerprint")}


def _embed_flags(s: argparse.ArgumentParser) -> None:
    from pipeline.data.embed_config import EmbedConfig
    from pipeline.options import add_options

    s.add_argument("--input", required=True, help="filtered shards directory")
    s.add_argument("--output", required=True, help="embeddings root (ROOT/embeddings)")
    add_options(s, EmbedConfig)  # --encoder, --max-length, --batch-size, --max-batch-tokens, --device, --dtype
    s.add_argument("--shards", nargs="+", help="only these shards (000003 or 000003.tar)")
    s.add_argument("--num-workers", type=int, default=1,
                   help="split the shards this many ways (disjoint, balanced by samples)")
    s.add_argument("--worker", type=int, default=0, help="which split this process embeds")


@verb("embed", "frozen T5 over captions -> one Parquet per shard", _embed_flags)
def _embed(a: argparse.Namespace) -> Any:
    from pipeline.data.embed import embed_shards, split_shards
    from pipeline.data.embed_config import EmbedConfig
    from pipeline.lock import Holder, hold
    from pipeline.options import options_from_args

    shards, holder = a.shards, Holder("embed")
    if a.num_workers > 1:  # this worker's disjoint slice (one per GPU, machine or task)
        if not 0 <= a.worker < a.num_workers:
            raise ValueError(f"--worker {a.worker} is not in [0, --num-workers {a.num_workers})")
        shards = split_shards(a.input, a.num_workers)[a.worker]
        # the workers of one split share the lock, each on its own slice
        holder = Holder("embed", group=f"cli-split-of-{a.num_workers}", part=str(a.worker))
    with hold(a.output, holder):
        return embed_shards(a.input, a.output, shards=shards,
                            config=EmbedConfig(**options_from_args(EmbedConfig, a)))


def _train_flags(s: argparse.ArgumentParser) -> None:
    from pipeline.train.job import add_arguments

    add_arguments(s)
    s.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) via torchrun")
    s.add_argument("--nnodes", type=int, default=1, help="nodes (machines) of the job; run the same "
                   "command on each with its own --node-rank (torchrun's static rendezvous)")
    s.add_argument("--node-rank", type=int, help="this node's rank, 0..NNODES-1 (node 0 hosts the rendezvous)")
    s.add_argument("--master-addr", help="address of node 0, reachable from every node")
    s.add_argument("--master-port", type=int, help="free TCP port on node 0 (default: 29500)")
    s.add_argument("--dry-run", action="store_true", help="print the resolved job as JSON (global batch, "
                   "micro-batch, accumulation, world size, steps, images) and train nothing")
    s.add_argument("--new-run", action="store_true",
                   help="train again even if --checkpoint-dir holds a finished run of these settings (which "
                        "a rerun reuses by default): into CHECKPOINT_DIR-2 (-3, ... the first free name)")


@verb("train", "train one cascade stage (torchrun for several processes)", _train_flags)
def _train(a: argparse.Namespace) -> Any:
    from pipeline.train.job import job_from_args
    from pipeline.train.launchers import make_launcher

    job = job_from_args(a, dry_run=a.dry_run)
    if a.dry_run:  # the resolved job (global batch cut over the world size), nothing trained
        from pipeline.data.embed import read_metadata
        from pipeline.train.job import job_plan, resolve_config

        cfg = resolve_config(job, read_metadata(job.embeddings) if job.embeddings else None)
        return job_plan(job, cfg, a.nnodes * a.nproc_per_node)
    if a.nnodes > 1:  # this machine is node --node-rank of --nnodes (pipeline/train/torchrun.py)
        from pipeline.train.job import job_to_argv
        from pipeline.train.launchers.local import train_node
        from pipeline.train.torchrun import Torchrun

        if a.node_rank is None or not a.master_addr:
            raise ValueError(f"--nnodes {a.nnodes} needs --node-rank (0..{a.nnodes - 1}, one per node) and "
                             "--master-addr (the address of node 0 that every node can reach)")
        spec = Torchrun(a.nnodes, a.nproc_per_node, node_rank=a.node_rank, master_addr=a.master_addr,
                        master_port=a.master_port or 29500)
        return train_node(job_to_argv(job), spec)
    if a.node_rank or a.master_addr or a.master_port:
        raise ValueError("--node-rank, --master-addr and --master-port are for a job of several nodes: "
                         "add --nnodes N (the same on every node)")
    from pipeline.train.launch import AGAIN_CLI, new_run_dir, train_stage
    from pipeline.train.stopping import resume_command
    from pipeline.train.torchrun import check_local_processes

    check_local_processes(1, a.nproc_per_node, job.device)  # before anything reads the data
    if a.new_run:
        job = dataclasses.replace(job, checkpoint_dir=new_run_dir(job.checkpoint_dir))
        print(f"[train] --new-run: training in {job.checkpoint_dir}", flush=True)
    try:
        # The DAG's decision (reuse a finished run of the same settings) and launcher
        # (pipeline.train.launchers); one process trains in this one, as always.
        return train_stage(job, make_launcher("local", in_process=True), 1, a.nproc_per_node, again=AGAIN_CLI)
    except TrainingStopped as e:  # main() prints its one line and exits 130
        e.summary["resume"] = resume_command("imagen-pipeline", a.argv, job.checkpoint_dir)
        raise TrainingStopped(e.summary) from None


def _evaluate_flags(s: argparse.ArgumentParser) -> None:
    from pipeline.options import add_options
    from pipeline.release.evaluate import EvalOptions, deployment_weights

    s.add_argument("--checkpoint", required=True, action="append",
                   help="stage weights dir (.../final); repeat in cascade order for the cascade")
    s.add_argument("--prompts-file", help="prompt set, one per line (default: a fixed set)")
    add_options(s, EvalOptions)
    # the deployment's evaluator weights ($IMAGEN_FID_WEIGHTS, $IMAGEN_CLIP_MODEL) are the defaults
    s.set_defaults(**{k: v for k, v in deployment_weights().items() if v})
    _network_arguments(s)


@verb("evaluate", "sample grids, speed and metrics for a stage or the cascade", _evaluate_flags)
def _evaluate(a: argparse.Namespace) -> Any:
    from pipeline.netguard import allowing
    from pipeline.options import options_from_args
    from pipeline.release.evaluate import EvalOptions, evaluate
    from pipeline.release.registry import mlflow_errors_in_one_line

    prompts = None
    if a.prompts_file:
        from pipeline import storage

        with storage.open(a.prompts_file, "r") as f:  # a local path or any storage URI
            prompts = [line.strip() for line in f if line.strip()]
    if a.embeddings is None and a.data:
        from pipeline.layout import RunLayout

        a.embeddings = RunLayout.around(a.data).embeddings_root  # its one encoder folder
    opts = EvalOptions(**options_from_args(EvalOptions, a), prompts=prompts)
    with allowing(a.allow_private_networks, a.allow_host), mlflow_errors_in_one_line():
        return evaluate(a.checkpoint, opts)


def _register_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--checkpoint", action="append",
                   help="stage weights dir; repeat in cascade order for a cascade")
    s.add_argument("--name", help="registered model name (default: imagen-<stage>, imagen-cascade)")
    s.add_argument("--alias", default="challenger", help="alias for the new version")
    s.add_argument("--promote", action="store_true",
                   help="also move 'champion' to it (without --checkpoint: to the current challenger)")
    s.add_argument("--promote-on", metavar="METRIC[:max|min]",
                   help="move 'champion' only if this eval metric beats the champion's")
    s.add_argument("--version", help="with --promote and no --checkpoint: the version to promote")
    s.add_argument("--new-version", action="store_true",
                   help="register a new version even if one was made from these same checkpoints "
                        "(default: reuse it and set its alias)")
    s.add_argument("--weights-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="store the weights as trained (fp32) or converted to bf16 (half the bytes; "
                        "loading upcasts); the text encoder is stored as given")
    s.add_argument("--encoder", help="text encoder (default: the one in the checkpoint's metadata)")
    s.add_argument("--tag", action="append", metavar="KEY=VALUE", help="extra version tag")
    s.add_argument("--run-id", help="log the model into this run (default: the training run)")
    s.add_argument("--tracking-uri")
    s.add_argument("--root", help="without --checkpoint: the data root whose mlflow.db holds the model")


@verb("register", "register a stage or the cascade in the MLflow Model Registry", _register_flags)
def _register(a: argparse.Namespace) -> Any:
    from pipeline.release.registry import mlflow_errors_in_one_line, promote, register

    tags = dict(t.split("=", 1) for t in a.tag or [] if "=" in t)
    with mlflow_errors_in_one_line():
        if not a.checkpoint:
            if not (a.name and a.promote):
                raise ValueError("give --checkpoint to register, or --name NAME --promote to move "
                                 "champion to the current challenger")
            return promote(a.name, version=a.version, tracking_uri=a.tracking_uri, root=a.root)
        return register(a.checkpoint, a.name, alias=a.alias, tracking_uri=a.tracking_uri,
                        run_id=a.run_id, tags=tags, encoder=a.encoder, promote=a.promote,
                        promote_on=a.promote_on, new_version=a.new_version, weights_dtype=a.weights_dtype)


def _gate_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--name", required=True, help="registered model name, e.g. imagen-base64")
    s.add_argument("--version", required=True, help="the version to judge (e.g. the @challenger's)")
    s.add_argument("--data", required=True, help="filtered shards (ROOT/filtered): both are scored on their "
                                                 "validation split")
    s.add_argument("--embeddings", required=True, help="embeddings directory of the stage's text encoder")
    s.add_argument("--promote-on", default="val/loss", metavar="METRIC[:min|max]",
                   help="val/loss (scored here, the default) or a metric logged on each version's run")
    s.add_argument("--root", help="data root whose MLflow store holds the model (default: the folder holding --data)")
    s.add_argument("--device", help="where to score (default: cuda when there is one, else cpu)")
    s.add_argument("--tracking-uri")


@verb("gate", "make a registered stage version @champion only if it beats the champion on the validation "
              "split (pipeline/release/promotion.py)", _gate_flags)
def _gate(a: argparse.Namespace) -> Any:
    from pipeline.layout import RunLayout
    from pipeline.release.promotion import gate
    from pipeline.release.registry import mlflow_errors_in_one_line

    with mlflow_errors_in_one_line():
        return gate(a.name, a.version, a.data, a.embeddings, a.promote_on, tracking_uri=a.tracking_uri,
                    root=a.root or RunLayout.around(a.data).root, device=a.device)


def _sample_flags(s: argparse.ArgumentParser) -> None:
    from imagen.samplers import SAMPLER_NAMES  # the sampler registry's names only: no torch import

    s.add_argument("prompts", nargs="+", help="one or more prompts")
    s.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow model folder or a stage "
                        "weights directory: built from its safetensors, nothing in it is unpickled or run")
    s.add_argument("--encoder", help="text encoder (default: the model's own copy, or the local directory "
                                     "it names); a hub name is downloaded only when given here")
    s.add_argument("--output", required=True, help="x.png for one prompt and seed, else a directory")
    s.add_argument("--seed", type=int, nargs="+", default=[0], help="one batch of images per seed")
    s.add_argument("--steps", type=int, nargs="+", help="sampling steps: one value, or one per stage")
    s.add_argument("--guidance-scale", type=float, nargs="+",
                   help="classifier-free guidance weight: one value, or one per stage")
    s.add_argument("--stages", type=int, help="run only the first N stages of a cascade")
    s.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: each stage config's")
    s.add_argument("--image", action="append", help="low-res input per prompt, for an SR-stage model")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--tracking-uri")
    s.add_argument("--root", help="the data root whose mlflow.db holds the model (as register used it)")


@verb("sample", "generate images from a registered model", _sample_flags)
def _sample(a: argparse.Namespace) -> Any:
    from pipeline.release.registry import mlflow_errors_in_one_line
    from pipeline.release.sample import sample_images

    params = {"stages": a.stages, "sampler": a.sampler}
    for flag, scalar, per_stage in ((a.steps, "steps", "stage_steps"),
                                    (a.guidance_scale, "guidance_scale", "stage_guidance")):
        if flag and len(flag) == 1:
            params[scalar] = flag[0]
        elif flag:
            params[per_stage] = flag
    with mlflow_errors_in_one_line():
        return sample_images(a.prompts, a.model, a.output, seeds=a.seed, tracking_uri=a.tracking_uri,
                             images=a.image, progress=not a.no_progress, encoder=a.encoder, root=a.root,
                             **params)


def _plan_flags(s: argparse.ArgumentParser) -> None:
    from pipeline.plan import add_arguments

    add_arguments(s)


@verb("plan", "predict a run before starting it: storage per phase, shards, GPU-hours, wall time and cost",
      _plan_flags)
def _plan(a: argparse.Namespace) -> Any:
    from pipeline.calibrate import calibrate
    from pipeline.plan import format_table, inputs_from_args, load_calibration, plan

    inp = inputs_from_args(a)
    measured = calibrate(inp, a.calibration, a.calibrate_seconds, a.calibrate_batch) if a.calibrate else None
    if measured and a.samples is None and not a.url_list:
        print(json.dumps(measured["measured"], indent=2))
        return measured
    result = plan(inp, load_calibration(a.calibration))
    if measured:
        result["calibration"] = measured
    print(format_table(result), flush=True)
    return result


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag is one line too (the sub-commands' parsers are of this class as well)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``imagen-pipeline`` parser: one sub-parser per verb, its flags from the verb's
    registration (generated from its config dataclass where it has one)."""
    p = OneLineErrorParser(prog="imagen-pipeline", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks with errors")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, (help, add_flags) in FLAGS.items():
        add_flags(sub.add_parser(name, help=help))
    return p


# Errors that name the bad input and what to do (pipeline and imagen raise these for bad
# files, flags and services); anything else is unexpected and also says where the traceback is.
USER_ERRORS = (ValueError, LookupError, RuntimeError, OSError)


def error_line(verb: str, e: BaseException) -> str:
    """One line for ``e``: its message with newlines folded, its type when unexpected."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename and e.strerror:  # "[Errno 2] ...: 'x'" -> "x: ..."
        text = f"{e.filename}: {e.strerror}"
    if not isinstance(e, USER_ERRORS):
        text = f"{type(e).__name__}: {text} (run with -v for the traceback)"
    return f"imagen-pipeline {verb}: error: {text[:2000]}"


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM is Ctrl-C's twin (a scheduler or ``kill`` stopping the command): a verb stops the
    same way, through KeyboardInterrupt or its own handler (train: pipeline/train/stopping.py)."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: train's resume command
    from pipeline import logs

    logs.setup(args.verbose)  # information on stdout, warnings and errors on stderr
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = VERBS[args.verb](args)
    except KeyboardInterrupt:  # Ctrl-C before a verb could stop on its own: no traceback
        print(f"imagen-pipeline {args.verb}: interrupted", file=sys.stderr)
        return EXIT_STOPPED
    except Exception as e:  # every bad input is one line on stderr; -v adds the traceback
        if isinstance(e, TrainingStopped):  # stopped on a signal, checkpointed: its summary and one line
            print(json.dumps(e.summary, default=str))
            print(f"imagen-pipeline {args.verb}: {e}", file=sys.stderr)
            return EXIT_STOPPED
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(error_line(args.verb, e), file=sys.stderr)
        return 2 if isinstance(e, USER_ERRORS) else 1
    print(json.dumps(result, default=str))
    return 0


def entry() -> NoReturn:
    """The ``imagen-pipeline`` command: :func:`main`, then :func:`pipeline.proc.exit_now`
    (every output is written and closed when a verb returns; teardown could still abort it)."""
    from pipeline.proc import exit_now

    code = main()
    logging.shutdown()
    exit_now(code)


if __name__ == "__main__":
    entry()
