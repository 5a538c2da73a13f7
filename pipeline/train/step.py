"""THE training step, used by the training loop and by ``python -m pipeline.bench train``.

:class:`TrainStep` holds what one optimisation step touches. Calling it runs forward (under autocast),
the loss (float32), the backward (through the GradScaler), unscaling and gradient clipping, and returns
``(loss, terms, grad_norm)``; :meth:`TrainStep.apply` then steps the optimizer and the EMA. The loop
decides in between, identically on every rank, whether to apply or skip (non-finite loss/gradients).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.model.decode import priors_for
from pipeline.perf import autocast, run_with_fallback
from pipeline.train.optim import clip_gradients


class TrainForward(nn.Module):
    """Routes ``forward`` to ``forward_train`` so DistributedDataParallel sees the training graph
    (DDP only prepares gradient reduction inside ``forward``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_train(images, epoch)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare NanoDetPlus inside torch.compile, DDP and/or TrainForward wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, TrainForward):
            model = model.model
        else:
            return model


def to_device(batch: dict, device: torch.device, channels_last: bool = False
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Images [B, 3, H, W] and the padded ground truth:
    gt_boxes [B, G, 4], gt_labels [B, G], gt_valid [B, G]."""
    images = batch["images"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    gt = tuple(batch[k].to(device, non_blocking=True) for k in ("gt_boxes", "gt_labels", "gt_valid"))
    return images, gt


def _no_mark(_phase: str) -> None:
    return None


@dataclass
class TrainStep:
    """One optimisation step of ``module`` (a TrainForward, possibly inside DDP / torch.compile)."""

    module: nn.Module
    criterion: Any  # NanoDetPlusLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Any  # ModelEMA or None
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    grad_clip: float
    raw: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.raw = unwrap(self.module)

    def __call__(self, batch: dict, epoch: int, corrupt: bool = False,
                 mark: Callable[[str], None] = _no_mark) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Forward + loss + backward + unscale + clip on ``batch``; returns (loss, terms, grad_norm).

        ``corrupt``: make the loss NaN (test-only fault, pipeline.faults). ``mark(phase)`` is called after
        "data", "forward", "loss" and "backward" (the bench times the phases with it)."""
        images, targets = to_device(batch, self.device, self.channels_last)
        mark("data")

        def forward_backward() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            self.optimizer.zero_grad(set_to_none=True)
            with autocast(self.device, self.amp_dtype):
                head_out, aux_out = self.module(images, epoch)
            mark("forward")
            # the criterion computes in float32 even under autocast
            priors = priors_for(images.shape[-2:], self.raw.strides, self.device)
            loss, terms, _ = self.criterion(head_out, aux_out, *targets, priors)
            if corrupt:
                loss = loss * float("nan")
            mark("loss")
            self.scaler.scale(loss).backward()
            mark("backward")
            return loss, terms

        # with train.compile, a compiler failure (forward or first backward) continues in eager mode
        loss, terms = run_with_fallback(self.module, forward_backward)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.raw.parameters(), self.grad_clip)
        return loss, terms, grad_norm

    def apply(self, step: int) -> None:
        """Optimizer (through the GradScaler) and EMA update for global step ``step``."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.raw, step)

    def skip(self) -> None:
        """Drop this step's gradients (non-finite); with fp16 the GradScaler lowers its scale."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()  # closes this step's unscale_ and lowers the scale
