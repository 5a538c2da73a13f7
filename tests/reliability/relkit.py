"""Helpers of the reliability suite (fixtures in conftest.py): the tiny training config, subprocess runners, comparisons.

Tiny run: built-in data (16 train / 8 val images of 64x64, 3 classes), ShuffleNetV2-0.5x with a 32-channel
neck/head and 64-channel aux head, strides [8, 16, 32], batch 4 (4 steps per epoch), CPU, no loader
workers, a checkpoint after every step (train.save_interval_steps=1) so that kills also land in saves.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from checks import assert_same_tensors

from pipeline.faults import ALL_ENV

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
STEP_LINE = re.compile(r"\] step (\d+) ")

TINY_MODEL = ["model=nanodet_plus_m_0.5x", "model.num_classes=3", "model.neck.out_channels=32",
              "model.head.feat_channels=32", "model.aux_head.feat_channels=64", "model.head.strides=[8,16,32]"]
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


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a pipeline subprocess: one thread, no W&B, no fault hooks unless given."""
    env = {k: v for k, v in os.environ.items() if k not in ALL_ENV and not k.startswith("NANODET_FAULT_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, stop_at_step: int | None = None,
            sig: int = signal.SIGKILL, delay_s: float = 0.0, stop_on: str | None = None,
            timeout: float = 240) -> tuple[int, str, int]:
    """Run ``python <args>`` and return (exit code, output, last training step logged).

    With ``stop_at_step`` (or ``stop_on``, a text to wait for) send ``sig`` ``delay_s`` seconds after that
    step's log line (or the text) appears, while the process goes on working."""
    proc = subprocess.Popen([PYTHON, *args], cwd=cwd, env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, seen, sent = [], 0, False
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STEP_LINE.search(line)
            if m:
                seen = int(m.group(1))
            due = (stop_at_step is not None and seen >= stop_at_step) or (stop_on is not None and stop_on in line)
            if due and not sent:
                if delay_s:
                    time.sleep(delay_s)
                proc.send_signal(sig)
                sent = True
            if time.monotonic() > deadline:
                break
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines), seen


def train_cli(overrides: list[str], cwd: Path, **kw) -> tuple[int, str, int]:
    return run_cli(["-m", "pipeline.train", *overrides, f"hydra.run.dir={cwd / 'hydra'}"], cwd, **kw)


def assert_same_final_state(reference: Path, run: Path) -> int:
    """The finished run in ``run`` holds exactly the reference's tensors and counters."""
    from pipeline.checkpoint import load_checkpoint

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
