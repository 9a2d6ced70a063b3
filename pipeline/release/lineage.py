"""What a registered model version says about itself: its tags (the few facts a user filters
versions on) and the markdown descriptions of the version and of the registered model. Used by
pipeline/release/registry.py::

    tags, rows = lineage(checkpoints, cfgs, metas, runs, encoder_id)
    description = describe_version(rows, encoder_name, tags, eval_metrics, eval_run)

Not a script.
"""

from __future__ import annotations

import contextlib

from pipeline import storage
from pipeline.release.blobs import BLOB_EXPERIMENT
from pipeline.tracking import code_version


def manifest_sha256(checkpoint: str, meta: dict, run) -> str:
    """Hash of the filtered dataset's manifest.json the stage trained on: from the checkpoint
    metadata, else from the training run's ``data`` param, else the manifest of the root the
    checkpoint records."""
    from pipeline.layout import RunLayout
    from pipeline.layout import manifest_sha256 as sha256_of

    if meta.get("manifest_sha256"):
        return str(meta["manifest_sha256"])
    candidates = []
    if run is not None and run.data.params.get("data"):
        candidates.append(run.data.params["data"])
    if meta.get("root"):
        candidates.append(RunLayout(str(meta["root"])).filtered)
    for filtered in candidates:
        with contextlib.suppress(OSError, ValueError):
            if digest := sha256_of(filtered):
                return digest
    return "unknown"


def lineage(checkpoints: list[str], cfgs, metas, runs, encoder_id) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(version tags, one row per stage). The tags are the few facts a user filters versions
    on (stages, data, encoder, code, training runs); the rest of each stage's lineage (preset,
    checkpoint, step, its code version) goes in the description (:func:`describe_version`)."""
    rows = []
    for ckpt, cfg, meta, run in zip(checkpoints, cfgs, metas, runs, strict=True):
        rows.append({"stage": cfg.stage, "preset": cfg.preset, "manifest": manifest_sha256(ckpt, meta, run),
                     "size": f"{cfg.lowres_size} -> {cfg.image_size}" if cfg.lowres_size else str(cfg.image_size),
                     "checkpoint": storage.normalize(ckpt), "step": str(meta.get("step", "?")),
                     "training_run": run.info.run_id if run is not None else "unknown",
                     "code_version": str(meta.get("code_version") or "?")})
    manifests = {r["manifest"] for r in rows}
    tags = {"stages": ",".join(r["stage"] for r in rows), "encoder_id": str(encoder_id),
            "dataset_manifest_sha256": manifests.pop() if len(manifests) == 1 else "mixed",
            "git_commit": code_version(), "training_runs": ",".join(r["training_run"] for r in rows)}
    return tags, rows


def describe_version(rows: list[dict[str, str]], encoder_name, tags: dict[str, str], eval_metrics: dict[str, float],
                     eval_run) -> str:
    """The version page's description (markdown): what the stages are, what they were trained
    on, their evaluation, and where the sample grids and full configs are."""
    lines = ["| stage | preset | size | step | training run | checkpoint | data manifest | code |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['preset']} | {r['size']} px | {r['step']} | `{r['training_run']}` | "
                     f"`{r['checkpoint']}` | `{r['manifest'][:16]}` | `{r['code_version'][:12]}` |")
    lines += ["", f"Text encoder: `{encoder_name}` (`{tags.get('encoder_id')}`)."]
    if eval_metrics:
        shown = sorted(eval_metrics.items())[:12]
        lines += ["", "Evaluation: " + ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in shown) + "."]
    if eval_run is not None:
        lines += ["", f"Sample grids: artifacts `eval/*.png` of run `{eval_run.info.run_id}`."]
    lines += ["", f"Each stage's full `config.json` is in this model's artifacts (`stage_N/`); its "
              f"{tags.get('weights_dtype', 'fp32')} weights and the encoder's files are stored once in the "
              f"`{BLOB_EXPERIMENT}` run `{tags.get('blob_run', '?')}` and listed with their sha256 in "
              "MLmodel (`files`). It loads with `imagen-pipeline sample --model models:/NAME/VERSION`."]
    return "\n".join(lines)


def describe_model(name: str, cfgs) -> str:
    """The registered model's description: what its versions are and how to use them."""
    stages = " -> ".join(f"{c.stage} ({c.image_size} px)" for c in cfgs)
    kind = "A text-to-image cascade" if len(cfgs) > 1 else f"The Imagen {cfgs[0].stage} stage"
    return (f"{kind}: {stages}. Prompts in, uint8 images out (an MLflow pyfunc over safetensors weights). "
            f"`@challenger` is the newest version, `@champion` the one in use. Sample with `imagen-pipeline "
            f"sample \"a red circle\" --model models:/{name}@champion --output x.png`; each version's "
            "description holds its lineage and evaluation.")
