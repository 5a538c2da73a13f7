"""The training loop: one epoch as a plain function (checkpoints, tracking and validation stay with the
caller, which passes hooks in :class:`TrainState`).

One host synchronisation per training step is needed for the control decisions that every rank must
take identically: skip the step (non-finite loss or gradients on *any* rank) and stop (a signal on any
rank). Both flags travel in a single all-reduce; loss values are only copied to the host at log
intervals.
"""
from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from pipeline import dist as pdist
from pipeline import faults
from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.logging import get_logger
from pipeline.model.criterion import LOSS_KEYS
from pipeline.train.progress import Progress
from pipeline.train.step import TrainStep

log = get_logger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """Too many consecutive non-finite steps: training diverged."""


class StopFlag:
    """Set from a signal handler; read once per step. ``signum`` is the signal that set it."""

    def __init__(self) -> None:
        self.signum = 0

    def set(self, signum: int = signal.SIGTERM) -> None:
        self.signum = int(signum)

    def is_set(self) -> bool:
        return self.signum != 0


# ---------------------------------------------------------------------------------- train state
@dataclass
class TrainState:
    """Progress shared between the loop and its caller; everything here is checkpointed except the hooks."""

    epoch: int = 0  # epoch in progress (or next to run)
    step: int = 0  # global iterations done, skipped non-finite ones included (drives lr and EMA)
    epoch_step: int = 0  # iterations of ``epoch`` done; > 0 after a mid-epoch resume
    nonfinite_consecutive: int = 0
    nonfinite_total: int = 0
    interrupted: int = 0  # signal number that stopped the loop, 0 if none
    loss_sums: list[float] = field(default_factory=list)  # running sums of LOSS_KEYS + total this epoch
    loss_count: int = 0
    on_step_end: Callable[[TrainState], None] | None = None  # e.g. step checkpoints
    on_log: Callable[[dict[str, float], int], None] | None = None  # (metrics, step): the caller's tracker
    meter: Any = None  # the running epoch's _LossMeter (read only when a checkpoint is written)

    def counters(self) -> dict[str, Any]:
        if self.meter is not None:
            self.loss_sums, self.loss_count = self.meter.sums.tolist(), self.meter.count
        return {"epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
                "nonfinite": {"consecutive": self.nonfinite_consecutive, "total": self.nonfinite_total},
                "loss_sums": list(self.loss_sums), "loss_count": self.loss_count}

    def log(self, metrics: dict[str, float]) -> None:
        if self.on_log is not None:
            self.on_log(metrics, self.step)


