"""Evaluate a stage or a whole cascade on the held-out validation split and a fixed prompt set:
sample grids, sampling speed and metrics, logged to the stage's MLflow run.

    imagen-pipeline evaluate --checkpoint ROOT/checkpoints/sr256/run/final \\
        --data ROOT/filtered --embeddings ROOT/embeddings/ENC          # one stage, real held-out images
    imagen-pipeline evaluate --checkpoint BASE/final --checkpoint SR256/final \\
        --data ROOT/filtered --attributes /tmp/tiny/attributes.json    # the cascade, in order
    ... [--fid-weights inception-2015-12-05.pt] [--clip-model DIR]    # default: the deployment's
                                                                       # $IMAGEN_FID_WEIGHTS, $IMAGEN_CLIP_MODEL

What is measured (keys of the result's ``metrics``; a stage's run logs them as ``eval/<metric>``
without the stage, the same names for every stage, and settings as ``eval.<name>`` tags,
:func:`run_metrics`):

- the prompt set (``--prompts-file``, else ``DEFAULT_PROMPTS``; on the tiny data one prompt
  per colour x shape) sampled from the first stage through the last given, with guidance (each
  stage's configured weight) and without (w = 1): grids ``grid_guided.png`` and
  ``grid_unguided.png``; ``seconds_per_image/<stage>``, ``images_per_s_guided``, ...;
- with ``--attributes`` (the tiny dataset's ground truth): the deterministic checker of
  pipeline/release/metrics.py: ``alignment_color_*``, ``alignment_shape_*``, ``alignment_*``
  (both right), with ``chance_alignment`` for scale;
- a base stage: the first validation captions (their precomputed embeddings: no T5 load),
  sampled guided: ``grid_validation.png``; ``GRID_CAPTIONS`` of them, or ``num_validation``
  when FID or CLIP score is measured on them;
- every SR stage: the first ``num_validation`` validation images, whole at the stage's size,
  super-resolved from their real low-res versions (the loader's own): ``<stage>/psnr``,
  ``<stage>/ssim`` against the real image, and the same for bicubic upsampling of the same
  input (``<stage>/psnr_bicubic``, ...) as the bar to beat; rows of bicubic | SR | real in
  ``grid_sr_<stage>.png``. Without a split: renders of the tiny data (``--attributes``) or
  ``--references`` images, downsampled;
- ``fid`` (against the validation images) and ``clip_score`` (against their captions) of the
  base stage's validation samples, ``<stage>/fid`` and ``<stage>/clip_score`` of an SR stage's
  outputs, only with the deployment's evaluator weights; otherwise each is recorded as skipped
  with the reason (``skipped`` in ``eval/summary.json``).

Speed: the sampling is split into independent parts (the prompt set guided, unguided, the
validation captions, each SR stage's images), run side by side, the costliest first, this
process's torch threads shared out among them (``workers``; 1 runs them one after another,
the cleanest ``seconds_per_image``). A progress line goes to stdout when a part starts and
ends, and at least every ``PROGRESS_SECONDS`` while it samples (an Airflow task log shows them).

A single stage logs into the MLflow run that trained it (found from the checkpoint), a
cascade into a new ``evaluate-cascade`` run; ``--run-id`` chooses one. The tracking store is
the one the checkpoint's training used (the root its metadata records, pipeline/layout.py).
Checkpoints and the grids' folder may be local paths or fsspec URIs (``s3://...``).

``evaluate_runs(trained)`` is the orchestrators' one call: every finished training run of a
DAG run (launch.py's summaries, which name their ``data`` and ``embeddings``) evaluated once
on its validation split, the stages' parts sampled side by side, each stage's result kept in
``eval.json`` beside its checkpoints (a rerun reuses it); ``evaluate_run`` does one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from imagen.config import check_chain
from pipeline import storage
from pipeline.layout import RunDir
from pipeline.options import option
from pipeline.release import sweep
from pipeline.release.eval_data import ValidationSplit, references

# Prompts for a real-data model when no --prompts file is given: fixed, so runs compare.
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a table", "a red car parked on a city street",
    "a bowl of fruit on a wooden table", "a mountain lake at sunset",
    "a painting of a house near a tree", "a close up of a yellow flower",
    "a dog running on the beach", "a plate of food with a fork",
)
EVAL_KEY_TAG = "imagen_eval_key"  # on the run holding a checkpoint set's eval metrics (registry reads it)
# The deployment's evaluator weights (environment of the CLI and of the DAG's workers); no
# weights are ever downloaded: without them FID and CLIP score are skipped, saying so.
FID_WEIGHTS_ENV = "IMAGEN_FID_WEIGHTS"  # a TorchScript feature extractor file (inception-2015-12-05.pt)
CLIP_MODEL_ENV = "IMAGEN_CLIP_MODEL"  # a local transformers CLIP directory
PROGRESS_SECONDS = 15.0  # at most this long between progress lines while sampling
GRID_CAPTIONS = 8  # validation captions a base stage samples for its grid alone (the trainer's grid: 8)
# Figures that are settings, not measurements: run tags ``eval.<name>`` (run_metrics)
SETTINGS = ("guidance_scale", "lowres_aug", "chance_alignment", "chance_alignment_color")


@dataclass
class EvalOptions:
    """What to evaluate against and where to log: the ``evaluate`` verb's flags are generated
    from these fields (``pipeline/options.py``), a flag per field of the same name."""

    attributes: str | None = option(None, "tiny dataset attributes.json: prompt-alignment checker")
    # the prompt set when not on tiny data (default: DEFAULT_PROMPTS); the CLI reads --prompts-file
    prompts: list[str] | None = None
    data: str | None = option(None, "filtered shards holding the validation split (ROOT/filtered): SR stages are "
                                    "scored on its real images, the base samples its captions")
    embeddings: str | None = option(None, "the split's caption embeddings (default: ROOT/embeddings, its one "
                                          "encoder folder)")
    num_validation: int = option(16, "validation samples per stage: the first of the split's fixed order "
                                     "(default 16)")
    references: str | None = option(None, "without --data: real images for FID and SR PSNR/SSIM, a folder of "
                                          "images (+ NAME.txt captions) or of filtered .tar shards")
    num_references: int = option(16, "real images used from --references (default 16)")
    fid_weights: str | None = option(None, "TorchScript Inception feature extractor for FID (e.g. "
                                           f"inception-2015-12-05.pt; default: ${FID_WEIGHTS_ENV}); FID is "
                                           "skipped without it")
    clip_model: str | None = option(None, f"local transformers CLIP directory (default: ${CLIP_MODEL_ENV}); "
                                          "CLIP score is skipped without it")
    encoder: str | None = option(None, "text encoder (default: the one in the checkpoint's metadata)")
    seed: int = option(0, "sampling seed (default 0)")
    steps: int | None = option(None, "sampling steps per stage (default: each config's)")
    guidance_scale: float | None = option(None, "base stage guided weight (default: its config's)")
    sweep: bool = option(True, "--no-sweep: SR stages sample only with the stage's own guidance weight and "
                               "augmentation level (default: sweep a small grid of both on the held-out images, "
                               "log it, and store the best pair with the stage in sampling.json)")
    device: str | None = option(None, "where to sample (default: cuda when there is one, else cpu)")
    workers: int | None = option(None, "sampling parts run at once (default: one per CPU thread; 1 with CUDA); "
                                       "1: one after another, the cleanest timings")
    output: str | None = option(None, "folder or URI for the grids (default: CHECKPOINT/../eval)")
    tracking_uri: str | None = option(None, "MLflow tracking URI (default: the training run's store)")
    run_id: str | None = option(None, "MLflow run to log into (default: the stage's training run)")
    skipped: dict[str, str] = field(default_factory=dict)  # filled in: metric -> why not measured


def deployment_weights() -> dict[str, str | None]:
    """The evaluator weights the deployment provides, read from the environment when called:
    ``{"fid_weights": $IMAGEN_FID_WEIGHTS, "clip_model": $IMAGEN_CLIP_MODEL}`` (None where unset)."""
    return {"fid_weights": os.environ.get(FID_WEIGHTS_ENV) or None,
            "clip_model": os.environ.get(CLIP_MODEL_ENV) or None}


def eval_key(checkpoints: list[str]) -> str:
    """Identity of an evaluated checkpoint set (ordered absolute paths or URIs), for run lookup."""
    joined = "\n".join(storage.normalize(c) for c in checkpoints)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


class Progress:
    """Progress lines of one part of an evaluation, on stdout (an Airflow task log shows them):
    when it starts (what, how many images), at most every ``every`` seconds while it samples
    (stage, step n/N, sampler run k/K of the part, images, seconds), and when it ends."""

    def __init__(self, label: str, part: str, images: int, every: float = PROGRESS_SECONDS,
                 clock: Callable[[], float] = time.monotonic, runs: int = 1):
        self.label, self.part, self.images, self.every, self.clock = label, part, images, every, clock
        self.runs, self.run = runs, 0  # sampler runs in this part (a sweep's settings, a cascade's stages)
        self.start = self.last = 0.0
        self._at: tuple[str, int] | None = None

    def say(self, text: str) -> None:
        print(f"[evaluate {self.label}] {self.part}: {text}", flush=True)

    def begin(self) -> None:
        self.start = self.last = self.clock()
        self.say(f"{self.images} images" + (f", {self.runs} sampler runs" if self.runs > 1 else ""))

    def step(self, stage: str, step: int, steps: int) -> None:
        """The sampler's ``progress(stage, step, steps)`` callback."""
        if self._at is None or stage != self._at[0] or step < self._at[1]:
            self.run += 1  # a new sampler run began (the next setting, the next stage)
        self._at = (stage, step)
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.say(f"sampling {stage}: step {step}/{steps}, run {min(self.run, self.runs)}/{self.runs}, "
                     f"{self.images} images, {now - self.start:.0f} s")

    def end(self) -> float:
        seconds = self.clock() - self.start
        self.say(f"done in {seconds:.1f} s")
        return seconds


