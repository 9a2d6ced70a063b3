"""Typed configs and named presets: the single source of defaults for the model library.

A cascade stage is described by one :class:`StageConfig` (U-Net, diffusion, training
hyper-parameters, text-encoder identity). Presets are plain functions returning configs::

    from imagen.config import preset
    cfg = preset("base64")            # paper-sized base model
    cfg = preset("tiny", "sr256")     # CPU-sized SR stage for tests and the smoke test

Configs round-trip through JSON (``to_dict`` / ``from_dict``) so the resolved config is
saved beside every checkpoint and logged to every run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

STAGES = ("base64", "sr256", "sr1024")


@dataclass
class UNetConfig:
    """Shape of the (Efficient) U-Net. Every level halves the resolution: the plain layout
    after its blocks (the last level excepted), the efficient one before them (all levels)."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 64  # width of level 0; level i has channels * channel_mults[i]
    channel_mults: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)  # per level (Efficient U-Net: more at low res)
    self_attn_levels: tuple[bool, ...] = (False, True, True, True)
    cross_attn_levels: tuple[bool, ...] = (False, True, True, True)
    mid_self_attn: bool = True  # self-attention in the middle block (off for the 1024 stage)
    head_dim: int = 64
    text_embed_dim: int = 4096  # T5-XXL
    cond_dim: int | None = None  # time/pooled-text embedding width; default 4 * channels
    lowres_cond: bool = False  # SR stage: upsampled low-res image concatenated to the input
    efficient: bool = False  # Efficient U-Net (Imagen appendix B.1)
    # Skip connections. "block": ADM's (Dhariwal & Nichol 2021), which the Imagen base model
    # follows: one after the stem, each res block and each downsample, consumed by n + 1 res
    # blocks per up level. "level": one per level, into the first block of the up level: the
    # Efficient U-Net's (appendix B.1), and the plain layout's in configs written before this
    # field (StageConfig.from_dict). None: the layout's own ("level" if efficient else "block").
    skips: str | None = None
    dropout: float = 0.0
    num_groups: int = 32  # GroupNorm groups (capped by channel count)

    def __post_init__(self) -> None:
        n = len(self.channel_mults)
        for name in ("num_res_blocks", "self_attn_levels", "cross_attn_levels"):
            value = tuple(getattr(self, name))
            if len(value) != n:
                raise ValueError(f"UNetConfig.{name} has {len(value)} entries, channel_mults has {n}")
            setattr(self, name, value)
        self.channel_mults = tuple(self.channel_mults)
        if self.skips is None:
            self.skips = "level" if self.efficient else "block"
        if self.skips not in ("block", "level"):
            raise ValueError(f"UNetConfig.skips is {self.skips!r}: choose 'block' (ADM) or 'level'")
        if self.efficient and self.skips != "level":
            raise ValueError("the Efficient U-Net has one skip per level (Imagen appendix B.1): "
                             "set skips='level' (or leave it None) with efficient=True")
        # the Efficient U-Net halves once more: its first level downsamples too (appendix B.1)
        halvings = n if self.efficient else n - 1
        if self.image_size % 2**halvings:
            raise ValueError(f"image_size {self.image_size} not divisible by 2**{halvings} "
                             f"({n} levels, efficient={self.efficient}): change image_size or channel_mults")

    @property
    def time_dim(self) -> int:
        return self.cond_dim or 4 * self.channels


@dataclass
class DiffusionConfig:
    """Continuous-time Gaussian diffusion (Imagen sec. 2.4, appendix A)."""

    schedule: str = "cosine"  # "cosine" (64, 256) or "linear" (1024), Imagen appendix
    prediction: str = "v"  # "eps" or "v"
    min_snr_gamma: float | None = 5.0  # min-SNR loss weighting (Hang et al. 2023); None = off
    cond_drop_prob: float = 0.1  # text dropped for CFG, Imagen sec. 2.2
    # noise-conditioning augmentation for SR stages, Imagen sec. 2.5: trained over the whole
    # range of levels, sampled at one fixed level (chosen on validation: pipeline/release/sweep.py)
    lowres_aug_max: float = 1.0  # training: aug level t ~ U(0, lowres_aug_max)
    lowres_aug_sample: float = 0.0  # sampling: fixed aug level
    # sampling defaults (an evaluation may choose others for a trained stage: imagen/checkpoint.py's
    # sampling.json)
    sample_steps: int = 64
    sampler: str = "ddpm"  # a name in imagen.samplers.SAMPLERS: "ddpm", "ddim", "dpmpp_2m"
    guidance_scale: float = 5.0
    dynamic_threshold: float | None = 0.995  # percentile p, Imagen sec. 2.3; None = static clip


