"""Text-conditioned (Efficient) U-Net for every Imagen cascade stage.

Plain single-device PyTorch: DDP/FSDP, compile and autocast are applied from outside.

    from imagen.config import preset
    from imagen.unet import UNet
    cfg = preset("tiny")
    net = UNet(cfg.unet)
    out = net(x, t, text_embeds, text_mask)                     # base stage
    out = net(x, t, text_embeds, text_mask, lowres=lr, lowres_t=aug_t)  # SR stage
    ctx = net.encode_text(text_embeds, text_mask)  # sampling: the text-only work, once
    out = net(x, t, text_context=ctx)              # ... reused at every denoising step

Conditioning (Imagen sec. 2 and appendix B):
- the noise level ``t`` in [0, 1] through Fourier features and an MLP;
- attention-pooled text added to the time embedding;
- cross-attention to the per-token text embeddings (masked) at chosen levels;
- SR stages: the low-res image, upsampled and concatenated to the input, and its
  noise-augmentation level embedded like ``t`` (sec. 2.5).
A sample whose text mask is all False is "unconditional": it attends only to a learned
null key/value and pools to a learned null vector, which is how classifier-free guidance
drops text. Cross-attention keys are [null, tokens, padding] with the padding masked out, so
their length is a multiple of 8 (136 for 128 tokens, not 129): CUDA's memory-efficient SDPA
kernel then takes the mask as it is, with the same result.

Layouts (``UNetConfig.efficient``, see :class:`UNet`): the plain U-Net of the base model,
with ADM's skip connections (one per res block, ``UNetConfig.skips``), and the Efficient
U-Net of the SR stages (appendix B.1), in which every level downsamples before its residual
blocks, so none runs at the input resolution. With no self-attention in any level and
``mid_self_attn=False`` (the 1024 px stage, sec. 2.5) nothing depends on the number of
pixels: the model trains on crops and samples the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from imagen.config import UNetConfig


def _groups(channels: int, max_groups: int) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


class FourierEmbedding(nn.Module):
    """Maps a scalar in [0, 1] per sample to a vector, then through a 2-layer MLP."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.half = dim // 2
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), self.half, device=t.device))
        angles = t.float()[:, None] * freqs[None] * math.pi
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.mlp[0].weight.dtype))


