"""Helpers of the reliability suite (fixtures in conftest.py): the tiny training config, subprocess runners, comparisons.

Tiny run: built-in data (16 train / 8 val images of 64x64, 3 classes), ShuffleNetV2-0.5x with a 32-channel
neck/head and 64-channel aux head, strides [8, 16, 32], batch 4 (4 steps per epoch), CPU, no loader
workers, a checkpoint after every step (train.save_interval_steps=1) so that kills also land in saves.
"""
from __future__ import annotations

import socket
from pathlib import Path

from testkit import TINY_MODEL, assert_same_tensors

EPOCHS = 3
STEPS_PER_EPOCH = 4
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


def tiny_overrides(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """A 12-step CPU run (3 epochs x 4 steps) with a checkpoint every step and validation every epoch."""
    return [*TINY_MODEL, "data.input_size=[64,64]", "data.builtin.num_train=16", "data.builtin.num_val=8",
            "data.builtin.image_size=[64,64]", "data.builtin.max_objects=3", "data.batch_size=4",
            "data.eval_batch_size=8", "data.num_workers=0", f"data.prepared_dir={data_dir}",
            f"train.out_dir={out_dir}", f"train.epochs={EPOCHS}", "train.val_interval=1", "train.warmup_steps=5",
            "train.log_interval=1", "train.save_interval_steps=1", "train.device=cpu", "tracking.mode=disabled",
            f"eval.out_dir={out_dir / 'evaluate'}", *extra]


def assert_same_final_state(reference: Path, run: Path) -> int:
    """The finished run in ``run`` holds exactly the reference's tensors and counters."""
    from pipeline.model.checkpoint import load_checkpoint

    a, b = load_checkpoint(reference / "last.pt"), load_checkpoint(run / "last.pt")
    compared = sum(assert_same_tensors(a[k], b[k], k) for k in ("model", "ema", "optimizer", "scaler"))
    assert compared > 3 * len(a["model"])
    assert a["scheduler"] == b["scheduler"]
    assert (a["epoch"], a["step"], a["epoch_step"]) == (b["epoch"], b["step"], b["epoch_step"]) == (EPOCHS, TOTAL_STEPS, 0)
    assert a["best_map"] == b["best_map"]
    assert_same_tensors(load_checkpoint(reference / "best.pt")["ema"], load_checkpoint(run / "best.pt")["ema"], "best")
    for plot in ("val_map.csv", "train_loss.csv"):  # no duplicated or missing epochs, same epoch means
        assert (run / "plots" / plot).read_text() == (reference / "plots" / plot).read_text(), plot
    return compared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
