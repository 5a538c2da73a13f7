"""DataLoaders for training (sharded, shuffled per epoch, optional multi-scale) and evaluation (sharded,
every image exactly once across ranks), plus a throughput benchmark.

Call ``loader.set_epoch(epoch)`` at the start of every training epoch: it reshuffles (the order is a
function of ``train.seed`` and the epoch, the same on every rank, so a resumed run sees the same
order) and re-draws the multi-scale sizes.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, get_worker_info

from pipeline import dist
from pipeline.data.dataset import DetectionDataset, collate
from pipeline.data.formats import prepared_json
from pipeline.data.transforms import read_image
from pipeline.logging import get_logger

log = get_logger("data.loader")


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r gets indices r, r + R, r + 2R, ... so each sample is
    seen exactly once over all ranks (DistributedSampler would repeat samples to even out the shards)."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.indices = list(range(rank, num_samples, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def multi_scale_size(base_wh: Sequence[int], factor: float, divisor: int) -> tuple[int, int]:
    """base size x factor, each side rounded to a positive multiple of ``divisor`` (the largest stride)."""
    return tuple(max(divisor, round(v * factor / divisor) * divisor) for v in base_wh)  # type: ignore[return-value]


class MultiScaleBatchSampler(Sampler[list]):
    """Batches of ``(index, (w, h))``: one random input size per batch, factor ~ U(scale_range).

    The size of batch j in epoch e depends only on (seed, e, j), so all ranks use the same sizes.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, drop_last: bool, base_wh: Sequence[int],
                 scale_range: Sequence[float], divisor: int, seed: int):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.base_wh, self.scale_range, self.divisor, self.seed = tuple(base_wh), tuple(scale_range), divisor, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield self._sized(batch, rng)
                batch = []
        if batch and not self.drop_last:
            yield self._sized(batch, rng)

    def _sized(self, batch: list[int], rng: np.random.Generator) -> list:
        size = multi_scale_size(self.base_wh, float(rng.uniform(*self.scale_range)), self.divisor)
        return [(i, size) for i in batch]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class DetectionLoader(DataLoader):
    """A DataLoader with ``set_epoch`` that works with a plain or a multi-scale batch sampler."""

    def set_epoch(self, epoch: int) -> None:
        target = self.batch_sampler if isinstance(self.batch_sampler, MultiScaleBatchSampler) else self.sampler
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)


def _worker_init(worker_id: int) -> None:
    """Each worker gets its own seeds (torch gives base_seed + worker_id), including albumentations'."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "reseed"):
        info.dataset.reseed(seed)


def build_loader(cfg: Any, split: str, train: bool, distributed: bool) -> DetectionLoader:
    """Loader over ``<data.prepared_dir>/<split>.json``.

    train: shuffled DistributedSampler (also with one process, for a per-epoch seeded order),
    batch ``data.batch_size``, drop_last, optional multi-scale. Eval: ShardSampler, batch
    ``data.eval_batch_size``, nothing dropped or repeated.
    """
    d = cfg.data
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    seed = int(cfg.train.seed)
    dataset = DetectionDataset(prepared_json(cfg, split), cfg, train=train, seed=seed + 1000 * rank)
    workers = int(d.num_workers)
    common: dict[str, Any] = {
        "num_workers": workers, "collate_fn": collate, "worker_init_fn": _worker_init,
        "generator": torch.Generator().manual_seed(seed + 1000 * rank),
        # training workers are started afresh every epoch, seeded from the loader generator that start_epoch
        # reseeds with (train.seed, epoch, rank): the augmentation draws of an epoch then do not depend on what
        # ran before, so a resume repeats them exactly (persistent workers would carry their random streams over
        # from earlier epochs). Costs one worker start per epoch (~0.2 s on a 2-core CPU).
        "persistent_workers": workers > 0 and not train,
        "pin_memory": torch.cuda.is_available() and str(cfg.train.device) != "cpu",
    }
    if not train:
        return DetectionLoader(dataset, batch_size=int(d.eval_batch_size), shuffle=False,
                               sampler=ShardSampler(len(dataset), world, rank), drop_last=False, **common)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    batch_size = int(d.batch_size)
    drop_last = len(sampler) >= batch_size
    if not drop_last:
        log.warning("split '%s' gives %d images per rank, fewer than data.batch_size=%d: using one partial batch "
                    "per epoch (lower data.batch_size for full batches)", split, len(sampler), batch_size)
    if d.augment.multi_scale:
        divisor = max(int(s) for s in cfg.model.head.strides)
        batches = MultiScaleBatchSampler(sampler, batch_size, drop_last, d.input_size, list(d.augment.multi_scale),
                                         divisor, seed)
        return DetectionLoader(dataset, batch_sampler=batches, **common)
    return DetectionLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **common)


def bench_data(cfg: Any, num_batches: int = 20, split: str = "train") -> dict:
    """Throughput of the training input pipeline: images/s overall and per worker, plus the per-image
    cost of reading and of augmenting (measured in this process). Prints one line."""
    loader = build_loader(cfg, split, train=True, distributed=False)
    stage = _stage_times(loader.dataset, n=min(32, len(loader.dataset)))
    it = iter(loader)
    next(it)  # warm-up: worker start-up is not throughput
    n_img, t0 = 0, time.perf_counter()
    for _ in range(num_batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n_img += batch["images"].shape[0]
    seconds = time.perf_counter() - t0
    workers = int(cfg.data.num_workers)
    result = {"images_per_s": n_img / seconds, "images_per_s_per_worker": n_img / seconds / max(1, workers),
              "num_workers": workers, "batch_size": int(cfg.data.batch_size), "input_size": list(cfg.data.input_size),
              "num_images": n_img, "seconds": seconds, **stage}
    print(f"data: {result['images_per_s']:.0f} images/s with {workers} worker(s) "
          f"({result['images_per_s_per_worker']:.0f}/worker; read {stage['read_ms']:.2f} ms + augment "
          f"{stage['augment_ms']:.2f} ms per image) at input {list(cfg.data.input_size)}")
    return result


def _stage_times(dataset: DetectionDataset, n: int) -> dict[str, float]:
    t_read = t_aug = 0.0
    for rec in dataset.records[:n]:
        t0 = time.perf_counter()
        img = read_image(rec.path)
        t1 = time.perf_counter()
        dataset.transform(img, rec.boxes, rec.labels)
        t_read, t_aug = t_read + t1 - t0, t_aug + time.perf_counter() - t1
    return {"read_ms": 1000 * t_read / max(1, n), "augment_ms": 1000 * t_aug / max(1, n)}


__all__ = [
    "DetectionLoader",
    "MultiScaleBatchSampler",
    "ShardSampler",
    "bench_data",
    "build_loader",
    "multi_scale_size",
]