class AttentionPool(nn.Module):
    """Attention pooling of text tokens into one vector (Imagen appendix B: pooled text)."""

    def __init__(self, text_dim: int, out_dim: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, text_dim // head_dim)
        self.query = nn.Parameter(torch.randn(1, 1, text_dim) / text_dim**0.5)
        self.attn = nn.MultiheadAttention(text_dim, self.heads, batch_first=True)
        self.null = nn.Parameter(torch.zeros(out_dim))
        self.proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, out_dim))

    def forward(self, text: Tensor, mask: Tensor) -> Tensor:
        has_text = mask.any(dim=1)
        # a row with no tokens would give NaN softmax: let it see token 0, then replace. Logical
        # ops, not a boolean-index write, which on CUDA waits on the host for the row count.
        safe = torch.cat([mask[:, :1] | ~has_text[:, None], mask[:, 1:]], dim=1)
        q = self.query.expand(text.shape[0], -1, -1)
        pooled, _ = self.attn(q, text, text, key_padding_mask=~safe, need_weights=False)
        pooled = self.proj(pooled[:, 0])
        return torch.where(has_text[:, None], pooled, self.null.to(pooled.dtype))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with scale/shift conditioning (FiLM)."""

    def __init__(self, cin: int, cout: int, cond_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin, groups), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout, groups), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # start as identity: stabler deep U-Nets
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor, skip: Tensor | None = None) -> Tensor:
        """``skip``: a U-Net skip connection, concatenated to ``x`` on the channels first (here,
        so that under activation checkpointing the concatenation is recomputed, not stored)."""
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


KEY_ALIGN = 8  # key length multiple that lets CUDA's memory-efficient SDPA take a mask unpadded


class CrossKV(NamedTuple):
    """A cross-attention layer's keys and values of one text batch, ready for SDPA.

    ``k``, ``v``: [B, heads, Lk, head_dim], the learned null key/value first, then the text
    tokens, then zero padding up to a multiple of :data:`KEY_ALIGN`; ``mask``: [B, 1, 1, Lk]
    bool, True where a key may be attended (the null always, padding never).
    """

    k: Tensor
    v: Tensor
    mask: Tensor


class Attention(nn.Module):
    """Multi-head attention over SDPA; with ``context`` it is cross-attention with a null kv."""

    def __init__(self, dim: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # learned null key/value: lets an all-masked (text-dropped) row attend to something
        self.null_kv = nn.Parameter(torch.randn(2, dim) * 0.02) if context_dim else None

    def _heads(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def text_kv(self, context: Tensor, mask: Tensor | None = None) -> CrossKV:
        """Keys, values and mask of text ``context`` [B, L, D] (``mask`` [B, L], True = token).

        Null key first, then padding to a multiple of KEY_ALIGN: with L+1 keys (129 for 128
        tokens) CUDA's memory-efficient kernel would have to pad the mask on every call, or
        SDPA would fall back to the math kernel. Padded keys are masked out, so they get
        exactly zero weight and the result is that of the L+1 keys.
        """
        b, n, _ = context.shape
        k, v = self.kv(context).chunk(2, dim=-1)
        pad = -(n + 1) % KEY_ALIGN
        nk, nv = self.null_kv.to(k.dtype)[:, None, None, :].expand(2, b, 1, k.shape[-1])
        k = F.pad(torch.cat([nk, k], dim=1), (0, 0, 0, pad))
        v = F.pad(torch.cat([nv, v], dim=1), (0, 0, 0, pad))
        keep = torch.ones(b, n, dtype=torch.bool, device=context.device) if mask is None else mask.bool()
        keep = F.pad(F.pad(keep, (1, 0), value=True), (0, pad), value=False)
        return CrossKV(self._heads(k), self._heads(v), keep[:, None, None, :])

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                kv: CrossKV | None = None) -> Tensor:
        """Self-attention of ``x`` [B, N, dim], or cross-attention to text ``context`` [B, L, D]
        (masked by ``mask``) or to its precomputed ``kv`` (see :meth:`text_kv`)."""
        b, n, d = x.shape
        h = self.norm(x)
        q = self._heads(self.q(h))
        if self.null_kv is None:
            k, v = self.kv(h).chunk(2, dim=-1)
            o = F.scaled_dot_product_attention(q, self._heads(k), self._heads(v))
        else:
            if kv is None:
                kv = self.text_kv(context, mask)
            o = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=kv.mask)
        return x + self.out(o.transpose(1, 2).reshape(b, n, d))


class AttnBlock(nn.Module):
    """Self-attention and/or text cross-attention plus a feed-forward, on a feature map."""

    def __init__(self, ch: int, head_dim: int, text_dim: int, self_attn: bool, cross_attn: bool):
        super().__init__()
        self.self_attn = Attention(ch, head_dim) if self_attn else None
        self.cross_attn = Attention(ch, head_dim, context_dim=text_dim) if cross_attn else None
        self.ff = nn.Sequential(nn.LayerNorm(ch), nn.Linear(ch, 4 * ch), nn.GELU(), nn.Linear(4 * ch, ch))
        nn.init.zeros_(self.ff[-1].weight)
        nn.init.zeros_(self.ff[-1].bias)

    def forward(self, x: Tensor, text: Tensor, mask: Tensor, kv: CrossKV | None = None) -> Tensor:
        b, c, hh, ww = x.shape
        h = x.flatten(2).transpose(1, 2)
        if self.self_attn is not None:
            h = self.self_attn(h)
        if self.cross_attn is not None:
            h = self.cross_attn(h, text, mask, kv)
        h = h + self.ff(h)
        return h.transpose(1, 2).reshape(b, c, hh, ww)


class Level(nn.Module):
    """The res blocks (and optional attention, after the last block) of one resolution level
    on the way down, or the middle block. The unit that FSDP shards and that checkpointing
    recomputes block by block."""

    def __init__(self, cins: list[int], cout: int, cfg: UNetConfig, self_attn: bool, cross_attn: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(cin, cout, cfg.time_dim, cfg.num_groups, cfg.dropout) for cin in cins
        )
        self.attn = (
            AttnBlock(cout, cfg.head_dim, cfg.text_embed_dim, self_attn, cross_attn)
            if self_attn or cross_attn
            else None
        )
        self.checkpointing = False  # recompute activations in backward (set by UNet)

    def forward(self, h: Tensor, cond: Tensor, text: Tensor, mask: Tensor,
                kv: CrossKV | None = None) -> list[Tensor]:
        """The output of each res block, the last one after the attention: a down level's
        skip connections (ADM), the last of which is the level's output. ``kv``: this level's
        precomputed cross-attention keys (:meth:`UNet.encode_text`), or None to project
        ``text`` here."""
        # a real forward (not a loop in the parent) so that per-level wrappers such as
        # FSDP's fully_shard see the call and gather this level's parameters
        outs = []
        for block in self.blocks:
            h = self._run(block, h, cond)
            outs.append(h)
        if self.attn is not None:
            outs[-1] = self._run(self.attn, h, text, mask, kv)
        return outs

    def _run(self, fn: nn.Module, *args: Tensor | CrossKV | None) -> Tensor:
        if self.checkpointing and self.training:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


class UpLevel(Level):
    """The res blocks (and optional attention, after the last block) of one level on the way
    up; block ``i`` first concatenates skip connection ``i`` when there is one."""

    def forward(self, h: Tensor, skips: list[Tensor], cond: Tensor, text: Tensor, mask: Tensor,
                kv: CrossKV | None = None) -> Tensor:
        """``skips``: one per block ("block" skips) or one for the first block ("level"),
        passed in (not reached from the parent) so that FSDP's fully_shard sees the call."""
        for i, block in enumerate(self.blocks):
            h = self._run(block, h, cond, skips[i] if i < len(skips) else None)
        if self.attn is not None:
            h = self._run(self.attn, h, text, mask, kv)
        return h


