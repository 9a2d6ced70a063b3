"""Benchmark: training throughput and peak memory of our base U-Net versus diffusers'
UNet2DConditionModel with a matching parameter count (within 10%) and attention layout,
and of our Efficient U-Net (Imagen appendix B.1) versus the plain layout for SR stages.

    python bench/unet.py          # needs the optional peer: pip install diffusers==0.42.1

Both models: 4 levels, 2 res blocks per level on the way down and 3 on the way up (ADM's
skips: one per res block, downsample and the stem), text cross-attention (and
self-attention) at the three lower levels, 512-d text tokens, 64-d heads. Ours attends once
per level, the peer after every res block, so its widths are narrower at the lowest level. Each (model, resolution) runs in its own
subprocess so its peak RSS (CPU) or peak allocated memory (CUDA) is its own. One training
step = forward, MSE loss, backward, AdamW step; images/s is the median over timed steps.

Efficient versus plain U-Net (same widths and block counts, ``efficient`` flipped): FLOPs
of one training forward of the paper sr256 preset (counted on the meta device), and the
training memory and throughput of a small SR U-Net at 256 px.

Last line: JSON with ratio_vs_peer_32, ratio_vs_peer_64, mem_ratio_vs_peer_64 (ours / peer),
params_ours, params_peer, flops_ratio_efficient_sr256, mem_ratio_efficient_sr and
speedup_efficient_sr (efficient / plain).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

TEXT_DIM, TOKENS, BATCH = 512, 16, 8


def build_ours(size: int):
    from imagen.config import UNetConfig
    from imagen.unet import UNet

    cfg = UNetConfig(image_size=size, channels=64, channel_mults=(1, 2, 3, 4), num_res_blocks=(2, 2, 2, 2),
                     self_attn_levels=(False, True, True, True), cross_attn_levels=(False, True, True, True),
                     head_dim=64, text_embed_dim=TEXT_DIM)
    model = UNet(cfg)

    def step_fn(x, t, text, mask):
        return model(x, t, text, mask)

    return model, step_fn


def build_peer(size: int):
    from diffusers import UNet2DConditionModel

    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3
    up = ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)
    model = UNet2DConditionModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=2,
                                 # widths chosen for a parameter count within 10% of ours
                                 # (27.6M against 27.4M); heads for 64-d heads like ours
                                 # (diffusers' legacy `attention_head_dim` argument is the
                                 # number of heads)
                                 block_out_channels=(64, 128, 192, 192), down_block_types=down,
                                 up_block_types=up, cross_attention_dim=TEXT_DIM,
                                 attention_head_dim=(1, 2, 3, 3), norm_num_groups=32)

    def step_fn(x, t, text, mask):
        return model(x, t * 1000, encoder_hidden_states=text, encoder_attention_mask=mask).sample

    return model, step_fn


def measure(which: str, size: int, steps: int) -> dict:
    """Runs inside the child process."""
    import torch

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, fn = (build_ours if which == "ours" else build_peer)(size)
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, 3, size, size, device=device)
    t = torch.rand(BATCH, device=device)
    text = torch.randn(BATCH, TOKENS, TEXT_DIM, device=device)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.bool, device=device)
    mask[:, TOKENS // 2:] = False
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = (fn(x, t, text, mask).float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024  # KiB on Linux
    return {"images_per_s": BATCH / statistics.median(times), "peak_bytes": peak, "params": params}


def _pythonpath() -> str:
    """This checkout first, then the caller's PYTHONPATH (wheels carried to a GPU machine: the
    peer's child must see diffusers there too)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)


