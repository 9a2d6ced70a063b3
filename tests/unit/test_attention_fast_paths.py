"""imagen/unet.py attention for the fast paths: cross-attention keys padded to a multiple of 8
(what CUDA's memory-efficient SDPA kernel needs of a mask), the text context computed once
(``UNet.encode_text``), and no host syncs (item, nonzero, boolean-index writes) in a forward."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from imagen.config import preset
from imagen.unet import KEY_ALIGN, Attention, AttentionPool, UNet


def _masks(b: int, n: int) -> torch.Tensor:
    """All tokens, none (text dropped for guidance), three, one: the rows sampling sees."""
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0] = True
    mask[2, :3] = True
    mask[3, :1] = True
    return mask


def _reference_cross_attention(attn: Attention, x, context, mask):
    """The layer as first written: null key/value in front of the L text keys, L+1 keys, an
    explicit masked softmax."""
    b, n, d = x.shape
    dh = d // attn.heads
    q = attn.q(attn.norm(x))
    k, v = attn.kv(context).chunk(2, dim=-1)
    k = torch.cat([attn.null_kv[0].expand(b, 1, d), k], dim=1)
    v = torch.cat([attn.null_kv[1].expand(b, 1, d), v], dim=1)
    keep = F.pad(mask, (1, 0), value=True)

    def heads(t):
        return t.view(b, -1, attn.heads, dh).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dh)
    weights = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(dim=-1)
    o = (weights @ heads(v)).transpose(1, 2).reshape(b, n, d)
    return x + attn.out(o)


def _cross_attention(seed=0):
    torch.manual_seed(seed)
    attn = Attention(64, head_dim=32, context_dim=48)
    torch.nn.init.normal_(attn.out.weight, std=0.2)  # zero-initialised: make the output see attention
    return attn


@pytest.mark.parametrize("tokens,keys", [(128, 136), (32, 40), (7, 8), (5, 8)])
def test_cross_attention_keys_are_aligned_and_match_the_unpadded_layer(tokens, keys):
    attn = _cross_attention()
    x, context = torch.randn(4, 10, 64), torch.randn(4, tokens, 48)
    mask = _masks(4, tokens)
    kv = attn.text_kv(context, mask)
    assert kv.k.shape == kv.v.shape == (4, 2, keys, 32) and keys % KEY_ALIGN == 0
    assert kv.mask.shape == (4, 1, 1, keys)
    assert kv.mask[:, 0, 0, 0].all() and not kv.mask[:, 0, 0, tokens + 1:].any()  # null on, padding off
    assert kv.mask[:, 0, 0, 1:].sum(dim=1).tolist() == [tokens, 0, 3, 1]
    with torch.no_grad():
        want = _reference_cross_attention(attn, x, context, mask)
        got = attn(x, context, mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attn(x, kv=kv), got, atol=0, rtol=0)  # precomputed = inline
        # padded keys carry no weight: huge values there change nothing
        k, v = kv.k.clone(), kv.v.clone()
        k[:, :, tokens + 1:], v[:, :, tokens + 1:] = 1e4, 1e4
        torch.testing.assert_close(attn(x, kv=kv._replace(k=k, v=v)), got, atol=0, rtol=0)
    # the text-dropped row sees only the null key: its output does not depend on the text
    other = attn(x, torch.randn_like(context), mask)
    torch.testing.assert_close(other[1], got[1], atol=0, rtol=0)
    assert (other[0] - got[0]).abs().max() > 1e-3


def test_parameter_names_and_shapes_are_unchanged():
    """Checkpoints written before the padding load as they are."""
    shapes = {k: tuple(v.shape) for k, v in _cross_attention().state_dict().items()}
    assert shapes == {"norm.weight": (64,), "norm.bias": (64,), "q.weight": (64, 64), "kv.weight": (128, 48),
                      "out.weight": (64, 64), "out.bias": (64,), "null_kv": (2, 64)}


def _pool_reference(pool: AttentionPool, text, mask):
    """The pool as first written: a clone with a boolean-index write for text-less rows."""
    has_text = mask.any(dim=1)
    safe = mask.clone()
    safe[~has_text, 0] = True
    q = pool.query.expand(text.shape[0], -1, -1)
    pooled, _ = pool.attn(q, text, text, key_padding_mask=~safe, need_weights=False)
    return torch.where(has_text[:, None], pool.proj(pooled[:, 0]), pool.null)


def test_attention_pool_matches_the_index_write_version():
    torch.manual_seed(0)
    pool = AttentionPool(64, 96, head_dim=32).eval()
    torch.nn.init.normal_(pool.null)
    text, mask = torch.randn(4, 12, 64), _masks(4, 12)
    with torch.no_grad():
        got = pool(text, mask)
        torch.testing.assert_close(got, _pool_reference(pool, text, mask), atol=0, rtol=0)
    torch.testing.assert_close(got[1], pool.null.detach())  # no tokens: the learned null vector


class _Ops(TorchDispatchMode):
    """Counts the aten ops that run."""

    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


# ops that make a CUDA stream wait on the host: a value read back, or a data-dependent size
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "index_put", "index_put_", "masked_select", "item"}


def _tiny_inputs(b=4, tokens=32):
    cfg = preset("tiny", "sr256")
    torch.manual_seed(0)
    model = UNet(cfg.unet).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # zero-initialised output layers: perturb them
    args = (torch.randn(b, 3, 64, 64), torch.rand(b), torch.randn(b, tokens, 32), _masks(b, tokens))
    kw = {"lowres": torch.randn(b, 3, 32, 32), "lowres_t": torch.full((b,), 0.2)}
    return model, args, kw


def test_forward_and_sampling_do_no_host_sync():
    from imagen.diffusion import GaussianDiffusion
    from imagen.sampling import sample

    model, args, kw = _tiny_inputs()
    d = GaussianDiffusion(preset("tiny", "sr256").diffusion)
    with torch.no_grad(), _Ops() as ops:
        model(*args, **kw)
        model(*args[:2], text_context=model.encode_text(*args[2:]), **kw)
        sample(model, d, *args[2:], args[0].shape, steps=2, guidance_scale=3.0, threshold=0.995,
               generator=torch.Generator().manual_seed(0), **kw)
    assert ops.seen["_scaled_dot_product_flash_attention_for_cpu"] > 0  # attention did run
    assert not HOST_SYNC_OPS & set(ops.seen), sorted(HOST_SYNC_OPS & set(ops.seen))


def test_text_context_gives_the_plain_forward_bit_for_bit():
    model, (x, t, text, mask), kw = _tiny_inputs()
    with torch.no_grad():
        ctx = model.encode_text(text, mask)
        want = model(x, t, text, mask, **kw)
        torch.testing.assert_close(model(x, t, text_context=ctx, **kw), want, atol=0, rtol=0)
    # every cross-attention level has its keys, named as in the state dict
    levels = {n.removesuffix(".attn.cross_attn") for n, m in model.named_modules()
              if n.endswith("cross_attn") and m is not None}
    assert set(ctx.kv) == levels and ctx.pooled.shape == (4, model.cfg.time_dim)
    with pytest.raises(ValueError, match="batch of 4"):
        model(torch.cat([x, x]), torch.cat([t, t]), text_context=ctx,
              **{k: torch.cat([v, v]) for k, v in kw.items()})
    with pytest.raises(ValueError, match="text_context"):
        model(x, t, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cross_attention_runs_on_the_memory_efficient_kernel():
    """With only the memory-efficient kernel allowed (flash takes no mask), bf16 cross-attention
    over 128 padded tokens (136 keys) runs and matches the fp32 reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attn = _cross_attention().cuda()
    x, context = torch.randn(4, 64, 64, device="cuda"), torch.randn(4, 128, 48, device="cuda")
    mask = _masks(4, 128).cuda()
    with torch.no_grad():
        want = _reference_cross_attention(attn, x, context, mask)
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            got = attn(x, context, mask)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