@dataclass
class TextContext:
    """What the U-Net derives from the text alone, for one batch (:meth:`UNet.encode_text`).

    Sampling computes it once per call and reuses it at every denoising step, instead of
    normalising, pooling and projecting the same text to keys and values at each step.
    """

    text: Tensor  # text_norm(text_embeds) [B, L, D]
    mask: Tensor  # [B, L] bool, True = real token
    pooled: Tensor  # attention-pooled text [B, time_dim], added to the time embedding
    kv: dict[str, CrossKV] = field(default_factory=dict)  # per level ("down.1", "mid", "up.0")


def _upsample(cin: int, cout: int) -> nn.Module:
    """Nearest x2 then a 3x3 conv (no checkerboard artefacts of a transposed conv)."""
    return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1))


class UNet(nn.Module):
    """Imagen U-Net, in one of two layouts (``cfg.efficient``).

    Plain (the base 64 px model, Imagen appendix B): stem conv, then per level its n res
    blocks followed by a downsampling conv (none after the last level); on the way up,
    per level its blocks then an upsampling conv (none after level 0), so level 0's blocks
    run at the input resolution. Skip connections (``cfg.skips``), concatenated:

    - "block", ADM's (Dhariwal & Nichol 2021, guided-diffusion ``UNetModel``), which the
      Imagen base model follows, as do imagen-pytorch's ``Unet`` and DeepFloyd IF: a skip
      after the stem, after each res block and after each downsample; each up level has
      n + 1 res blocks, each taking one skip, the last the one made before its level on
      the way down (the previous level's downsample, or the stem).
    - "level" (configs written before ``cfg.skips``): one skip per level, the level's
      output, into the first of the n blocks of the same level on the way up.

    Attention (self, text cross-attention, feed-forward) runs once per level, after its
    last res block (its output is that block's skip), as imagen-pytorch's ``Unet`` places
    its per-level transformer block, not after every res block as ADM: with this attention
    block (4x feed-forward) after every block the paper base model would have 2.8B
    parameters, against the paper's 2B (appendix F); once per level it has 2.07B.

    Efficient (the SR models, Imagen appendix B.1, fig. A.28-A.30; imagen-pytorch
    ``Unet(memory_efficient=True)``): every level downsamples *before* its blocks, the
    first level included, and upsamples *after* them on the way up, so no res block runs
    at the input resolution; only the stem and output convs do. Activations at full
    resolution are what dominate memory and time at 256 and 1024 px. Skip connections are
    scaled by 1/sqrt(2). The image side must then be divisible by 2**len(channel_mults).
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        td = cfg.time_dim
        chans = [cfg.channels * m for m in cfg.channel_mults]
        self.time_embed = FourierEmbedding(cfg.channels, td)
        self.text_pool = AttentionPool(cfg.text_embed_dim, td, cfg.head_dim)
        self.text_norm = nn.LayerNorm(cfg.text_embed_dim)
        self.aug_embed = FourierEmbedding(cfg.channels, td) if cfg.lowres_cond else None
        cin = cfg.in_channels * (2 if cfg.lowres_cond else 1)
        self.stem = nn.Conv2d(cin, cfg.channels, 3, padding=1)
        self.skip_scale = 2**-0.5 if cfg.efficient else 1.0  # Imagen appendix B.1

        # downsample[i] runs before level i (efficient) or after it (plain); an Identity
        # where a layout does not halve (plain: after the last level)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        block_skips = cfg.skips == "block"
        skip_chans = [cfg.channels] if block_skips else []  # widths of the skips, in the order made
        prev = cfg.channels
        for i, ch in enumerate(chans):
            n = cfg.num_res_blocks[i]
            if cfg.efficient:
                # the strided conv already maps to the level's width, as the DBlock's first
                # conv does in the paper (fig. A.28): the level's blocks all run at ch -> ch
                self.downsample.append(nn.Conv2d(prev, ch, 4, stride=2, padding=1))
                prev = ch
            level = Level([prev] + [ch] * (n - 1), ch, cfg, cfg.self_attn_levels[i], cfg.cross_attn_levels[i])
            self.down.append(level)
            skip_chans += [ch] * len(level.blocks) if block_skips else [ch]
            prev = ch
            if not cfg.efficient:
                last = i == len(chans) - 1
                self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 4, stride=2, padding=1))
                if block_skips and not last:
                    skip_chans.append(ch)

        # mid_self_attn=False for the 1024 px stage (Imagen sec. 2.5): no self-attention
        # anywhere, so a model trained on crops runs convolutionally on the whole image
        self.mid = Level([prev, prev], prev, cfg, cfg.mid_self_attn, any(cfg.cross_attn_levels))

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chans))):
            ch, n = chans[i], cfg.num_res_blocks[i]
            if block_skips:
                # ADM: one block per skip of the level on the way down, plus one for the skip
                # made before it (the previous level's downsample, or the stem)
                cins = [(prev if j == 0 else ch) + skip_chans.pop() for j in range(len(self.down[i].blocks) + 1)]
            else:
                cins = [prev + skip_chans.pop()] + [ch] * (n - 1)
            self.up.append(UpLevel(cins, ch, cfg, cfg.self_attn_levels[i], cfg.cross_attn_levels[i]))
            # the upsampling conv already maps to the next level's width (as imagen-pytorch
            # does): the most expensive conv of each level runs at the narrower width. In the
            # efficient layout level 0 upsamples too, back to the stem's width and resolution.
            if i > 0:
                prev = chans[i - 1]
                self.upsample.append(_upsample(ch, prev))
            elif cfg.efficient:
                prev = cfg.channels
                self.upsample.append(_upsample(ch, prev))
            else:
                self.upsample.append(nn.Identity())
        if cfg.efficient:
            # No residual block runs at full resolution, so the stem's full-resolution features
            # (the noisy image and the upsampled low-res input) skip to the output conv, as
            # imagen-pytorch's init_conv_to_final_conv_residual does: without it the prediction
            # would only carry detail the half-resolution levels kept.
            prev += cfg.channels
        self.out = nn.Sequential(nn.GroupNorm(_groups(prev, cfg.num_groups), prev), nn.SiLU(),
                                 nn.Conv2d(prev, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        # Efficient layout: the full-resolution path (stem -> output conv) has no res block,
        # so nothing there knows the noise level, yet the v (or eps) target mixes the noisy
        # image and the upsampled low-res one with weights that depend on it (1/sigma at low
        # noise). A scale/shift of the output norm from the conditioning, as the res blocks'
        # FiLM, gives that path the noise level (tiny SR: see imagen/config.py).
        self.out_cond = nn.Linear(td, 2 * prev) if cfg.efficient else None
        if self.out_cond is not None:
            nn.init.zeros_(self.out_cond.weight)  # starts as the plain output head
            nn.init.zeros_(self.out_cond.bias)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.mid.checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        for level in [*self.down, self.mid, *self.up]:
            level.checkpointing = enabled

    def encode_text(self, text_embeds: Tensor, text_mask: Tensor, cross_kv: bool = True) -> TextContext:
        """The text-only part of a forward pass, for ``text_embeds`` [B, L, D] and ``text_mask``
        [B, L]; pass it to :meth:`forward` as ``text_context`` to reuse it across steps.

        ``cross_kv=False`` leaves the cross-attention keys to each level's own forward (what
        a plain forward does: under FSDP a level's weights are gathered only inside it).
        Sampling runs the plain module, where computing them here, once, is allowed.
        """
        text = self.text_norm(text_embeds)
        mask = text_mask.bool()
        ctx = TextContext(text, mask, self.text_pool(text, mask))
        if cross_kv:
            for name, level in self._named_levels():
                if level.attn is not None and level.attn.cross_attn is not None:
                    ctx.kv[name] = level.attn.cross_attn.text_kv(text, mask)
        return ctx

    def _named_levels(self) -> list[tuple[str, Level]]:
        return [*((f"down.{i}", lv) for i, lv in enumerate(self.down)), ("mid", self.mid),
                *((f"up.{i}", lv) for i, lv in enumerate(self.up))]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text_embeds: Tensor | None = None,
        text_mask: Tensor | None = None,
        lowres: Tensor | None = None,
        lowres_t: Tensor | None = None,
        *,
        text_context: TextContext | None = None,
    ) -> Tensor:
        """Predict the diffusion target for noisy images ``x`` [B, C, H, W] at levels ``t`` [B].

        ``text_embeds`` [B, L, D] and ``text_mask`` [B, L] (True = real token; an all-False
        row is unconditional), or instead ``text_context``, their :meth:`encode_text`. SR
        stages also take ``lowres`` [B, C, h, w] (already noised by the caller) and its
        augmentation level ``lowres_t`` [B].
        """
        cfg = self.cfg
        if cfg.lowres_cond:
            if lowres is None or lowres_t is None:
                raise ValueError("this U-Net is an SR stage: pass lowres and lowres_t")
            up = F.interpolate(lowres, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, up.to(x.dtype)], dim=1)
        ctx = text_context
        if ctx is None:
            if text_embeds is None or text_mask is None:
                raise ValueError("pass text_embeds and text_mask, or text_context=model.encode_text(...)")
            ctx = self.encode_text(text_embeds, text_mask, cross_kv=False)
        elif ctx.text.shape[0] != x.shape[0]:
            raise ValueError(f"text_context is for a batch of {ctx.text.shape[0]}, x has "
                             f"{x.shape[0]}: encode the text of this batch")
        text, mask, kv = ctx.text, ctx.mask, ctx.kv
        cond = self.time_embed(t) + ctx.pooled
        if self.aug_embed is not None:
            cond = cond + self.aug_embed(lowres_t)

        block_skips = cfg.skips == "block"
        h = stem = self.stem(x)
        skips = [h] if block_skips else []
        for i, level in enumerate(self.down):
            if cfg.efficient:
                h = self.downsample[i](h)  # Efficient U-Net: downsample before the convs
            outs = level(h, cond, text, mask, kv.get(f"down.{i}"))
            h = outs[-1]
            skips += outs if block_skips else [h]
            if not cfg.efficient:
                h = self.downsample[i](h)
                if block_skips and i < len(self.down) - 1:
                    skips.append(h)  # ADM: the downsampled map is a skip too
        h = self.mid(h, cond, text, mask, kv.get("mid"))[-1]
        for i, (level, upsample) in enumerate(zip(self.up, self.upsample, strict=True)):
            taken = [skips.pop() for _ in range(len(level.blocks) if block_skips else 1)]
            if cfg.efficient:
                taken = [s * self.skip_scale for s in taken]  # Imagen appendix B.1
            h = level(h, taken, cond, text, mask, kv.get(f"up.{i}"))
            h = upsample(h)  # Efficient U-Net: upsample after the convs, level 0 included
        if cfg.efficient:
            h = torch.cat([h, stem * self.skip_scale], dim=1)
        if self.out_cond is None:
            return self.out(h)
        norm, act, conv = self.out
        scale, shift = self.out_cond(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        return conv(act(norm(h) * (1 + scale) + shift))
