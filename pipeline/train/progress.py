"""Progress of an epoch: tqdm on rank 0 when stderr is a terminal, else a log line every
``train.log_interval`` steps (the loop calls :meth:`Progress.log` at those steps, :meth:`Progress.tick`
at the others)."""
from __future__ import annotations

import math
import sys
import time

from pipeline import dist as pdist
from pipeline.config import TrainConfig
from pipeline.logging import get_logger

log = get_logger("pipeline.train.loop")


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, train_cfg: TrainConfig, epoch: int, total: int, done: int, step: int):
        self.train_cfg, self.epoch, self.total, self.done = train_cfg, epoch, total, done
        self.start_done, self.start_step = done, step
        self.t0 = time.perf_counter()
        self.bar = None
        if pdist.is_main() and sys.stderr.isatty():
            from tqdm import tqdm  # only for a terminal

            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)

    def its(self) -> float:
        return (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)

    def images_per_s(self, batch_size: int) -> float:
        return self.its() * batch_size * pdist.get_world_size()

    def tick(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def log(self, losses: dict[str, float], lr: float, step: int) -> None:
        self.tick()
        if not pdist.is_main():
            return
        its = self.its()
        left = (self.total - self.done) + (self.train_cfg.epochs - self.epoch - 1) * self.total
        if self.train_cfg.max_steps:
            left = min(left, self.train_cfg.max_steps - step)
        terms = " ".join(f"{k.replace('loss_', '')}={v:.4f}" for k, v in losses.items() if k != "loss")
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={losses.get('loss', math.nan):.4f} lr={lr:.2e}")
            return
        log.info("epoch %d [%d/%d] step %d  %.2f it/s  loss %.4f (%s)  lr %.3e  eta %s", self.epoch,
                 self.done, self.total, step, its, losses.get("loss", math.nan), terms, lr,
                 hms(left / max(its, 1e-9)))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
