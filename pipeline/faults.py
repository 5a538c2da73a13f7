"""Test-only fault injection for the reliability suite (tests/reliability/), driven by environment variables.

Nothing here runs unless one of these variables is set; never set them outside tests.

``NANODET_FAULT_CKPT="<phase>:<n>"``
    SIGKILL this process inside its n-th ``save_checkpoint`` call (1-based, counted per process) at
    ``phase``: ``partial`` (the temporary file holds only the first half of the serialized bytes: a torn
    write), ``written`` (temporary file complete and fsynced, nothing renamed yet), ``swapped`` (the old
    file already moved to ``<name>.prev``, the new one not yet in place) or ``renamed`` (new file in place,
    folder not yet fsynced).
``NANODET_FAULT_KILL_STEP="<k>"``
    at the end of global training step k (after the optimizer update, before that step's checkpoint)
    SIGKILL the process - or, with ``NANODET_FAULT_HANG=1``, make it sleep forever (a stuck rank; it dies
    on SIGTERM).
``NANODET_FAULT_KILL_RANK="<r>"``
    restrict the step fault to this torchrun rank (default: every rank).
``NANODET_FAULT_NAN_STEPS="<k1>,<k2>"`` (with ``NANODET_FAULT_RANK="<r>"``)
    the loss of these global training steps becomes NaN (on rank r only, when given): the non-finite
    step skipping and divergence stop.
``NANODET_FAULT_ONCE="<path>"``
    the step fault fires only when ``<path>`` does not exist yet, and creates it just before firing,
    so that the restarted job (``torchrun --max-restarts``) runs clean.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CKPT_ENV = "NANODET_FAULT_CKPT"
KILL_STEP_ENV = "NANODET_FAULT_KILL_STEP"
KILL_RANK_ENV = "NANODET_FAULT_KILL_RANK"
HANG_ENV = "NANODET_FAULT_HANG"
ONCE_ENV = "NANODET_FAULT_ONCE"
ALL_ENV = (CKPT_ENV, KILL_STEP_ENV, KILL_RANK_ENV, HANG_ENV, ONCE_ENV)
CKPT_PHASES = ("partial", "written", "swapped", "renamed")

_saves = 0  # save_checkpoint calls in this process


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # SIGKILL is delivered asynchronously; never return into the caller


def next_save() -> int:
    """Called once per ``save_checkpoint``; returns its 1-based index in this process."""
    global _saves
    _saves += 1
    return _saves


def checkpoint_point(phase: str, index: int, tmp: Path) -> None:
    """Fire ``NANODET_FAULT_CKPT`` when it names this phase and save index."""
    spec = os.environ.get(CKPT_ENV)
    if not spec:
        return
    want_phase, _, want_index = spec.partition(":")
    if want_phase not in CKPT_PHASES:
        raise ValueError(f"{CKPT_ENV}={spec!r}: phase must be one of {CKPT_PHASES}")
    if want_phase != phase or int(want_index or 1) != index:
        return
    if phase == "partial":  # keep the first half of the bytes: what a crash in the middle of write() leaves
        os.truncate(tmp, os.path.getsize(tmp) // 2)
    _die()


def step_end(step: int, rank: int) -> None:
    """Fire ``NANODET_FAULT_KILL_STEP`` (kill or hang) at the end of global step ``step`` on ``rank``."""
    want = os.environ.get(KILL_STEP_ENV)
    if not want or int(want) != step:
        return
    want_rank = os.environ.get(KILL_RANK_ENV)
    if want_rank is not None and int(want_rank) != rank:
        return
    marker = os.environ.get(ONCE_ENV)
    if marker:
        if Path(marker).exists():
            return
        Path(marker).write_text(f"step {step} rank {rank} pid {os.getpid()}\n")
    if os.environ.get(HANG_ENV) == "1":
        # a stuck rank: the others must give up after train.dist_timeout_s. It dies on torchrun's SIGTERM
        # (default action) so that a test does not also wait out torchrun's fixed 30 s before SIGKILL
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(3600)
    _die()


NAN_STEPS_ENV = "NANODET_FAULT_NAN_STEPS"  # comma-separated global steps whose loss becomes NaN
NAN_RANK_ENV = "NANODET_FAULT_RANK"  # ... only on this rank (default: every rank)


def nan_steps(rank: int) -> set[int]:
    """``NANODET_FAULT_NAN_STEPS``: the global training steps whose loss this rank turns into NaN."""
    raw = os.environ.get(NAN_STEPS_ENV, "").strip()
    want_rank = os.environ.get(NAN_RANK_ENV)
    if not raw or (want_rank is not None and int(want_rank) != rank):
        return set()
    return {int(s) for s in raw.split(",") if s.strip()}