class _LossMeter:
    """Sums of the loss terms on the device (no host sync per step)."""

    def __init__(self, device: torch.device, sums: list[float], count: int):
        n = len(LOSS_KEYS) + 1
        self.sums = torch.tensor(sums if len(sums) == n else [0.0] * n, dtype=torch.float64, device=device)
        self.count = count if len(sums) == n else 0
        self.window = torch.zeros(n, dtype=torch.float64, device=device)
        self.window_count = 0

    def add(self, terms: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        values = torch.stack([terms[k].detach().float() for k in LOSS_KEYS] + [total.detach().float()])
        values = values.double()
        self.sums += values
        self.window += values
        self.count += 1
        self.window_count += 1

    def mean(self, window: bool = False) -> dict[str, float]:
        """Cross-rank mean (a collective: call on every rank at the same step)."""
        sums, count = (self.window, self.window_count) if window else (self.sums, self.count)
        if count == 0:
            return {}
        values = pdist.reduce_mean(sums / count).tolist()
        if window:
            self.window.zero_()
            self.window_count = 0
        return dict(zip(LOSS_KEYS + ("loss",), values))


# -------------------------------------------------------------------------------- train_one_epoch
def train_one_epoch(step_fn: TrainStep, loader: Any, scheduler: Any, epoch: int, state: TrainState,
                    train_cfg: TrainConfig, stop_flag: StopFlag) -> dict[str, float]:
    """One pass over ``loader`` (skipping the ``state.epoch_step`` batches a resumed run already did).

    ``step_fn``: the training step (model, criterion, optimizer, scaler, EMA); ``scheduler`` sets the lr
    of each global step. Training metrics go to ``state.on_log`` (every ``train.log_interval`` steps) and
    ``state.on_step_end`` runs after every step. Returns the epoch means of the loss terms (cross-rank),
    the last lr and step counts.
    """
    device = step_fn.device
    step_fn.module.train()
    meter = _LossMeter(device, state.loss_sums if state.epoch_step else [], state.loss_count)
    state.meter = meter
    nan_steps = faults.nan_steps(pdist.get_rank())
    total_batches = len(loader)
    skip = state.epoch_step
    progress = Progress(train_cfg, epoch, total_batches, skip, state.step)
    lr = scheduler.get_last_lr()
    batches = iter(loader)
    for _ in range(skip):  # mid-epoch resume: the loader replays the epoch's deterministic order
        next(batches, None)
    for batch in batches:
        if train_cfg.max_steps and state.step >= train_cfg.max_steps:
            break
        lr = scheduler.step(state.step, epoch)
        loss, terms, grad_norm = step_fn(batch, epoch, corrupt=state.step in nan_steps)
        loss_bad, grad_bad, stop = _agree_flags(loss, grad_norm, stop_flag)
        # fp16: inf/NaN gradients are the GradScaler's business (it skips and lowers the scale)
        if loss_bad or (grad_bad and not step_fn.scaler.is_enabled()):
            step_fn.skip()
            _count_skip(state, train_cfg, epoch)
        else:
            step_fn.apply(state.step)
            state.nonfinite_consecutive = 0
            meter.add(terms, loss)
        state.step += 1
        state.epoch_step += 1
        if state.step % train_cfg.log_interval == 0:
            losses = meter.mean(window=True)
            progress.log(losses, lr, state.step)
            if pdist.is_main():
                state.log({**{f"train/{k}": v for k, v in losses.items()}, "train/lr": lr, "train/epoch": epoch})
        else:
            progress.tick()
        if state.on_step_end is not None:
            state.on_step_end(state)
        if stop:
            state.interrupted = stop_flag.signum or int(signal.SIGTERM)
            break
    progress.close()
    state.counters()  # pulls the meter's sums into the state
    state.meter = None
    out = meter.mean()
    out.update(lr=lr, steps=state.epoch_step, nonfinite_total=state.nonfinite_total,
               images_per_s=progress.images_per_s(_batch_size(loader)))
    return out


def _agree_flags(loss: torch.Tensor, grad_norm: torch.Tensor, stop_flag: StopFlag) -> tuple[bool, bool, bool]:
    """(loss non-finite, grads non-finite, stop requested) - True on every rank if True on any."""
    flags = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm.detach().to(loss.device)),
                         torch.tensor(stop_flag.is_set(), device=loss.device)]).float()
    if pdist.is_dist():
        flags = flags.to(pdist._collective_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, grad_bad, stop = (v > 0 for v in flags.tolist())
    return loss_bad, grad_bad, stop


def _count_skip(state: TrainState, train_cfg: TrainConfig, epoch: int) -> None:
    state.nonfinite_consecutive += 1
    state.nonfinite_total += 1
    log.warning("non-finite loss or gradients at step %d (epoch %d): step skipped on all ranks "
                "(%d in a row, %d in total)", state.step, epoch, state.nonfinite_consecutive,
                state.nonfinite_total)
    state.log({"train/nonfinite_skipped": state.nonfinite_total})
    if state.nonfinite_consecutive >= train_cfg.max_nonfinite:
        raise NonFiniteLossError(
            f"training diverged: {state.nonfinite_consecutive} consecutive steps with a non-finite loss or "
            f"gradients (last at step {state.step}, epoch {epoch}; "
            f"train.max_nonfinite={train_cfg.max_nonfinite}). "
            "Lower train.lr, raise train.warmup_steps, use train.amp=off, or check the data for broken boxes")


def _batch_size(loader: Any) -> int:
    return int(getattr(loader, "batch_size", None) or getattr(loader.batch_sampler, "batch_size", 1))
