"""Helpers shared by several test folders (importable as ``testkit``: pytest puts tests/ on sys.path
because tests/conftest.py lives there): the tiny model, pipeline subprocesses, tensor comparisons."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.faults import ALL_ENV

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STEP_LINE = re.compile(r"\] step (\d+) ")
TINY_MODEL = ["model=nanodet_plus_m_0.5x", "model.num_classes=3", "model.neck.out_channels=32",
              "model.head.feat_channels=32", "model.aux_head.feat_channels=64", "model.head.strides=[8,16,32]"]


def assert_same_tensors(a, b, where: str = "") -> int:
    """torch.equal on every tensor of two nested structures (other leaves compared with ==); returns the
    number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {where}"
        return 1
    if isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        return sum(assert_same_tensors(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        return sum(assert_same_tensors(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


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