@dataclass
class TrainConfig:
    """Optimisation hyper-parameters for one stage.

    ``global_batch`` is the contract of a preset: images per optimizer step over all
    processes, as in the paper (Imagen appendix F: 2048 for the base model, 4096 for SR).
    ``micro_batch`` is what one device holds at once; the trainer derives the gradient
    accumulation from both and the world size (``pipeline.train.job.batch_plan``), so the
    same preset trains the same model on 1 or 64 GPUs.
    """

    global_batch: int = 8
    micro_batch: int = 8  # per device and forward pass: the default for a GPU of 80 GB or more
    lr: float = 1e-4
    warmup_steps: int = 10_000  # Imagen appendix: 10k linear warmup
    # after the warm-up: "constant" (the paper's) or "cosine" (down to 10% of lr by max_steps)
    lr_schedule: str = "constant"
    max_steps: int = 2_500_000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # the EMA's final decay, reached by a power-law warm-up (imagen.ema)
    ema_update_after_step: int = 100
    ema_update_every: int = 10
    ema_power: float = 2 / 3
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 3
    log_every: int = 50
    sample_every: int = 5_000
    # validation loss on the held-out split (pipeline/train/validation.py): every eval_every
    # steps (but at least four times in a run: a short run still logs a series), and at the
    # end, over at most eval_samples of its samples; 0: only at the end
    eval_every: int = 5_000
    eval_samples: int = 1_024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class StageSpec:
    """The sizes of one cascade stage: the one place every other module reads them from.

    Imagen trains every stage on the same image-text pairs, each at its own resolution
    (sec. 2.5, appendix F): a stage only learns from images whose native short side
    reaches its ``image_size`` (never from upscaled pixels). The loader resizes the short
    side to ``image_size`` (never up) and crops ``crop_size``; an SR stage's low-res input
    is made from that crop (``lowres_crop_size``). The 1024 stage trains on 256 px crops
    with 64 px inputs and, having no self-attention, samples the whole 1024 px image.
    """

    stage: str
    image_size: int  # the side the stage generates
    lowres_size: int | None  # SR: the side of its conditioning image (the previous stage's output)
    crop_size: int  # training crop side (image_size unless the stage trains on crops)

    @property
    def min_native_side(self) -> int:
        """Samples whose stored short side is below this are left out of this stage."""
        return self.image_size

    @property
    def lowres_crop_size(self) -> int | None:
        """SR: the side of the low-res input made from one training crop."""
        if self.lowres_size is None:
            return None
        return self.crop_size * self.lowres_size // self.image_size

    @property
    def random_crop(self) -> bool:
        """SR stages take random crops (a crop is a fresh sample of the image's detail);
        the base stage centre-crops, so it learns whole compositions."""
        return self.lowres_size is not None

    def chain_error(self, prev: StageSpec) -> str | None:
        """Why this stage cannot follow ``prev`` in a cascade (None: it can)."""
        if self.lowres_size == prev.image_size:
            return None
        return (f"stage {self.stage} expects {self.lowres_size}px input but {prev.stage} makes "
                f"{prev.image_size}px images: pick presets whose sizes chain")


def check_chain(specs: list[StageSpec]) -> None:
    """Raise unless ``specs`` (in cascade order) chain: each SR input is the previous output."""
    for prev, cur in zip(specs, specs[1:], strict=False):
        error = cur.chain_error(prev)
        if error:
            raise ValueError(error)


