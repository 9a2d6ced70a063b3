"""``imagen-pipeline``: one entry point, one verb per pipeline step.

    imagen-pipeline tiny-data --output /tmp/tiny --port 8799 [--serve]
    imagen-pipeline download --url-list /tmp/tiny/urls.parquet --output ROOT/raw --allow-private-networks
    imagen-pipeline filter --input ROOT/raw --output ROOT/filtered
    imagen-pipeline embed --input ROOT/filtered --output ROOT/embeddings --encoder google/t5-v1_1-xxl
    imagen-pipeline train --stage base64 --preset tiny --data ROOT/filtered --embeddings DIR \\
        --max-steps 60 --checkpoint-dir ROOT/checkpoints/base64/run1 [--resume latest]
    imagen-pipeline evaluate --checkpoint ROOT/checkpoints/base64/run1/final
    imagen-pipeline register --checkpoint ROOT/checkpoints/base64/run1/final --name imagen-base64
    imagen-pipeline sample "a red circle" --model models:/imagen-base64@challenger --output x.png

Every verb takes ``--help``. Heavy libraries are imported inside each verb, so ``--help``
answers at once. Each verb prints a JSON summary as its last line, for scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

VERBS: dict[str, Callable[[argparse.Namespace], Any]] = {}


def verb(name: str):
    def deco(fn):
        VERBS[name] = fn
        return fn

    return deco


@verb("tiny-data")
def _tiny_data(a: argparse.Namespace) -> Any:
    from pipeline.tinydata import make_tiny_dataset, serve_forever
    from pipeline.tinymodels import build_tiny_t5

    result = make_tiny_dataset(a.output, n=a.n, seed=a.seed, port=a.port)
    if not a.no_encoder:
        result["encoder"] = build_tiny_t5(os.path.join(a.output, "t5-tiny"), seed=a.seed)
    if a.serve:
        print(json.dumps(result), flush=True)
        print(f"serving {a.output} on http://127.0.0.1:{a.port}/ (Ctrl-C to stop)", flush=True)
        serve_forever(a.output, a.port)
    return result


@verb("download")
def _download(a: argparse.Namespace) -> Any:
    from pipeline.download import download

    return download(a.url_list, a.output, image_size=a.image_size, resize_mode=a.resize_mode,
                    url_col=a.url_col, caption_col=a.caption_col, processes=a.processes,
                    threads=a.threads, timeout=a.timeout, retries=a.retries,
                    number_sample_per_shard=a.samples_per_shard,
                    allow_private_networks=a.allow_private_networks)


@verb("filter")
def _filter(a: argparse.Namespace) -> Any:
    from pipeline.filters import FilterConfig, filter_shards, format_reject_table

    cfg = FilterConfig(min_caption_chars=a.min_caption_chars, max_caption_chars=a.max_caption_chars,
                       min_side=a.min_side, max_aspect=a.max_aspect)
    manifest = filter_shards(a.input, a.output, cfg, samples_per_shard=a.samples_per_shard)
    print(format_reject_table(manifest))
    return {k: manifest[k] for k in manifest if k not in ("shards",)}


@verb("embed")
def _embed(a: argparse.Namespace) -> Any:
    from pipeline.embed import embed_shards

    return embed_shards(a.input, a.output, a.encoder, max_length=a.max_length,
                        batch_size=a.batch_size, device=a.device, dtype=a.dtype)


@verb("train")
def _train(a: argparse.Namespace) -> Any:
    from pipeline import launch, train

    if a.nproc_per_node > 1:
        return launch.torchrun_train(train.job_to_argv(train.job_from_args(a)), a.nproc_per_node)
    return train.run(train.job_from_args(a))


@verb("evaluate")
def _evaluate(a: argparse.Namespace) -> Any:
    from pipeline.evaluate import evaluate

    return evaluate(a.checkpoint, attributes=a.attributes, output=a.output, seed=a.seed,
                    tracking_uri=a.tracking_uri, run_id=a.run_id, steps=a.steps)


@verb("register")
def _register(a: argparse.Namespace) -> Any:
    from pipeline.registry import register

    return register(a.checkpoint, a.name, alias=a.alias, tracking_uri=a.tracking_uri, run_id=a.run_id)


@verb("sample")
def _sample(a: argparse.Namespace) -> Any:
    from pipeline.registry import sample_images

    paths = sample_images(a.prompts, a.model, a.output, seed=a.seed, steps=a.steps,
                          guidance_scale=a.guidance_scale, tracking_uri=a.tracking_uri)
    return {"images": paths}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagen-pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("tiny-data", help="render the synthetic tiny dataset (+ tiny T5) and serve it")
    s.add_argument("--output", required=True, help="directory to write images, urls.parquet, t5-tiny/")
    s.add_argument("--n", type=int, default=240, help="number of good images (default 240)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--port", type=int, default=8799, help="loopback port the URLs point at")
    s.add_argument("--serve", action="store_true", help="then serve the directory on 127.0.0.1:PORT")
    s.add_argument("--no-encoder", action="store_true", help="skip building the tiny T5 encoder")

    s = sub.add_parser("download", help="img2dataset: URL list -> raw WebDataset shards")
    s.add_argument("--url-list", required=True, help="parquet/csv/tsv/jsonl with url and caption columns")
    s.add_argument("--output", required=True, help="raw shards directory (ROOT/raw)")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--resize-mode", default="center_crop",
                   help="img2dataset resize mode: center_crop (base), keep_ratio or no (SR stages)")
    s.add_argument("--url-col", default="url")
    s.add_argument("--caption-col", default="caption")
    s.add_argument("--processes", type=int, default=1)
    s.add_argument("--threads", type=int, default=16)
    s.add_argument("--timeout", type=int, default=10, help="seconds per request")
    s.add_argument("--retries", type=int, default=1)
    s.add_argument("--samples-per-shard", type=int, default=10000)
    s.add_argument("--allow-private-networks", action="store_true",
                   help="fetch private/loopback/link-local addresses (refused by default)")

    s = sub.add_parser("filter", help="caption/size/aspect/dedup filters -> filtered shards + report")
    s.add_argument("--input", required=True, help="raw shards directory")
    s.add_argument("--output", required=True, help="filtered shards directory (ROOT/filtered)")
    s.add_argument("--min-caption-chars", type=int, default=3)
    s.add_argument("--max-caption-chars", type=int, default=512)
    s.add_argument("--min-side", type=int, default=64, help="reject images smaller than this")
    s.add_argument("--max-aspect", type=float, default=2.0)
    s.add_argument("--samples-per-shard", type=int, default=1000)

    s = sub.add_parser("embed", help="frozen T5 over captions -> one Parquet per shard")
    s.add_argument("--input", required=True, help="filtered shards directory")
    s.add_argument("--output", required=True, help="embeddings root (ROOT/embeddings)")
    s.add_argument("--encoder", default="google/t5-v1_1-xxl", help="hub name or local directory")
    s.add_argument("--max-length", type=int, default=128, help="max tokens (Imagen: 128)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", help="cpu, cuda ... (default: GPU if any)")
    s.add_argument("--dtype", help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")

    from pipeline.train import add_arguments

    s = sub.add_parser("train", help="train one cascade stage (torchrun for several processes)")
    add_arguments(s)
    s.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) via torchrun")

    s = sub.add_parser("evaluate", help="sample grid + prompt-alignment metrics for a stage")
    s.add_argument("--checkpoint", required=True, help="stage weights directory (.../final)")
    s.add_argument("--attributes", help="tiny dataset attributes.json for the alignment checker")
    s.add_argument("--output", help="where to write the grid (default: CHECKPOINT/../eval)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, help="sampling steps (default: the stage config's)")
    s.add_argument("--run-id", help="MLflow run to log into (default: a new run)")
    s.add_argument("--tracking-uri")

    s = sub.add_parser("register", help="register stage weights in the MLflow Model Registry")
    s.add_argument("--checkpoint", required=True, action="append",
                   help="stage weights dir; repeat in cascade order for a cascade")
    s.add_argument("--name", required=True, help="registered model name, e.g. imagen-base64")
    s.add_argument("--alias", default="challenger")
    s.add_argument("--run-id", help="log the model into this (training) run")
    s.add_argument("--tracking-uri")

    s = sub.add_parser("sample", help="generate images from a registered model")
    s.add_argument("prompts", nargs="+", help="one or more prompts")
    s.add_argument("--model", required=True, help="models:/NAME@ALIAS (or any MLflow model URI)")
    s.add_argument("--output", required=True, help="x.png for one prompt, else a directory")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, help="sampling steps (default: the stage config's)")
    s.add_argument("--guidance-scale", type=float, help="classifier-free guidance weight")
    s.add_argument("--tracking-uri")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        result = VERBS[args.verb](args)
    except (ValueError, FileNotFoundError, LookupError, RuntimeError) as e:
        print(f"imagen-pipeline {args.verb}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
