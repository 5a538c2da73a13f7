"""One real training step of the engine, alone or as one rank of a gloo group; saves gradients and loss terms.

Used by test_ddp_gradients.py: run in-process for the single-process reference (the whole global batch) and
as ``torchrun --standalone --nproc_per_node=2 tests/train/ddp_step.py <work dir> <overrides...>`` for the
2-rank step (each rank takes its contiguous half of the global batch). The step is
``pipeline.train.loop.train_one_epoch`` over a one-batch loader - the training module wrapped in DDP, the
NanoDetPlusLoss with its cross-rank normalisers, the GradScaler call and gradient measurement of the
training loop - with gradient clipping off (train.grad_clip=0), so the gradients left on the parameters after
the step are exactly the (all-reduced) gradients of that step's loss.

BatchNorm layers are kept in eval mode (running statistics, set from the global batch by the test): in train
mode each rank would normalise with the statistics of its own half of the batch, so the per-sample outputs
would depend on how the batch is split and the two runs would not be comparable (SyncBatchNorm is CUDA-only).
Everything else - the assigner, the loss normalisers, DDP's gradient averaging - is what training runs.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from torch import nn


class OneBatch:
    """The smallest loader train_one_epoch accepts: one batch, its batch size."""

    def __init__(self, batch: dict):
        self.batch, self.batch_size = batch, int(batch["images"].shape[0])

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        return iter([self.batch])


class RecordingLoss:
    """The real criterion; keeps the local (per-rank) terms of its last call, ``num_pos`` included."""

    def __init__(self, criterion):
        self.criterion, self.terms = criterion, {}

    def __call__(self, *args):
        total, terms, targets = self.criterion(*args)
        self.terms = {k: float(v) for k, v in terms.items()}
        return total, terms, targets


def _eval_mode_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm layer stay in eval mode whatever ``model.train()`` asks; returns their number."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), m)
            m.eval()
            count += 1
    return count


def run_step(work: Path, overrides: list[str]) -> dict:
    """One step on this rank's share of ``work/batch.pt`` from the weights in ``work/init.pt``; returns (and on
    rank 0 of a group also saves to ``work/ddp.pt``) the gradients, the logged loss terms (cross-rank means)
    and the local terms of every rank."""
    from pipeline import dist as pdist
    from pipeline.config import compose
    from pipeline.model import build_model
    from pipeline.model.criterion import NanoDetPlusLoss
    from pipeline.train.loop import StopFlag, TrainState, train_one_epoch
    from pipeline.train.optim import build_optimizer, build_scheduler
    from pipeline.train.step import TrainForward, TrainStep

    cfg = compose(overrides)
    device = torch.device("cpu")
    pdist.init_distributed(device, timeout_s=120)
    rank, world = pdist.get_rank(), pdist.get_world_size()
    model = build_model(cfg.model, with_aux=True)
    model.load_state_dict(torch.load(work / "init.pt", weights_only=True))
    assert _eval_mode_batchnorm(model) > 10
    module: nn.Module = TrainForward(model)
    if pdist.is_dist():
        module = nn.parallel.DistributedDataParallel(module, find_unused_parameters=False)
    batch = torch.load(work / "batch.pt", weights_only=True)
    share = batch["images"].shape[0] // world
    local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
    optimizer = build_optimizer(model, cfg.train, share * world)
    scheduler = build_scheduler(optimizer, cfg.train, share * world)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = RecordingLoss(NanoDetPlusLoss(cfg.model))
    step_fn = TrainStep(module, criterion, optimizer, scaler, ema=None, device=device, amp_dtype=None,
                        channels_last=False, grad_clip=cfg.train.grad_clip)
    logged = train_one_epoch(step_fn, OneBatch(local), scheduler, 0, TrainState(), cfg.train, StopFlag())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    result = {"grads": grads, "logged": {k: float(v) for k, v in logged.items()},
              "local": pdist.all_gather_object(criterion.terms), "world": world}
    if pdist.is_dist():
        # DDP leaves the same averaged gradients on every rank: compare rank 1's with rank 0's here
        other = pdist.all_gather_object(grads)[1 - rank]
        result["max_rank_difference"] = max(float((grads[n] - other[n]).abs().max()) for n in grads)
        if rank == 0:
            torch.save(result, work / "ddp.pt")
        pdist.cleanup()
    return result


if __name__ == "__main__":
    run_step(Path(sys.argv[1]), sys.argv[2:])
