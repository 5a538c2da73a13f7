"""The training and evaluation loops as two plain functions (checkpoints and tracking stay with the caller).

One host synchronisation per training step is needed for the control decisions that every rank must
take identically: skip the step (non-finite loss or gradients on *any* rank) and stop (a signal on any
rank). Both flags travel in a single all-reduce; loss values are only copied to the host at log
intervals.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline import dist as pdist
from pipeline.config import Config, ConfigError
from pipeline.errors import UserError
from pipeline.logging import get_logger
from pipeline.optim import clip_gradients
from pipeline.perf import check_cpu_bf16, run_with_fallback

log = get_logger(__name__)

LOSS_TERMS = ("loss_qfl", "loss_bbox", "loss_dfl", "aux_loss_qfl", "aux_loss_bbox", "aux_loss_dfl")
FAULT_NAN_ENV = "NANODET_FAULT_NAN_STEPS"  # test hook: comma-separated global steps whose loss becomes NaN
FAULT_RANK_ENV = "NANODET_FAULT_RANK"  # ... only on this rank (default: every rank)


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


# ----------------------------------------------------------------------------------------- AMP
def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype (None = fp32).

    auto: off on CPU, bf16 on CUDA when supported, else fp16 (with a GradScaler)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device (float16 training relies on a GradScaler); "
                          "use train.amp=bf16 or train.amp=off on CPU")
    if mode == "bf16" and device.type == "cpu":
        check_cpu_bf16()
    return torch.bfloat16 if mode == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------- train state
@dataclass
class TrainState:
    """Progress shared between the loop and its caller; everything here is checkpointed."""

    epoch: int = 0  # epoch in progress (or next to run)
    step: int = 0  # global iterations done, skipped non-finite ones included (drives lr and EMA)
    epoch_step: int = 0  # iterations of ``epoch`` done; > 0 after a mid-epoch resume
    nonfinite_consecutive: int = 0
    nonfinite_total: int = 0
    interrupted: int = 0  # signal number that stopped the loop, 0 if none
    loss_sums: list[float] = field(default_factory=list)  # running sums of LOSS_TERMS + total this epoch
    loss_count: int = 0
    on_step_end: Callable[[TrainState], None] | None = None  # e.g. step checkpoints
    meter: Any = None  # the running epoch's _LossMeter (read only when a checkpoint is written)

    def counters(self) -> dict[str, Any]:
        if self.meter is not None:
            self.loss_sums, self.loss_count = self.meter.sums.tolist(), self.meter.count
        return {"epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
                "nonfinite": {"consecutive": self.nonfinite_consecutive, "total": self.nonfinite_total},
                "loss_sums": list(self.loss_sums), "loss_count": self.loss_count}


class _LossMeter:
    """Sums of the loss terms on the device (no host sync per step)."""

    def __init__(self, device: torch.device, sums: list[float], count: int):
        n = len(LOSS_TERMS) + 1
        self.sums = torch.tensor(sums if len(sums) == n else [0.0] * n, dtype=torch.float64, device=device)
        self.count = count if len(sums) == n else 0
        self.window = torch.zeros(n, dtype=torch.float64, device=device)
        self.window_count = 0

    def add(self, terms: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        values = torch.stack([terms[k].detach().float() for k in LOSS_TERMS] + [total.detach().float()])
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
        return dict(zip(LOSS_TERMS + ("loss",), values))


def _fault_steps() -> set[int]:
    raw = os.environ.get(FAULT_NAN_ENV, "").strip()
    rank = os.environ.get(FAULT_RANK_ENV)
    if not raw or (rank is not None and int(rank) != pdist.get_rank()):
        return set()
    return {int(s) for s in raw.split(",") if s.strip()}


def _to_device(batch: dict, device: torch.device, channels_last: bool = False
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Images [B, 3, H, W] and the padded ground truth:
    gt_boxes [B, G, 4], gt_labels [B, G], gt_valid [B, G]."""
    images = batch["images"].to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    gt = tuple(batch[k].to(device, non_blocking=True) for k in ("gt_boxes", "gt_labels", "gt_valid"))
    return images, gt


class _Priors:
    """make_priors cached per input size (multi-scale batches change it)."""

    def __init__(self, strides, device):
        self.strides, self.device, self.cache = tuple(strides), device, {}

    def __call__(self, hw: tuple[int, int]) -> torch.Tensor:
        if hw not in self.cache:
            from pipeline.model.decode import make_priors

            self.cache[hw] = make_priors(hw, self.strides, device=self.device)
        return self.cache[hw]


