"""Exponential moving average of the weights, as the official ``ExpMovingAverager`` (spec section 11).

After every optimizer step ``ema <- (1 - d) * ema + d * theta`` over all parameters *and* floating
buffers (BN running stats, the Integral ``project``), with the warm-up ramp

    d(it) = decay * exp(-(it + 1) / ramp) + (1 - decay)

(``it`` = global step): d ~ 0.9995 at it 0 (the EMA follows the model closely at first) and tends to
``1 - decay`` = 0.0002, i.e. an effective decay of 0.9998. Integer buffers (``num_batches_tracked``)
are copied. Evaluation, best.pt selection and export use the EMA weights.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def ema_weight(step: int, decay: float, ramp_steps: int) -> float:
    """The weight ``d`` of the current model at global step ``step`` (0-based)."""
    return decay * math.exp(-(step + 1) / ramp_steps) + (1.0 - decay)


class ModelEMA:
    """A frozen copy of ``model`` (unwrapped, eval mode) that tracks its moving average."""

    def __init__(self, model: nn.Module, decay: float = 0.9998, ramp_steps: int = 2000):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if ramp_steps <= 0:
            raise ValueError(f"EMA ramp_steps must be > 0, got {ramp_steps}")
        self.decay = float(decay)
        self.ramp_steps = int(ramp_steps)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Blend ``model`` (the unwrapped training model) into the average; returns the ``d`` used."""
        d = ema_weight(step, self.decay, self.ramp_steps)
        self.blend(model, d)
        return d

    @torch.no_grad()
    def blend(self, model: nn.Module, d: float) -> None:
        ema_state = self.module.state_dict()
        model_state = model.state_dict()
        if ema_state.keys() != model_state.keys():
            missing = sorted(set(ema_state) ^ set(model_state))[:5]
            raise KeyError(f"EMA and model state dicts differ (e.g. {missing}); was the model rebuilt?")
        floats_e, floats_m = [], []
        for key, e in ema_state.items():
            m = model_state[key].detach()
            if e.dtype.is_floating_point:
                floats_e.append(e)
                floats_m.append(m.to(e.dtype))
            else:
                e.copy_(m)
        if floats_e:
            # ema = ema + d * (theta - ema) == (1 - d) * ema + d * theta, in one fused call
            torch._foreach_lerp_(floats_e, floats_m, d)

    def state_dict(self) -> dict:
        """The averaged model's state dict (same keys as the model's)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state, strict=True)