def run_child(which: str, size: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, str(size), str(steps)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": _pythonpath()})
    return json.loads(out.stdout.strip().splitlines()[-1])


SR_SIZE, SR_BATCH = 256, 2


def _sr_inputs(size: int, batch: int, device: str, text_dim: int = TEXT_DIM):
    import torch

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, TOKENS, text_dim, generator=g), torch.ones(batch, TOKENS, dtype=torch.bool))
    kw = {"lowres": torch.randn(batch, 3, size // 4, size // 4, generator=g),
          "lowres_t": torch.rand(batch, generator=g)}
    return tuple(a.to(device) for a in args), {k: v.to(device) for k, v in kw.items()}


def sr256_flops_ratio() -> float:
    """Training-forward FLOPs of the paper sr256 preset, efficient over plain layout."""
    import dataclasses

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imagen.config import preset
    from imagen.unet import UNet

    cfg = preset("sr256").unet
    args, kw = _sr_inputs(cfg.image_size, 1, "meta", cfg.text_embed_dim)
    flops = {}
    for efficient in (True, False):
        # meta device: shapes only, so the 600M-parameter model costs no memory or time
        with torch.device("meta"):
            model = UNet(dataclasses.replace(cfg, efficient=efficient)).train()
        with FlopCounterMode(display=False) as counter:
            model(*args, **kw)
        flops[efficient] = counter.get_total_flops()
    return flops[True] / flops[False]


def _training_bytes(model, args, kw, cuda: bool) -> int:
    """Memory of one training forward+backward. CUDA: peak allocated. CPU (RSS is too noisy
    for a 2-core shared machine): parameter bytes plus the distinct storages autograd saves
    for backward, i.e. what is held at the forward/backward boundary where a step peaks;
    gradients and optimizer state scale with the parameters and are left out."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(*args, **kw).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in model.parameters())

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:  # count a storage once, however many views are saved
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*args, **kw).float().pow(2).mean()
    loss.backward()
    return total


def efficient_vs_plain(rounds: int = 5, steps: int = 2) -> dict:
    """Efficient over plain U-Net: paper sr256 FLOPs; memory and img/s of a small SR U-Net."""
    import dataclasses

    import torch

    from imagen.config import UNetConfig
    from imagen.unet import UNet

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    # a shrunken paper SR U-Net: more blocks at low resolution, text only at the lowest level
    cfg = UNetConfig(image_size=SR_SIZE, channels=32, channel_mults=(1, 2, 4, 4), num_res_blocks=(1, 2, 4, 4),
                     self_attn_levels=(False,) * 4, cross_attn_levels=(False, False, False, True),
                     text_embed_dim=TEXT_DIM, lowres_cond=True, efficient=True)
    args, kw = _sr_inputs(SR_SIZE, SR_BATCH, device)
    mem, models = {}, {}
    for efficient in (True, False):
        model = UNet(dataclasses.replace(cfg, efficient=efficient)).to(device).train()
        mem[efficient] = _training_bytes(model, args, kw, cuda)
        model.zero_grad(set_to_none=True)
        models[efficient] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def run(efficient: bool, n: int) -> float:
        model, opt = models[efficient]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            loss = (model(*args, **kw).float() - args[0]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        return SR_BATCH * n / (time.perf_counter() - t0)

    best = {True: 0.0, False: 0.0}
    for efficient in (True, False):
        run(efficient, 1)  # warm-up
    # alternate and keep each layout's best: other load only ever slows a run down
    for _ in range(rounds):
        for efficient in (True, False):
            best[efficient] = max(best[efficient], run(efficient, steps))
    print(f"efficient/plain SR {SR_SIZE}px: {best[True]:.2f} / {best[False]:.2f} img/s, "
          f"{mem[True] / 2**20:.0f} / {mem[False] / 2**20:.0f} MiB", flush=True)
    return {"flops_ratio_efficient_sr256": sr256_flops_ratio(),
            "mem_ratio_efficient_sr": mem[True] / mem[False],
            "speedup_efficient_sr": best[True] / best[False]}


def main() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        sys.exit("bench/unet.py needs the optional peer: pip install diffusers==0.42.1")
    results: dict = {}
    # alternate ours/peer three times and keep each one's best run: other load on a shared
    # machine only ever slows a run down, so the best of three is the less noisy estimate
    for size, steps in ((32, 8), (64, 5)):
        for which in ("ours", "peer") * 3:
            r = run_child(which, size, steps)
            best = results.get((which, size))
            if best is None or r["images_per_s"] > best["images_per_s"]:
                results[(which, size)] = r
            print(f"{which:5s} {size}px: {r['images_per_s']:.2f} img/s, peak {r['peak_bytes'] / 2**20:.0f} MiB, "
                  f"{r['params'] / 1e6:.1f}M params", flush=True)
    ours, peer = results[("ours", 64)]["params"], results[("peer", 64)]["params"]
    if abs(ours - peer) / peer > 0.10:
        sys.exit(f"parameter counts differ by more than 10% ({ours} vs {peer}): fix the peer config")
    efficient = efficient_vs_plain()
    print(json.dumps({
        "ratio_vs_peer_32": results[("ours", 32)]["images_per_s"] / results[("peer", 32)]["images_per_s"],
        "ratio_vs_peer_64": results[("ours", 64)]["images_per_s"] / results[("peer", 64)]["images_per_s"],
        "mem_ratio_vs_peer_64": results[("ours", 64)]["peak_bytes"] / results[("peer", 64)]["peak_bytes"],
        "params_ours": ours, "params_peer": peer,
        **efficient,
    }))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        main()
