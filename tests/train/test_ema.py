"""ModelEMA: the official decay ramp and the blend over parameters and buffers (spec section 11)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.train.ema import ModelEMA, ema_weight


@pytest.mark.parametrize("step, expected", [(0, 0.9995), (1999, 0.368), (4999, 0.0823), (9999, 0.00694),
                                            (10**7, 0.0002)])
def test_decay_ramp_values_from_spec(step, expected):
    assert ema_weight(step, 0.9998, 2000) == pytest.approx(expected, abs=5e-4 if expected > 0.01 else 5e-6)
    assert ema_weight(step, 0.9998, 2000) == pytest.approx(0.9998 * math.exp(-(step + 1) / 2000) + 0.0002)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _train_once(model: nn.Module) -> None:
    model.train()
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # updates BN running stats and num_batches_tracked
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def test_ema_equals_model_after_update_with_weight_one():
    model = _model()
    ema = ModelEMA(model, decay=0.0)  # d = 0 * exp(...) + 1 = 1
    _train_once(model)
    assert ema.update(model, step=5) == 1.0
    for key, value in model.state_dict().items():
        assert torch.equal(ema.state_dict()[key], value), key


def test_blend_over_params_and_buffers_and_copied_integer_buffers():
    model = _model()
    ema = ModelEMA(model, decay=0.9998, ramp_steps=2000)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    _train_once(model)
    d = ema.update(model, step=1999)
    assert d == pytest.approx(ema_weight(1999, 0.9998, 2000))
    for key, theta in model.state_dict().items():
        got = ema.state_dict()[key]
        if theta.dtype.is_floating_point:
            torch.testing.assert_close(got, (1 - d) * before[key] + d * theta, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got, theta), key  # num_batches_tracked copied
    assert "1.running_var" in model.state_dict()  # buffers were part of the check


def test_ema_copy_is_frozen_and_state_roundtrips():
    model = _model()
    ema = ModelEMA(model)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    _train_once(model)
    ema.update(model, 0)
    other = ModelEMA(_model())
    other.load_state_dict(ema.state_dict())
    for key, value in ema.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.5)