# -------------------------------------------------------------------------------- train_one_epoch
def train_one_epoch(model: nn.Module, criterion: Any, loader: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, ema: Any, scaler: torch.amp.GradScaler, epoch: int, state: TrainState,
                    cfg: Config, device: torch.device, tracker: Any, stop_flag: StopFlag) -> dict[str, float]:
    """One pass over ``loader`` (skipping the ``state.epoch_step`` batches a resumed run already did).

    ``model``: the training module (``TrainForward``, possibly inside DDP); ``ema``: ModelEMA or None.
    Returns the epoch means of the loss terms (cross-rank), the last lr and step counts.
    """
    raw = unwrap(model)
    model.train()
    amp_dtype = resolve_amp(cfg.train.amp, device)
    priors = _Priors(raw.strides, device)
    meter = _LossMeter(device, state.loss_sums if state.epoch_step else [], state.loss_count)
    state.meter = meter
    faults = _fault_steps()
    total_batches = len(loader)
    skip = state.epoch_step
    progress = _Progress(cfg, epoch, total_batches, skip, state.step)
    lr = scheduler.get_last_lr()
    batches = iter(loader)
    for _ in range(skip):  # mid-epoch resume: the loader replays the epoch's deterministic order
        next(batches, None)
    for batch in batches:
        if cfg.train.max_steps and state.step >= cfg.train.max_steps:
            break
        lr = scheduler.step(state.step, epoch)
        images, targets = _to_device(batch, device, cfg.train.channels_last)

        def forward_backward(images=images, targets=targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp_dtype):
                head_out, aux_out = model(images, epoch)
            # the criterion computes in float32 even under autocast
            loss, terms, _ = criterion(head_out, aux_out, *targets, priors(tuple(images.shape[-2:])))
            if state.step in faults:
                loss = loss * float("nan")
            scaler.scale(loss).backward()
            return loss, terms

        # with train.compile, a compiler failure (forward or first backward) continues in eager mode
        loss, terms = run_with_fallback(model, forward_backward)
        scaler.unscale_(optimizer)
        grad_norm = clip_gradients(raw.parameters(), cfg.train.grad_clip)
        loss_bad, grad_bad, stop = _agree_flags(loss, grad_norm, stop_flag, device)
        # fp16: inf/NaN gradients are the GradScaler's business (it skips and lowers the scale)
        if loss_bad or (grad_bad and not scaler.is_enabled()):
            _skip_step(optimizer, scaler, state, cfg, epoch, tracker)
        else:
            scaler.step(optimizer)
            scaler.update()
            state.nonfinite_consecutive = 0
            if ema is not None:
                ema.update(raw, state.step)
            meter.add(terms, loss)
        state.step += 1
        state.epoch_step += 1
        if state.step % cfg.train.log_interval == 0:
            progress.log(meter.mean(window=True), lr, state, tracker)
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


