"""Warm-up + per-epoch cosine values of the official recipe (spec section 11) and the AdamW setup."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.train.optim import build_optimizer, build_scheduler, clip_gradients, scaled_lr


def _official(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-3, "min_lr": 5e-5, "epochs": 300, "warmup_steps": 500, "warmup_ratio": 1e-4, **kw})


def _schedule(cfg: TrainConfig, global_batch: int = 96):
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    return opt, build_scheduler(opt, cfg, global_batch)


def test_warmup_values_from_spec():
    _, sched = _schedule(_official())
    assert sched.lr_at(0, 0) == pytest.approx(1e-7, rel=1e-9)  # issue #491's logged first lr
    assert sched.lr_at(250, 0) == pytest.approx(1e-3 * (1 - 0.5 * (1 - 1e-4)), rel=1e-12)  # ~5e-4
    assert sched.lr_at(500, 0) == pytest.approx(1e-3, rel=1e-12)
    assert sched.lr_at(501, 0) == pytest.approx(1e-3, rel=1e-12)


@pytest.mark.parametrize("epoch, expected", [(0, 1e-3), (100, 7.625e-4), (150, 5.25e-4),
                                             (299, 5e-5 + 0.95e-3 * (1 + math.cos(math.pi * 299 / 300)) / 2)])
def test_cosine_per_epoch_values_from_spec(epoch, expected):
    _, sched = _schedule(_official())
    assert sched.lr_at(10_000, epoch) == pytest.approx(expected, rel=1e-9)
    # constant within an epoch (stepped per epoch, not per iteration)
    assert sched.lr_at(10_000, epoch) == sched.lr_at(20_000, epoch)


def test_step_sets_lr_on_every_group_and_state_roundtrips():
    opt, sched = _schedule(_official())
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    lr = sched.step(250, 0)
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]
    assert sched.get_last_lr() == lr
    opt2, sched2 = _schedule(_official())
    sched2.load_state_dict(sched.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.param_groups[0]["lr"] == lr  # the restored schedule re-applies its last lr
    with pytest.raises(KeyError, match="epochs"):
        sched2.load_state_dict({k: v for k, v in sched.state_dict().items() if k != "epochs"})


def test_warmup_spanning_epochs_is_continuous():
    _, sched = _schedule(_official(epochs=10, warmup_steps=50))
    # warm-up ends in epoch 3: the lr reaches that epoch's cosine value without a jump
    assert sched.lr_at(50, 3) == pytest.approx(sched.cosine(3))
    assert sched.lr_at(49, 3) < sched.lr_at(50, 3)


def test_lr_scaled_by_global_batch():
    cfg = _official(lr_scale_batch=96)
    assert scaled_lr(cfg, 192) == pytest.approx(2e-3)
    assert scaled_lr(_official(), 192) == pytest.approx(1e-3)  # off by default, as the official code
    _, sched = _schedule(cfg, global_batch=48)
    assert sched.lr_at(600, 0) == pytest.approx(5e-4)


def test_adamw_decays_every_parameter_like_official():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
    opt = build_optimizer(model, _official(), 96)
    assert isinstance(opt, torch.optim.AdamW)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(list(model.parameters()))  # biases and norm weights included
    assert all(g["weight_decay"] == 0.05 and g["betas"] == (0.9, 0.999) for g in opt.param_groups)


def test_clip_gradients_global_norm():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 30.0), torch.full((4,), 40.0)
    norm = clip_gradients([a, b], 35.0)
    expected = math.sqrt(3 * 900 + 4 * 1600)
    assert float(norm) == pytest.approx(expected)
    after = math.sqrt(float((a.grad ** 2).sum() + (b.grad ** 2).sum()))
    assert after == pytest.approx(35.0, rel=1e-4)
    a.grad = torch.tensor([float("nan"), 0.0, 0.0])
    assert not torch.isfinite(clip_gradients([a, b], 35.0))  # reported, not raised: the engine skips the step


def test_fused_adamw_is_the_per_tensor_update():
    """build_optimizer uses the fused AdamW on CPU; after warm-up-sized steps it holds the same weights and
    moments as the reference per-tensor loop (to float32 rounding)."""
    torch.manual_seed(0)
    # no bias before a BatchNorm (as in the network): its gradient is ~0, and Adam's g / (sqrt(v) + eps) on a
    # 1e-10 gradient turns float32 rounding into percent-level differences between any two implementations
    ref_model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.Conv2d(8, 4, 1))
    model = copy.deepcopy(ref_model)
    opt = build_optimizer(model, _official(), 96)
    assert opt.param_groups[0]["fused"] is True
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, foreach=False)
    for step in range(5):
        x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
