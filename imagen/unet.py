"""Text-conditioned (Efficient) U-Net for every Imagen cascade stage.

Plain single-device PyTorch: DDP/FSDP, compile and autocast are applied from outside.

    from imagen.config import preset
    from imagen.unet import UNet
    cfg = preset("tiny")
    net = UNet(cfg.unet)
    out = net(x, t, text_embeds, text_mask)                     # base stage
    out = net(x, t, text_embeds, text_mask, lowres=lr, lowres_t=aug_t)  # SR stage

Conditioning (Imagen sec. 2 and appendix B):
- the noise level ``t`` in [0, 1] through Fourier features and an MLP;
- attention-pooled text added to the time embedding;
- cross-attention to the per-token text embeddings (masked) at chosen levels;
- SR stages: the low-res image, upsampled and concatenated to the input, and its
  noise-augmentation level embedded like ``t`` (sec. 2.5).
A sample whose text mask is all False is "unconditional": it attends only to a learned
null key/value and pools to a learned null vector, which is how classifier-free guidance
drops text.

Layouts (``UNetConfig.efficient``, see :class:`UNet`): the plain U-Net of the base model,
and the Efficient U-Net of the SR stages (appendix B.1), in which every level downsamples
before its residual blocks, so none runs at the input resolution. With no self-attention
in any level and ``mid_self_attn=False`` (the 1024 px stage, sec. 2.5) nothing depends on
the number of pixels: the model trains on crops and samples the whole image.
"""

from __future__ import annotations

import math

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
        # a row with no tokens would give NaN softmax: let it see token 0, then replace
        safe = mask.clone()
        safe[~has_text, 0] = True
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

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


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

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        h = self.norm(x)
        q = self.q(h)
        k, v = self.kv(h if context is None else context).chunk(2, dim=-1)
        attn_mask = None
        if self.null_kv is not None:
            nk, nv = self.null_kv.to(k.dtype)[:, None, None, :].expand(2, b, 1, d)
            k, v = torch.cat([nk, k], dim=1), torch.cat([nv, v], dim=1)
            if mask is not None:
                mask = F.pad(mask, (1, 0), value=True)
                attn_mask = mask[:, None, None, :]

        def split(t: Tensor) -> Tensor:
            return t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
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

    def forward(self, x: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        h = x.flatten(2).transpose(1, 2)
        if self.self_attn is not None:
            h = self.self_attn(h)
        if self.cross_attn is not None:
            h = self.cross_attn(h, text, mask)
        h = h + self.ff(h)
        return h.transpose(1, 2).reshape(b, c, hh, ww)


class Level(nn.Module):
    """The res blocks (and optional attention) of one resolution level."""

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

    def forward(self, h: Tensor, cond: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        # a real forward (not a loop in the parent) so that per-level wrappers such as
        # FSDP's fully_shard see the call and gather this level's parameters
        for block in self.blocks:
            h = self._run(block, h, cond)
        if self.attn is not None:
            h = self._run(self.attn, h, text, mask)
        return h

    def _run(self, fn: nn.Module, *args: Tensor) -> Tensor:
        if self.checkpointing and self.training:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


def _upsample(cin: int, cout: int) -> nn.Module:
    """Nearest x2 then a 3x3 conv (no checkerboard artefacts of a transposed conv)."""
    return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(cin, cout, 3, padding=1))


class UNet(nn.Module):
    """Imagen U-Net, in one of two layouts (``cfg.efficient``).

    Plain (the base 64 px model, Imagen appendix B): stem conv, then per level its res
    blocks followed by a downsampling conv (none after the last level); on the way up,
    per level its blocks then an upsampling conv (none after level 0), so level 0's blocks
    run at the input resolution.

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
        prev = cfg.channels
        for i, ch in enumerate(chans):
            n = cfg.num_res_blocks[i]
            if cfg.efficient:
                # the strided conv already maps to the level's width, as the DBlock's first
                # conv does in the paper (fig. A.28): the level's blocks all run at ch -> ch
                self.downsample.append(nn.Conv2d(prev, ch, 4, stride=2, padding=1))
                prev = ch
            self.down.append(Level([prev] + [ch] * (n - 1), ch, cfg, cfg.self_attn_levels[i],
                                   cfg.cross_attn_levels[i]))
            prev = ch
            if not cfg.efficient:
                last = i == len(chans) - 1
                self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 4, stride=2, padding=1))

        # mid_self_attn=False for the 1024 px stage (Imagen sec. 2.5): no self-attention
        # anywhere, so a model trained on crops runs convolutionally on the whole image
        self.mid = Level([prev, prev], prev, cfg, cfg.mid_self_attn, any(cfg.cross_attn_levels))

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(chans))):
            ch, n = chans[i], cfg.num_res_blocks[i]
            self.up.append(Level([prev + ch] + [ch] * (n - 1), ch, cfg,
                                 cfg.self_attn_levels[i], cfg.cross_attn_levels[i]))
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

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text_embeds: Tensor,
        text_mask: Tensor,
        lowres: Tensor | None = None,
        lowres_t: Tensor | None = None,
    ) -> Tensor:
        """Predict the diffusion target for noisy images ``x`` [B, C, H, W] at levels ``t`` [B].

        ``text_embeds`` [B, L, D] and ``text_mask`` [B, L] (True = real token; an all-False
        row is unconditional). SR stages also take ``lowres`` [B, C, h, w] (already noised
        by the caller) and its augmentation level ``lowres_t`` [B].
        """
        cfg = self.cfg
        if cfg.lowres_cond:
            if lowres is None or lowres_t is None:
                raise ValueError("this U-Net is an SR stage: pass lowres and lowres_t")
            up = F.interpolate(lowres, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, up.to(x.dtype)], dim=1)
        text = self.text_norm(text_embeds)
        mask = text_mask.bool()
        cond = self.time_embed(t) + self.text_pool(text, mask)
        if self.aug_embed is not None:
            cond = cond + self.aug_embed(lowres_t)

        h = stem = self.stem(x)
        skips = []
        for i, level in enumerate(self.down):
            if cfg.efficient:
                h = self.downsample[i](h)  # Efficient U-Net: downsample before the convs
            h = level(h, cond, text, mask)
            skips.append(h)
            if not cfg.efficient:
                h = self.downsample[i](h)
        h = self.mid(h, cond, text, mask)
        for level, upsample in zip(self.up, self.upsample, strict=True):
            h = torch.cat([h, skips.pop() * self.skip_scale], dim=1)
            h = level(h, cond, text, mask)
            h = upsample(h)  # Efficient U-Net: upsample after the convs, level 0 included
        if cfg.efficient:
            h = torch.cat([h, stem * self.skip_scale], dim=1)
        if self.out_cond is None:
            return self.out(h)
        norm, act, conv = self.out
        scale, shift = self.out_cond(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        return conv(act(norm(h) * (1 + scale) + shift))