@dataclass
class StageConfig:
    """Everything that defines one cascade stage."""

    stage: str = "base64"
    preset: str = "base64"
    image_size: int = 64
    lowres_size: int | None = None  # SR stages: size of the conditioning image
    text_encoder: str = "google/t5-v1_1-xxl"
    max_text_len: int = 128
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    crop_size: int | None = None  # training crop side; None: the whole image_size

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.unet.image_size != self.image_size:
            raise ValueError(f"unet.image_size {self.unet.image_size} != image_size {self.image_size}")
        if self.unet.lowres_cond != (self.lowres_size is not None):
            raise ValueError("an SR stage needs lowres_size and unet.lowres_cond=True, a base stage neither")
        spec = self.spec
        if not 0 < spec.crop_size <= self.image_size or spec.crop_size % 2 ** len(self.unet.channel_mults):
            raise ValueError(f"crop_size {spec.crop_size} must be in (0, {self.image_size}] and divisible "
                             f"by 2**{len(self.unet.channel_mults)} (the U-Net's levels)")
        if self.lowres_size is not None and (spec.crop_size * self.lowres_size) % self.image_size:
            raise ValueError(f"crop_size {spec.crop_size} must scale to a whole low-res crop "
                             f"({self.lowres_size}/{self.image_size} of it)")

    @property
    def spec(self) -> StageSpec:
        return StageSpec(self.stage, self.image_size, self.lowres_size, self.crop_size or self.image_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageConfig:
        d = dict(d)
        train = dict(d.pop("train"))
        # Written before the global batch was the contract: batch_size was per process and
        # grad_accum a setting. Neither changes the model, so an old config still loads.
        for legacy in ("batch_size", "grad_accum"):
            train.pop(legacy, None)
        train.setdefault("lr_schedule", "cosine")  # the one schedule before there was a choice
        unet = dict(d.pop("unet"))
        # Written before UNetConfig.skips: every layout then had one skip per level.
        unet.setdefault("skips", "level")
        return cls(
            unet=UNetConfig(**unet),
            diffusion=DiffusionConfig(**d.pop("diffusion")),
            train=TrainConfig(**train),
            **d,
        )

    def ema(self):
        """The EMA schedule of this stage's training (imagen.ema.EMAConfig)."""
        from imagen.ema import EMAConfig

        t = self.train
        return EMAConfig(max_decay=t.ema_decay, update_after_step=t.ema_update_after_step,
                         update_every=t.ema_update_every, power=t.ema_power)

    def replace(self, **kwargs: Any) -> StageConfig:
        return dataclasses.replace(self, **kwargs)


# ---------------------------------------------------------------------------------------
# Presets. Paper sizes (Imagen appendix F): base 64x64 2B params, SR 64->256 600M,
# SR 256->1024 400M. Efficient U-Net for the SR stages (appendix B.1, fig. A.30).


def base64() -> StageConfig:
    unet = UNetConfig(
        image_size=64,
        channels=512,
        channel_mults=(1, 2, 3, 4),
        num_res_blocks=(3, 3, 3, 3),
        self_attn_levels=(False, True, True, True),
        cross_attn_levels=(False, True, True, True),
        head_dim=64,
        # The time/pooled-text embedding at 2x channels, not ADM's 4x: the one width the paper
        # does not give. With ADM's skips this measures 2.07B parameters (paper: 2B, appendix
        # F); at 4x (2048) it would be 2.16B.
        cond_dim=1024,
    )
    # micro-batch 64 x 2B parameters in bf16 fits an 80 GB GPU (bench/gpu.sh measures it)
    train = TrainConfig(global_batch=2048, micro_batch=64, lr=1e-4)
    return StageConfig("base64", "base64", 64, None, unet=unet, train=train,
                       diffusion=DiffusionConfig(schedule="cosine"))


# How the paper SR presets sample until an evaluation chooses for the trained model (the sweep of
# pipeline/release/sweep.py): guided, and conditioned on a noised low-res input, as DeepFloyd IF's
# stage II (guidance 4, noise level 250 of 1000; diffusers' IF super-resolution pipeline the same).
# Training covers levels U(0, 1) (lowres_aug_max), the whole range, as the paper's.
SR_SAMPLING = {"guidance_scale": 4.0, "lowres_aug_sample": 0.25}


def sr256() -> StageConfig:
    unet = UNetConfig(
        image_size=256,
        channels=128,
        # the paper's block counts (2, 4, 8, 8, 8); widths capped at 6x so that this block
        # design lands on the paper's 600M parameters (appendix F)
        channel_mults=(1, 2, 4, 6, 6),
        num_res_blocks=(2, 4, 8, 8, 8),
        self_attn_levels=(False, False, False, False, False),
        # efficient layout: the levels run at 128..8 px, text cross-attention at 8x8 only
        cross_attn_levels=(False, False, False, False, True),
        # keep self-attention in the middle block (8x8 = 64 tokens, cheap): the paper removes
        # self-attention only from the 1024 px model (sec. 2.5), which must run convolutionally
        # on whole images after training on crops; this model trains and samples at 256 px.
        # imagen-pytorch's SRUnet256 keeps it too (attend_at_middle=True by default).
        mid_self_attn=True,
        lowres_cond=True,
        efficient=True,
    )
    train = TrainConfig(global_batch=4096, micro_batch=64, lr=1e-4)
    return StageConfig("sr256", "sr256", 256, 64, unet=unet, train=train,
                       diffusion=DiffusionConfig(schedule="cosine", **SR_SAMPLING))


def sr1024() -> StageConfig:
    unet = UNetConfig(
        image_size=1024,
        channels=128,
        # 400M parameters (appendix F); no self-attention at these resolutions (sec. 2.6)
        channel_mults=(1, 2, 4, 4, 4),
        num_res_blocks=(2, 4, 8, 8, 8),
        self_attn_levels=(False,) * 5,
        # text cross-attention only at the lowest level (32x32 at 1024 px, 8x8 on 256 crops),
        # which sec. 2.5 keeps as critical
        cross_attn_levels=(False, False, False, False, True),
        mid_self_attn=False,  # no self-attention anywhere, the middle block included (sec. 2.5)
        lowres_cond=True,
        efficient=True,
    )
    train = TrainConfig(global_batch=4096, micro_batch=64, lr=1e-4)
    # trained on 256 px crops with 64 px inputs, sampled fully convolutionally at 1024 (appendix F)
    return StageConfig("sr1024", "sr1024", 1024, 256, unet=unet, train=train, crop_size=256,
                       diffusion=DiffusionConfig(schedule="linear", **SR_SAMPLING))


def tiny(stage: str = "base64") -> StageConfig:
    """CPU-sized stage for tests and the smoke test: same code paths, about a million parameters.

    The tiny stages chain like the paper's (x2 per SR stage instead of x4): 32 -> 64 -> 128 px.
    The 128 px stage is narrower at full resolution, as the paper's 1024 px Efficient U-Net is
    (128 channels at 1024 px), has no self-attention, and trains on half-size crops (64 px
    crops with 32 px inputs) as the paper's trains on 256 px crops of 1024 px images.
    """
    sizes = {"base64": (32, None), "sr256": (64, 32), "sr1024": (128, 64)}
    if stage not in sizes:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    image_size, lowres = sizes[stage]
    sr = lowres is not None
    top = stage == "sr1024"  # like the paper's 1024 px stage: narrow, no self-attention, text at the bottom
    unet = UNetConfig(
        image_size=image_size,
        channels=16 if top else 32,
        channel_mults=(1, 2, 4) if top else (1, 2, 2),
        num_res_blocks=(1, 1, 2) if sr else (1, 1, 1),
        self_attn_levels=(False, False, not top),
        cross_attn_levels=(False, not top, True),
        mid_self_attn=not top,
        head_dim=32,
        text_embed_dim=32,
        lowres_cond=sr,
        efficient=sr,
        num_groups=8,
        # The tiny base keeps one skip per level, not the paper base's ADM skips: the demo's and
        # the learning test's figures (and their minutes on 2 cores) were measured with it, and
        # ADM's n + 1 up-blocks make it 1.42M parameters against 1.13M, not yet re-measured.
        skips=None if sr else "level",
    )
    diffusion = DiffusionConfig(
        schedule="linear" if stage == "sr1024" else "cosine",
        # SR stages sample with 8 deterministic DDIM steps: closer to the posterior mean than
        # 32 ancestral steps, so sharp edges without the sampler's grain (tiny sr256 after 600
        # steps, in the recipe search: 30.7 dB PSNR against 28.1 dB; 4 steps 31.2, 16 steps 29.1)
        sampler="ddim" if sr else "ddpm",
        sample_steps=8 if sr else 32,
        guidance_scale=3.0 if not sr else 1.0,
        # The tiny base drops its text 30% of the time (the paper: 10%): a better unconditional
        # model makes guidance pull harder. Measured on the tiny data after 2000 steps, 192
        # samples: guided/unguided colour-and-shape 0.81/0.54 (0.2: 0.88/0.76; 0.1: 0.87/0.76).
        cond_drop_prob=0.1 if sr else 0.3,
        # SR stages clip statically: dynamic thresholding greys the flat backgrounds of a young
        # SR model (measured on the tiny data after 600 steps: 14.9 dB PSNR against 23.1 dB)
        dynamic_threshold=None if sr else 0.995,
        # The tiny cascade samples its SR stages at augmentation level 0, so it trains near
        # there: noise levels up to 0.5 spent half of a short run on inputs it never sees
        # (tiny sr256, 600 steps, in the recipe search: 30.7 dB PSNR with levels up to 0.1,
        # 28.8 dB up to 0.2, 26.4 dB up to 0.5; see the README's demo section)
        lowres_aug_max=0.1,
    )
    # Cosine decay, not the paper's constant rate: the demo's and the learning test's figures
    # (alignment 0.87-0.98 colour, 0.76-0.88 shape after 2000 steps) were measured with it.
    train = TrainConfig(global_batch=16, micro_batch=16, lr=1e-3, warmup_steps=20, max_steps=200, ema_decay=0.99,
                        lr_schedule="cosine",
                        checkpoint_every=50, log_every=5, sample_every=100, eval_every=100, eval_samples=256)
    return StageConfig(stage, "tiny", image_size, lowres, text_encoder="", max_text_len=32,
                       unet=unet, diffusion=diffusion, train=train, crop_size=64 if top else None)


PRESETS = {"tiny": tiny, "base64": base64, "sr256": sr256, "sr1024": sr1024}
# The paper preset of each stage (its own name): the one default for a stage no preset names.
# "tiny" shrinks any stage; the smoke test, the demo and the tests ask for it by name.
PAPER_PRESETS = {s: s for s in STAGES}


def preset(name: str, stage: str | None = None) -> StageConfig:
    """Return the config for preset ``name``; ``tiny`` takes the stage to shrink."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if name == "tiny":
        return tiny(stage or "base64")
    cfg = PRESETS[name]()
    if stage is not None and stage != cfg.stage:
        raise ValueError(f"preset {name!r} is for stage {cfg.stage!r}, not {stage!r}")
    return cfg


def resolve_presets(presets: str | Mapping[str, str | None] | None = None,
                    stages: Iterable[str] | None = None) -> dict[str, str]:
    """stage -> preset name for each of ``stages`` (all, by default, in cascade order): the one
    preset rule of the CLI, the DAGs, the planner and calibration.

    ``presets`` is one name for every stage (``"tiny"``), or a map naming some stages; a stage it
    does not name (or names as None or "") gets its paper preset. Raises ValueError naming the
    stage for an unknown stage or preset, or a paper preset given to another stage.
    """
    wanted = list(STAGES if stages is None else stages)
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    named = dict.fromkeys(STAGES, presets) if isinstance(presets, str) else dict(presets or {})
    extra = sorted(set(named) - set(STAGES))
    if extra:
        raise ValueError(f"presets for unknown stage(s) {extra}; stages are {', '.join(STAGES)}")
    out = {}
    for stage in [s for s in STAGES if s in wanted]:
        name = named.get(stage) or PAPER_PRESETS[stage]
        if name not in PRESETS:
            raise ValueError(f"preset {name!r} for {stage}: choose one of {', '.join(PRESETS)}")
        if name != "tiny" and name != stage:
            raise ValueError(f"preset {name!r} is for stage {name!r}, not {stage!r}: give {stage} one of its "
                             f"own (tiny, {stage})")
        out[stage] = name
    return out


def stage_preset(presets: str | Mapping[str, str | None] | None, stage: str) -> str:
    """The preset name :func:`resolve_presets` gives ``stage``."""
    return resolve_presets(presets, [stage])[stage]


def stage_specs(presets: str | Mapping[str, str | None] | None = None,
                stages: Iterable[str] | None = None) -> dict[str, StageSpec]:
    """The :class:`StageSpec` of each stage in ``stages`` (all by default, in cascade order),
    each from its preset (:func:`resolve_presets`)."""
    return {s: preset(name, s).spec for s, name in resolve_presets(presets, stages).items()}