def _agree_flags(loss: torch.Tensor, grad_norm: torch.Tensor, stop_flag: StopFlag,
                 device: torch.device) -> tuple[bool, bool, bool]:
    """(loss non-finite, grads non-finite, stop requested) - True on every rank if True on any."""
    flags = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm.detach().to(loss.device)),
                         torch.tensor(stop_flag.is_set(), device=loss.device)]).float()
    if pdist.is_dist():
        flags = flags.to(pdist._collective_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    loss_bad, grad_bad, stop = (v > 0 for v in flags.tolist())
    return loss_bad, grad_bad, stop


def _skip_step(optimizer, scaler, state: TrainState, cfg: Config, epoch: int, tracker: Any) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler.is_enabled():
        scaler.update()  # closes this step's unscale_ and lowers the scale
    state.nonfinite_consecutive += 1
    state.nonfinite_total += 1
    log.warning("non-finite loss or gradients at step %d (epoch %d): step skipped on all ranks "
                "(%d in a row, %d in total)", state.step, epoch, state.nonfinite_consecutive,
                state.nonfinite_total)
    tracker.log({"train/nonfinite_skipped": state.nonfinite_total}, step=state.step)
    if state.nonfinite_consecutive >= cfg.train.max_nonfinite:
        raise NonFiniteLossError(
            f"training diverged: {state.nonfinite_consecutive} consecutive steps with a non-finite loss or "
            f"gradients (last at step {state.step}, epoch {epoch}; "
            f"train.max_nonfinite={cfg.train.max_nonfinite}). "
            "Lower train.lr, raise train.warmup_steps, use train.amp=off, or check the data for broken boxes")


def _batch_size(loader: Any) -> int:
    return int(getattr(loader, "batch_size", None) or getattr(loader.batch_sampler, "batch_size", 1))


class _Progress:
    """tqdm on rank 0 when stderr is a terminal, else a log line every ``train.log_interval`` steps."""

    def __init__(self, cfg: Config, epoch: int, total: int, done: int, step: int):
        self.cfg, self.epoch, self.total, self.done = cfg, epoch, total, done
        self.start_done, self.start_step = done, step
        self.t0 = time.perf_counter()
        self.bar = None
        if pdist.is_main() and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)

    def its(self) -> float:
        return (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)

    def images_per_s(self, batch_size: int) -> float:
        return self.its() * batch_size * pdist.get_world_size()

    def tick(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def log(self, losses: dict[str, float], lr: float, state: TrainState, tracker: Any) -> None:
        self.tick()
        if not pdist.is_main():
            return
        tracker.log({**{f"train/{k}": v for k, v in losses.items()}, "train/lr": lr,
                     "train/epoch": self.epoch}, step=state.step)
        its = self.its()
        left = (self.total - self.done) + (self.cfg.train.epochs - self.epoch - 1) * self.total
        if self.cfg.train.max_steps:
            left = min(left, self.cfg.train.max_steps - state.step)
        terms = " ".join(f"{k.replace('loss_', '')}={v:.4f}" for k, v in losses.items() if k != "loss")
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={losses.get('loss', math.nan):.4f} lr={lr:.2e}")
            return
        log.info("epoch %d [%d/%d] step %d  %.2f it/s  loss %.4f (%s)  lr %.3e  eta %s", self.epoch,
                 self.done, self.total, state.step, its, losses.get("loss", math.nan), terms, lr,
                 hms(left / max(its, 1e-9)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, cfg: Config, device: torch.device, gt_json: str | None = None,
             return_detections: bool = False) -> dict[str, Any]:
    """COCO metrics of ``model`` (pass the EMA module) on ``loader``'s split, the same on every rank.

    Each rank predicts its shard; detections are mapped to original-image pixels, gathered (an image
    that a padding sampler gave two ranks is counted once) and scored on rank 0, then broadcast.
    ``return_detections``: rank 0's result also holds "detections" (COCO result dicts).
    """
    from pipeline.metrics import detections_to_coco
    from pipeline.model.decode import postprocess

    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    priors = _Priors(raw.strides, device)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    per_image: dict[int, list[dict]] = {}
    for batch in loader:
        images = batch["images"].to(device, non_blocking=True)
        hw = tuple(images.shape[-2:])
        with autocast(device, amp_dtype):
            head_out = raw(images)
        dets = postprocess(head_out.float(), priors(hw), raw.num_classes, raw.reg_max, hw,
                           score_thr=cfg.eval.score_thr, iou_thr=cfg.eval.iou_thr, max_dets=cfg.eval.max_dets)
        for det, meta in zip(dets, batch["meta"]):
            per_image.setdefault(int(meta["image_id"]), detections_to_coco([det], [meta]))
    raw.train(was_training)
    gathered = pdist.all_gather_object(per_image)
    metrics: dict[str, Any] | None = None
    detections: list[dict] = []
    if pdist.is_main():
        merged: dict[int, list[dict]] = {}
        for part in gathered:
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)
        detections = [d for image_id in sorted(merged) for d in merged[image_id]]
        metrics = score_detections(detections, gt_json or default_gt_json(cfg, "val"))
        metrics["num_images"] = len(merged)
    metrics = pdist.broadcast_object(metrics)
    if return_detections and pdist.is_main():
        metrics = {**metrics, "detections": detections}
    return metrics


def default_gt_json(cfg: Config, split: str) -> str:
    return os.path.join(cfg.data.prepared_dir, f"{split}.json")


_GT_CACHE: dict[tuple[str, float], Any] = {}


def load_gt(gt_json: str) -> tuple[Any, list[str]]:
    """The ground-truth COCO object (cached per file and mtime) and its class names in id order."""
    from pipeline.metrics import load_coco

    key = (os.path.abspath(gt_json), os.path.getmtime(gt_json))
    if key not in _GT_CACHE:
        coco = load_coco(gt_json)
        names = [c["name"] for c in sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])]
        _GT_CACHE.clear()
        _GT_CACHE[key] = (coco, names)
    return _GT_CACHE[key]


def score_detections(detections: list[dict], gt_json: str) -> dict[str, Any]:
    from pipeline.metrics import coco_evaluate

    coco, names = load_gt(gt_json)
    return coco_evaluate(coco, detections, names)