@dataclass
class Part:
    """One independent sampling job of an evaluation; ``run()`` keeps its images."""

    label: str
    cost: float  # relative work (images x steps x pixels, x2 with guidance): the costliest start first
    run: Callable[[], None]


def run_parts(parts: list[Part], workers: int | None = None) -> None:
    """Run the sampling parts, the costliest first, ``workers`` at a time (default: one per
    torch thread on a CPU, at most one per part; 1 with a CUDA device), this process's torch
    threads shared out among them: on a small CPU model each part's work is mostly convolutions
    too small to keep several threads busy, while parts side by side do. ``workers=1`` runs them
    one after another with every thread."""
    import torch

    threads = torch.get_num_threads()
    if workers is None:
        workers = 1 if torch.cuda.is_available() else threads
    workers = max(1, min(len(parts), workers))
    order = sorted(parts, key=lambda p: -p.cost)
    if workers == 1:
        for part in order:
            part.run()
        return
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(max(1, threads // workers))  # new threads take it on their first op
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="evaluate") as pool:
            for future in [pool.submit(p.run) for p in order]:
                future.result()
    finally:
        torch.set_num_threads(threads)


def evaluate(checkpoints: str | list[str], options: EvalOptions | None = None, **overrides: Any
             ) -> dict[str, Any]:
    """Evaluate one stage or a cascade (stage weight dirs in cascade order); log to MLflow.

    Returns {"metrics": {...}, "grids": {name: png}, "run_id", "skipped": {metric: reason}}.
    """
    job = Evaluation(checkpoints, replace(options or EvalOptions(), **overrides))
    run_parts(job.parts(), job.opts.workers)
    return job.finish()


class Evaluation:
    """One evaluation (a stage, or a cascade) in three steps: the constructor loads the stages
    and what they are compared against, :meth:`parts` are its independent sampling jobs (for
    :func:`run_parts`), :meth:`finish` scores their images, writes the grids and logs."""

    def __init__(self, checkpoints: str | list[str], opts: EvalOptions):
        import torch

        from imagen.checkpoint import load_model

        self.checkpoints = [checkpoints] if isinstance(checkpoints, str) else list(checkpoints)
        if not self.checkpoints:
            raise ValueError("evaluate needs at least one --checkpoint (a stage weights directory)")
        self.opts = opts
        opts.skipped = {}
        device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(f"[evaluate] loading {len(self.checkpoints)} stage(s) on {device}: "
              + ", ".join(storage.normalize(c) for c in self.checkpoints), flush=True)
        loaded = [load_model(c, device=device, storage=storage) for c in self.checkpoints]
        self.stages = [(m, c) for m, c, _ in loaded]
        self.metas = [meta for _, _, meta in loaded]
        self.label = "+".join(c.stage for _, c in self.stages)
        self.encoder = EncoderOnce(self.checkpoints, self.metas, opts.encoder)
        self.val = ValidationSplit(opts, self.metas[0].get("encoder_id"))
        self.prompts, self.specs, self.palette = prompt_set(opts)
        self.base_first = self.stages[0][1].lowres_size is None
        if not self.base_first:
            check_chain([c.spec for _, c in self.stages])  # SR stages without a base must still chain
            self.prompts = []  # nothing is sampled from the prompt set
        self.captions = None  # the validation captions the base samples (ValidationSet), if any
        self.out: dict[str, Any] = {}  # each part's result
        self.sweeps: dict[str, tuple[sweep.SweepResult, str, int]] = {}  # SR stage -> (result, source, images)
        self.sweep_records: dict[str, dict[str, Any]] = {}  # SR stage -> what sampling.json records
        self.metrics: dict[str, float] = {}

    def progress(self, part: str, images: int, runs: int = 1) -> Progress:
        return Progress(self.label, part, images, runs=runs)

    def parts(self) -> list[Part]:
        """The sampling jobs; their inputs (prompt embeddings, validation samples) are read here."""
        parts = []
        if self.base_first:
            parts += self._base_parts()
        for model, cfg in self.stages:
            if cfg.lowres_size is not None:
                parts += self._sr_part(model, cfg)
        return parts

    def _base_parts(self) -> list[Part]:
        from imagen.cascade import Cascade

        cascade = Cascade(self.stages, metadata=self.metas)
        cascade.set_encoder(self.encoder())  # checks it against the stages (identity, width)
        text, mask = self.encoder.encode(self.prompts)

        def sample(name: str, what: str, embeds, embeds_mask, guided: bool) -> Callable[[], None]:
            def run() -> None:
                say = self.progress(what, len(embeds), runs=len(cascade.stages))
                say.begin()
                self.out[name] = cascade.run(text_embeds=embeds, text_mask=embeds_mask, seed=self.opts.seed,
                                             options=guided_options(cascade, self.opts, guided), progress=say.step)
                say.end()
            return run

        parts = [Part(f"{self.label}: prompt set, {g}", self._cost(len(self.prompts), g == "guided"),
                      sample(g, f"prompt set, {g}", text, mask, g == "guided")) for g in ("guided", "unguided")]
        captions = self.val.get(self.stages[0][1])
        if captions is None:
            self.opts.skipped["validation_grid"] = self.val.reason(self.stages[0][1])
            return parts
        # the grid alone needs a few; FID and CLIP score, when measured, all of them
        measured = self.opts.fid_weights or self.opts.clip_model
        self.captions = captions.head(len(captions) if measured else GRID_CAPTIONS)
        parts.append(Part(f"{self.label}: validation captions", self._cost(len(self.captions), True),
                          sample("validation", "validation captions, guided", self.captions.text_embeds,
                                 self.captions.text_mask, True)))
        return parts

    def _cost(self, images: int, guided: bool) -> float:
        steps = [self.opts.steps or c.diffusion.sample_steps for _, c in self.stages]
        return images * sum(s * c.image_size**2 for s, (_, c) in zip(steps, self.stages, strict=True)) * (
            2 if guided else 1)

    def _sr_part(self, model, cfg) -> list[Part]:
        """Inputs of one SR stage: the validation images and their low-res versions, else
        references downsampled (renders of the tiny data, ``--references``), else nothing."""
        import torch

        from imagen.cascade import StageOptions, run_stage, to_uint8
        from pipeline.release.metrics import resize

        data = self.val.get(cfg)
        if data is not None:
            target, low, captions, text, mask = data.images, data.lowres, data.captions, data.text_embeds, data.text_mask
        else:
            refs = references(self.opts, cfg.image_size, self.specs)
            if refs is None:
                self.opts.skipped[f"{cfg.stage}/psnr"] = (f"{self.val.reason(cfg)}; without it, needs --attributes "
                                                          "(tiny data) or --references DIR")
                return []
            target, captions = refs
            low = resize(target, cfg.lowres_size, "area")  # as pipeline/data/loader.py makes the training input
            text, mask = self.encoder.encode(captions)
        device = next(model.parameters()).device
        # the loader's normalisation (pipeline/data/batch.py): 0 and 255 map to exactly -1 and 1
        lowres = (torch.from_numpy(low).permute(0, 3, 1, 2).float().to(device) - 127.5) / 127.5
        source = "validation" if data is not None else "reference"

        pairs = sweep.grid(cfg) if self.opts.sweep else [(cfg.diffusion.lowres_aug_sample, cfg.diffusion.guidance_scale)]

        def run() -> None:
            say = self.progress(f"super-resolution of {source} images"
                                + (f", {len(pairs)} sampling settings" if self.opts.sweep else ""),
                                len(target) * len(pairs), runs=len(pairs))
            say.begin()
            if self.opts.sweep:
                found = sweep.sweep_sr(model, cfg, lowres, target, text, mask, self.opts.seed, self.opts.steps, say.step)
                self.sweeps[cfg.stage] = (found, source, len(target))
                self.out[f"sr_{cfg.stage}"] = (found.images, found.seconds, target, low, captions)
                say.end()
                return
            gen = torch.Generator(device).manual_seed(self.opts.seed)
            with torch.no_grad():
                x = run_stage(model, cfg, StageOptions(steps=self.opts.steps), text.to(device).float(),
                              mask.to(device).bool(), lowres, gen, say.step)
            self.out[f"sr_{cfg.stage}"] = (to_uint8(x), say.end(), target, low, captions)

        steps = self.opts.steps or cfg.diffusion.sample_steps
        cost = sum(len(target) * steps * cfg.image_size**2 * (1 + (w != 1.0)) for _, w in pairs)
        return [Part(f"{cfg.stage}: super-resolution", cost, run)]

    def finish(self) -> dict[str, Any]:
        """Score the parts' images, write the grids and log them with the metrics."""
        images: dict[str, np.ndarray | None] = {}
        measured = [k for k in ("fid_weights", "clip_model") if getattr(self.opts, k)]
        self.progress("scoring", 0).say("alignment, PSNR/SSIM" + (f", {' and '.join(measured)}" if measured else ""))
        if self.base_first:
            images.update(self._score_prompt_set())
            images["validation"] = self._score_validation(images["guided"])
        for _, cfg in self.stages:
            if f"sr_{cfg.stage}" in self.out:
                images[f"sr_{cfg.stage}"] = self._score_sr(cfg, *self.out[f"sr_{cfg.stage}"])
        self._keep_sweeps()
        opts = self.opts
        for name, reason in opts.skipped.items():
            self.progress("skipped", 0).say(f"{name}: {reason}")
        grids = write_grids(images, opts.output or RunDir.of(self.checkpoints[-1]).eval_dir, self._grid_labels())
        self.progress("MLflow", 0).say(f"logging {len(self.metrics)} figures and {len(grids)} grids")
        run_id, store = log_to_mlflow(self.checkpoints, self.metas, opts, self.metrics, grids, self.prompts,
                                      self.val.used, self.sweep_records, [c.stage for _, c in self.stages])
        return {"metrics": self.metrics, "grids": grids, "run_id": run_id, "tracking_uri": store,
                "skipped": dict(opts.skipped),
                "sampling": {stage: r["chosen"] for stage, r in self.sweep_records.items()}}

    def _grid_labels(self) -> dict[str, tuple[int | None, list[str] | None, list[str] | None]]:
        """Each grid's layout and labels: the tiny data's prompt set as colours (rows) x shapes
        (columns), other prompts and validation captions one per row, SR rows of bicubic | SR |
        real under their captions."""
        out: dict[str, tuple[int | None, list[str] | None, list[str] | None]] = {}
        if self.specs is not None:
            shapes = list(dict.fromkeys(s for _, s in self.specs))
            layout = (len(shapes), shapes, list(dict.fromkeys(c for c, _ in self.specs)))
        else:
            layout = (1, None, list(self.prompts))
        out["guided"] = out["unguided"] = layout
        if self.captions is not None:
            out["validation"] = (1, None, list(self.captions.captions or []) or None)
        for _, cfg in self.stages:
            if f"sr_{cfg.stage}" in self.out:
                captions = self.out[f"sr_{cfg.stage}"][4]
                out[f"sr_{cfg.stage}"] = (3, ["bicubic", cfg.stage, "real"], list(captions) if captions else None)
        return out

    def _score_prompt_set(self) -> dict[str, np.ndarray]:
        """Speed per stage, alignment on tiny data."""
        metrics, n = self.metrics, len(self.prompts)
        images = {}
        for label in ("guided", "unguided"):
            out = self.out[label]
            images[label] = out.images
            total = sum(out.seconds)
            metrics[f"seconds_per_image_{label}"] = total / n
            metrics[f"images_per_s_{label}"] = n / total
            if label == "guided":
                for (_, cfg), sec in zip(self.stages, out.seconds, strict=True):
                    metrics[f"seconds_per_image/{cfg.stage}"] = sec / n
            if self.specs is not None:
                from pipeline.release.metrics import alignment

                score = alignment(out.images, self.specs, self.palette)
                metrics[f"alignment_{label}"] = score["both"]
                metrics[f"alignment_color_{label}"] = score["color"]
                metrics[f"alignment_shape_{label}"] = score["shape"]
        base_w = self.stages[0][1].diffusion.guidance_scale
        metrics["guidance_scale"] = float(base_w if self.opts.guidance_scale is None else self.opts.guidance_scale)
        if self.specs is not None:
            metrics["chance_alignment"] = 1.0 / len(self.specs)
            metrics["chance_alignment_color"] = 1.0 / len(self.palette)
        return images

    def _score_validation(self, prompt_images: np.ndarray) -> np.ndarray | None:
        """FID of the validation captions' samples against the validation images (at the
        output size), CLIP score against their captions; without a split, of the prompt set's
        guided samples against renders of the tiny data or ``--references``, and the prompts."""
        if "validation" not in self.out:
            refs = references(self.opts, prompt_images.shape[1], self.specs)
            quality_metrics(prompt_images, None if refs is None else refs[0], self.prompts, "", self.opts,
                            self.metrics, "--attributes (tiny data), --references DIR or the validation split (--data)")
            return None
        sampled = self.out["validation"].images
        last = self.stages[-1][1]
        real = self.val.get(last)  # the same samples for a base stage alone
        quality_metrics(sampled, None if real is None else real.images, self.captions.captions, "", self.opts,
                        self.metrics, self.val.reason(last))
        return sampled

    def _keep_sweeps(self) -> None:
        """Log each SR stage's sweep (a metric per pair, the chosen pair, the table) and store
        the chosen pair with the stage (sampling.json: register, sample and the cascade use it)."""
        from imagen.checkpoint import save_sampling

        for checkpoint, (_, cfg) in zip(self.checkpoints, self.stages, strict=True):
            if cfg.stage not in self.sweeps:
                continue
            found, source, n = self.sweeps[cfg.stage]
            for row in found.table:
                self.metrics[f"{cfg.stage}/sweep/{sweep.metric_name(row['lowres_aug'], row['guidance_scale'])}"] = \
                    row[sweep.METRIC]
            self.metrics[f"{cfg.stage}/guidance_scale"] = found.values["guidance_scale"]
            self.metrics[f"{cfg.stage}/lowres_aug"] = found.values["lowres_aug_sample"]
            record = found.record(source, n, self.opts.seed)
            self.sweep_records[cfg.stage] = {**record, "chosen": found.values}
            save_sampling(checkpoint, found.values, record, storage)
            self.progress("sweep", n).say(
                f"{cfg.stage} samples with guidance {found.values['guidance_scale']:g} at augmentation level "
                f"{found.values['lowres_aug_sample']:g} from now on (best {sweep.METRIC} of {len(found.table)} "
                f"settings on {n} {source} images)")

    def _score_sr(self, cfg, sr: np.ndarray, seconds: float, target: np.ndarray, low: np.ndarray,
                  captions: list[str] | None) -> np.ndarray:
        """PSNR/SSIM of the SR outputs and of bicubic upsampling of the same inputs, against
        the real images; returns rows of (bicubic, SR, real) for the grid."""
        from pipeline.release.metrics import psnr_ssim, resize

        self.metrics[f"{cfg.stage}/seconds_per_image_sr"] = seconds / len(target)
        bicubic = resize(low, cfg.image_size)
        for suffix, images in (("", sr), ("_bicubic", bicubic)):
            for k, v in psnr_ssim(images, target).items():
                self.metrics[f"{cfg.stage}/{k}{suffix}"] = v
        quality_metrics(sr, target, captions, f"{cfg.stage}/", self.opts, self.metrics, self.val.reason(cfg))
        return np.stack([img for trio in zip(bicubic, sr, target, strict=True) for img in trio])


class EncoderOnce:
    """The text encoder the stages were trained on, opened on first use: the validation split's
    captions come with their embeddings, so an SR stage evaluated on it needs no T5 at all."""

    def __init__(self, checkpoints: list[str], metas: list[dict], override: str | None):
        self.checkpoints, self.metas, self.override, self.encoder = checkpoints, metas, override, None

    def __call__(self):
        if self.encoder is None:
            self.encoder = load_encoder(self.checkpoints, self.metas, self.override)
        return self.encoder

    def encode(self, texts: list[str]):
        return self().encode(list(texts))


def load_encoder(checkpoints: list[str], metas: list[dict], override: str | None):
    """The text encoder the stages were trained on (``override`` first, else the local
    directory the checkpoint names; a hub name is used only as ``override``), checked against
    every stage's recorded encoder id."""
    from imagen.checkpoint import CONFIG_NAME, load_config
    from pipeline.release.loading import choose_encoder

    cfgs = [load_config(c, storage)[0] for c in checkpoints]
    return choose_encoder(storage.join(checkpoints[0], CONFIG_NAME), metas, cfgs, override=override)


def prompt_set(opts: EvalOptions) -> tuple[list[str], list[tuple[str, str]] | None, dict | None]:
    """Prompts, their (colour, shape) specs and the palette; specs/palette only on tiny data."""
    if not opts.attributes:
        opts.skipped["alignment"] = "needs --attributes (the tiny dataset's attributes.json)"
        return list(opts.prompts or DEFAULT_PROMPTS), None, None
    with storage.open(opts.attributes, "r") as f:  # an http(s) URL goes through the fetch guard
        attrs = json.load(f)
    palette = {k: tuple(v) for k, v in attrs["colors"].items()}
    specs = [(c, s) for c in palette for s in attrs["shapes"]]
    return [f"a {c} {s} on a white background" for c, s in specs], specs, palette


def guided_options(cascade, opts: EvalOptions, guided: bool) -> list:
    """Per-stage sampling options: each stage's configured weight (the base's may be
    overridden by ``opts.guidance_scale``), or w = 1 everywhere."""
    from imagen.cascade import StageOptions

    if not guided:
        return [StageOptions(steps=opts.steps, guidance_scale=1.0) for _ in cascade.stages]
    return [StageOptions(steps=opts.steps, guidance_scale=opts.guidance_scale if i == 0 else None)
            for i in range(len(cascade.stages))]


def quality_metrics(images: np.ndarray, real: np.ndarray | None, texts: list[str] | None, prefix: str,
                    opts: EvalOptions, metrics: dict[str, float], refs_needed: str) -> None:
    """``<prefix>fid`` of ``images`` against ``real`` and ``<prefix>clip_score`` against
    ``texts``, when the deployment gives weights; otherwise skipped, with the reason."""
    from pipeline.release import metrics as m

    if not opts.fid_weights:
        opts.skipped[f"{prefix}fid"] = (f"no FID weights: set {FID_WEIGHTS_ENV} (or pass --fid-weights) to a "
                                        "TorchScript Inception feature extractor, e.g. inception-2015-12-05.pt")
    elif real is None:
        opts.skipped[f"{prefix}fid"] = f"no reference images: {refs_needed}"
    elif min(len(real), len(images)) < 2:
        opts.skipped[f"{prefix}fid"] = f"FID needs at least 2 images per set, got {len(real)} real, {len(images)}"
    else:
        metrics[f"{prefix}fid"] = m.fid(real, images, opts.fid_weights)
    if not opts.clip_model:
        opts.skipped[f"{prefix}clip_score"] = (f"no CLIP model: set {CLIP_MODEL_ENV} (or pass --clip-model) to a "
                                               "local transformers CLIP directory, e.g. a saved "
                                               "openai/clip-vit-base-patch16")
    elif not texts:
        opts.skipped[f"{prefix}clip_score"] = "the validation shards hold no caption text"
    else:
        metrics[f"{prefix}clip_score"] = m.clip_score(images, texts, opts.clip_model)


def write_grids(images: dict[str, np.ndarray | None], out_dir: str,
                labels: dict[str, tuple[int | None, list[str] | None, list[str] | None]] | None = None
                ) -> dict[str, str]:
    """One PNG per image set in ``out_dir`` (a folder or URI); returns {name: its URI}.
    ``labels``: name -> (columns, column labels, row labels) of its grid (pipeline/grids.py)."""
    import io

    from PIL import Image

    from pipeline.grids import make_grid

    paths = {}
    for name, imgs in images.items():
        if imgs is None:
            continue
        paths[name] = storage.join(out_dir, f"grid_{name}.png")
        cols, col_labels, row_labels = (labels or {}).get(name, (None, None, None))
        png = io.BytesIO()
        Image.fromarray(make_grid(imgs, cols=cols, col_labels=col_labels, row_labels=row_labels)).save(png, format="PNG")
        storage.write_bytes(paths[name], png.getvalue())
    return paths


def find_stage_run(checkpoint: str, meta: dict) -> str | None:
    """The MLflow run that trained ``checkpoint``: its metadata's run id, else the run tagged
    with its path (pipeline/train/trainer.py tags ``checkpoint``); None when neither exists here."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    if meta.get("mlflow_run_id"):
        try:
            return client.get_run(meta["mlflow_run_id"]).info.run_id
        except MlflowException:
            pass  # trained against another tracking server: fall back to the tag
    path = storage.normalize(checkpoint).replace("'", "\\'")
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"tags.checkpoint = '{path}'", max_results=1) if exps else []
    return runs[0].info.run_id if runs else None


def run_metrics(metrics: dict[str, float], stages: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) as a run records them: ``eval/<metric>`` in every stage's own run, the
    same names for every stage (``eval/psnr``, ``eval/seconds_per_image``, ``eval/fid`` ...), so
    the MLflow compare view lines up; a cascade's run keeps the stage in the name
    (``eval/sr256/psnr``). Settings (``SETTINGS``: guidance weight, augmentation level, chance
    levels) are tags ``eval.<name>``, not metrics."""
    alone = stages[0] if len(stages) == 1 else None
    logged, tags = {}, {}
    for key, value in metrics.items():
        name = key
        if alone:
            name = name.removeprefix(f"{alone}/")
            if name in (f"seconds_per_image/{alone}", "seconds_per_image_sr"):
                name = "seconds_per_image"  # the stage's own sampling time, whichever part measured it
        if name.rsplit("/", 1)[-1] in SETTINGS:
            tags[f"eval.{name}"] = f"{value:g}"
        else:
            logged[f"eval/{name}"] = value
    return logged, tags


def log_to_mlflow(checkpoints, metas, opts: EvalOptions, metrics, grids, prompts, validation,
                  sweeps: dict[str, dict] | None = None, stages: list[str] | None = None) -> tuple[str, str]:
    """Log into the stage's training run (or ``opts.run_id``) without reopening it: the run keeps
    its training start and end time. A cascade gets a new ``evaluate-cascade`` run. Returns
    (run id, tracking store)."""
    import contextlib
    import tempfile

    import mlflow

    from pipeline.layout import checkpoint_tracking
    from pipeline.tracking import airflow_tags, ensure_experiment, log_to_run

    tracking_uri, artifacts = checkpoint_tracking(metas[0], opts.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    run_id = opts.run_id or (find_stage_run(checkpoints[0], metas[0]) if len(checkpoints) == 1 else None)
    made = run_id is None
    if made:
        name = "evaluate-" + ("cascade" if len(checkpoints) > 1 else storage.basename(
            storage.parent(storage.normalize(checkpoints[0]))))
        run_id = client.create_run(ensure_experiment("imagen", artifacts), run_name=name,
                                   tags=airflow_tags()).info.run_id
    logged, tags = run_metrics(metrics, stages or [str(m.get("stage", "")) for m in metas])
    tags.update({EVAL_KEY_TAG: eval_key(checkpoints), "eval.seed": str(opts.seed),
                 "eval.prompts": str(len(prompts)), "eval.validation_samples": str(max([len(v.get("keys", [])) for v in (validation or {}).values()], default=0))})
    if opts.steps:
        tags["eval.steps"] = str(opts.steps)
    summary = {"checkpoints": [storage.normalize(c) for c in checkpoints], "prompts": prompts,
               "validation": {"data": opts.data, "samples": validation}, "seed": opts.seed,
               "steps": opts.steps, "metrics": metrics, "skipped": opts.skipped}
    with tempfile.TemporaryDirectory(prefix="imagen-eval-") as tmp, contextlib.ExitStack() as files:
        docs = {"summary.json": summary, **{f"sweep_{stage}.json": r for stage, r in (sweeps or {}).items()}}
        for fname, doc in docs.items():
            with open(os.path.join(tmp, fname), "w") as f:
                json.dump(doc, f, indent=2, default=str)
        local = {os.path.join(tmp, fname): "eval" for fname in docs}
        local.update({files.enter_context(storage.local_file(uri)): "eval" for uri in grids.values()})
        log_to_run(client, run_id, logged, tags, local)
    if made:
        client.set_terminated(run_id)
    return run_id, tracking_uri


def evaluate_runs(trained: list[dict[str, Any] | None], attributes: str | None = None, encoder: str | None = None,
                  **options: Any) -> dict[str, dict[str, Any]]:
    """Evaluate finished training runs (launch.py's summaries: ``checkpoint``, ``stage``, ``data``,
    ``embeddings``; None entries, skipped stages, drop out), each once, on its validation split,
    into the run that trained it, with the deployment's evaluator weights
    (:func:`deployment_weights`); every stage's sampling parts run side by side. Each result is
    kept in ``eval.json`` beside its checkpoints; a rerun gives it back with ``"reused": True``.
    ``options``: further :class:`EvalOptions` fields. Returns ``{stage: result}``."""
    todo = [t for t in trained if t]
    results: dict[str, dict[str, Any]] = {}
    jobs: dict[str, tuple[Evaluation, str]] = {}
    for t in todo:
        marker = RunDir.of(t["checkpoint"]).eval_marker
        if storage.exists(marker):
            results[t["stage"]] = {**storage.read_json(marker), "reused": True}
            continue
        opts = EvalOptions(attributes=attributes, encoder=encoder, data=t.get("data"), embeddings=t.get("embeddings"),
                           **{**deployment_weights(), **options})
        jobs[t["stage"]] = (Evaluation(t["checkpoint"], opts), marker)
    run_parts([p for job, _ in jobs.values() for p in job.parts()], options.get("workers"))
    for stage, (job, marker) in jobs.items():
        result = job.finish()
        storage.write_json(marker, result)
        results[stage] = {**result, "reused": False}
    return {t["stage"]: results[t["stage"]] for t in todo}


def evaluate_run(trained: dict[str, Any], attributes: str | None = None, encoder: str | None = None,
                 **options: Any) -> dict[str, Any]:
    """:func:`evaluate_runs` of one training run."""
    return evaluate_runs([trained], attributes, encoder, **options)[trained["stage"]]
