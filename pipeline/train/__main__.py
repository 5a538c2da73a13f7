"""``python -m pipeline.train [overrides]`` (or ``torchrun --nproc_per_node=N -m pipeline.train ...``): the
train stage's entry point; the work is :func:`pipeline.train.trainer.train`.

Exit codes: 0 done; 2 user error (config, data, checkpoint, divergence); 128 + signal when stopped by
SIGTERM (143) or SIGINT (130) after saving ``last.pt``; 1 when another torchrun rank failed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline import dist as pdist
from pipeline.cli import hydra_entry
from pipeline.config import Config
from pipeline.logging import get_logger
from pipeline.train.trainer import TrainingInterrupted, train

log = get_logger("pipeline.train")

PEER_FAILURE_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting", "gloo", "NCCL")


def _lost_peer(err: BaseException) -> bool:
    """A collective failed because another torchrun rank died or hangs (gloo/NCCL error text)."""
    if not pdist.launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    return isinstance(err, torch.distributed.DistError) or any(m in str(err) for m in PEER_FAILURE_MARKERS)


@hydra_entry("train")
def run(cfg: Config) -> int | None:
    try:
        train(cfg)
    except TrainingInterrupted as err:
        log.error("%s", err)
        return err.exit_code
    except RuntimeError as err:
        if not _lost_peer(err):
            raise
        detail = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        log.error("rank %s: a collective operation with the other ranks failed (%s). Another rank died or stopped "
                  "responding (torchrun's report names it; train.dist_timeout_s=%d bounds the wait). %s keeps the "
                  "last saved step: run the same command again, or launch with torchrun --max-restarts=N, to "
                  "resume from it", os.environ.get("RANK", "?"), detail, cfg.train.dist_timeout_s,
                  Path(cfg.train.out_dir) / "last.pt")
        return 1
    return None


if __name__ == "__main__":
    run()
