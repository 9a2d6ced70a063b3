"""pipeline/train/parallel.py in one process: torchrun's environment read with defaults, no process
group without torchrun, the identity in a world of one, and DDP/FSDP wrapping in a real one-rank
gloo group (the same code paths torchrun's ranks take, without a second process)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from imagen.config import preset
from imagen.unet import UNet
from pipeline.train import checkpointing as ckpt
from pipeline.train import parallel


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank on an in-memory store (no port, no subprocess)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        parallel.shutdown()
    assert not dist.is_initialized()


def test_dist_env_reads_torchrun_variables_with_single_process_defaults(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.dist_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert parallel.dist_env() == (5, 8, 1)


def test_one_process_makes_no_group_and_shutdown_is_safe(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert parallel.init_distributed("cpu") == (0, 1, 0)
    assert not dist.is_initialized()
    parallel.shutdown()  # nothing to destroy: no error


def test_world_of_one_is_the_identity():
    model = torch.nn.Linear(3, 2)
    assert parallel.parallelize(model, "ddp", world=1) is model
    assert parallel.parallelize(model, "fsdp", world=1) is model
    value = torch.tensor(2.5, requires_grad=True)
    mean = parallel.all_mean(value, world=1)
    assert mean.item() == 2.5 and not mean.requires_grad
    assert parallel.all_equal("abc", world=1)


def test_unknown_parallelism_is_refused():
    with pytest.raises(ValueError, match="unknown parallelism 'tp'; choose 'ddp' or 'fsdp'"):
        parallel.parallelize(torch.nn.Linear(3, 2), "tp", world=2)


def test_collectives_in_a_one_rank_group(one_rank_group):
    assert parallel.all_mean(torch.tensor(3.0), world=1).item() == 3.0
    # the collective path itself: a sum over the (one) rank divided by the world it is told
    assert parallel.all_mean(torch.tensor(3.0), world=dist.get_world_size() * 2).item() == 1.5
    assert parallel.all_equal("same", world=1)
    assert parallel.all_equal("same", world=dist.get_world_size())


def test_ddp_wrap_gives_the_plain_gradients(one_rank_group):
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    twin.load_state_dict(plain.state_dict())
    wrapped = parallel.parallelize(twin, "ddp", world=2)  # any world > 1 wraps
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.module is twin
    x = torch.randn(5, 4)
    plain(x).sum().backward()
    wrapped(x).sum().backward()
    for a, b in zip(plain.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_fsdp_shards_every_level_and_gathers_whole_weights(one_rank_group):
    cfg = preset("tiny", "base64")
    torch.manual_seed(0)
    model = UNet(cfg.unet)
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    out = parallel.parallelize(model, "fsdp", world=2)
    assert out is model  # FSDP2 shards in place
    assert all(hasattr(p, "full_tensor") for p in model.parameters())  # DTensors
    gathered = ckpt.full_tensors(model.state_dict())
    assert gathered.keys() == whole.keys()
    for k, v in whole.items():
        torch.testing.assert_close(gathered[k], v, rtol=0, atol=0, msg=k)


def test_agreed_raises_on_every_rank_when_one_failed(monkeypatch):
    """What rank 0 does when rank 1's I/O failed (the collective faked: rank 1's error arrives)."""
    assert parallel.agreed(lambda: 7, 1, "x") == 7
    with pytest.raises(OSError, match="disk full"):  # a world of one: the error itself
        parallel.agreed(lambda: (_ for _ in ()).throw(OSError("disk full")), 1, "x")
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)

    def gather(out, mine):
        out[:] = [mine, "FileNotFoundError: /ckpt/step-00000002.tmp/rng-1.pt"]

    monkeypatch.setattr(parallel.dist, "all_gather_object", gather)
    with pytest.raises(RuntimeError, match=r"writing /ckpt failed on another rank \(rank 1: FileNotFoundError: "
                                           r".*rng-1.pt\); shared\?"):
        parallel.agreed(lambda: None, 2, "writing /ckpt", "; shared?")
    monkeypatch.setattr(parallel.dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None),
                                                                                             [mine, None]))
    assert parallel.agreed(lambda: "ok", 2, "writing /ckpt") == "ok"


def test_on_rank0_gives_every_rank_rank_0s_answer(monkeypatch):
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)
    sent = []

    def broadcast(box, src):
        sent.append((list(box), src))
        box[:] = ["/ckpt/step-00000008", None]  # what rank 0 found

    monkeypatch.setattr(parallel.dist, "broadcast_object_list", broadcast)
    never = lambda: pytest.fail("only rank 0 looks")  # noqa: E731
    assert parallel.on_rank0(never, 1, 2, "finding") == "/ckpt/step-00000008"
    assert sent == [([None, None], 0)]
    monkeypatch.setattr(parallel.dist, "broadcast_object_list",
                        lambda box, src: box.__setitem__(slice(None), [None, "ValueError: bad --resume"]))
    with pytest.raises(RuntimeError, match="finding failed on rank 0: ValueError: bad --resume"):
        parallel.on_rank0(never, 1, 2, "finding")


def test_fsdp_bf16_gathers_bf16_weights_and_keeps_fp32_shards_and_grads(one_rank_group):
    cfg = preset("tiny", "base64")
    torch.manual_seed(0)
    model = parallel.parallelize(UNet(cfg.unet), "fsdp", world=2, bf16=True)
    seen = []
    model.stem.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.dtype))
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    text, mask = torch.randn(2, 4, cfg.unet.text_embed_dim), torch.ones(2, 4, dtype=torch.bool)
    model(x, t, text, mask).float().pow(2).mean().backward()
    assert seen == [torch.bfloat16]  # the all-gathered (compute) weights: half the bytes
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def _sync_calls(mode: str, monkeypatch) -> list[bool]:
    """Run one optimizer step of 3 micro-batches under ``mode``; the gradient-sync switches it made."""
    from pipeline.train.job import batch_plan
    from pipeline.train.step import StepOptions, TrainStep

    cfg = preset("tiny", "base64")
    batch = {"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
             "text_embeds": torch.zeros(2, 8, cfg.unet.text_embed_dim, dtype=torch.float16),
             "text_mask": torch.ones(2, 8, dtype=torch.bool), "keys": ["a", "b"]}
    # world 2 in a one-rank group: the wrapping and sync calls of a real job, one process
    step = TrainStep(cfg, StepOptions(parallel=mode), batch_plan(12, 2, 2), 0, 2, torch.device("cpu"))
    assert step.plan.grad_accum == 3
    calls: list[bool] = []
    if mode == "fsdp":
        switch = step.model.set_requires_gradient_sync

        def set_sync(sync, *a, **k):
            calls.append(sync)
            return switch(sync, *a, **k)

        monkeypatch.setattr(step.model, "set_requires_gradient_sync", set_sync)
    else:
        no_sync = step.ddp.no_sync

        def counted_no_sync():
            calls.append(False)
            return no_sync()

        monkeypatch.setattr(step.ddp, "no_sync", counted_no_sync)
    step.run(iter([batch] * 3), 0, 1e-3)
    return calls


def test_gradients_sync_only_on_the_last_micro_batch(one_rank_group, monkeypatch):
    """DDP no_sync / FSDP set_requires_gradient_sync(False) on every micro-batch but the last."""
    assert _sync_calls("ddp", monkeypatch) == [False, False]
    assert _sync_calls("fsdp", monkeypatch) == [False, False, True]


def test_checkpoint_gathers_the_ema_on_rank_0_only(one_rank_group):
    cfg = preset("tiny", "base64")
    torch.manual_seed(0)
    model = parallel.parallelize(UNet(cfg.unet), "fsdp", world=2)
    state = model.state_dict()
    assert ckpt.gather_to_rank0(state, rank=1) is None  # it joined each gather, kept nothing
    whole = ckpt.gather_to_rank0(state, rank=0)
    assert whole.keys() == state.keys() and all(v.device.type == "cpu" and not hasattr(v, "full_tensor")
                                                for v in whole.values())


def test_step_lays_weights_out_channels_last_except_under_fsdp(one_rank_group):
    """Channels-last convolutions (faster on CPU and CUDA) wherever the wrapping allows: FSDP2
    refuses non-contiguous parameters, so a sharded step keeps them contiguous and still builds."""
    from pipeline.train.job import batch_plan
    from pipeline.train.step import StepOptions, TrainStep

    cfg = preset("tiny", "base64")
    conv = "down.0.0.conv1.weight"
    for mode, world, expected in (("ddp", 2, True), ("fsdp", 1, True), ("fsdp", 2, False)):
        step = TrainStep(cfg, StepOptions(parallel=mode), batch_plan(4, 2, world), 0, world, torch.device("cpu"))
        weights = {k: v for k, v in step.model.named_parameters()}
        w = weights[conv] if conv in weights else next(v for k, v in weights.items() if v.dim() == 4 and
                                                       v.shape[-1] > 1)
        w = w.to_local() if hasattr(w, "to_local") else w
        assert step.channels_last is expected, (mode, world)
        assert w.is_contiguous(memory_format=torch.channels_last) is expected, (mode, world)
