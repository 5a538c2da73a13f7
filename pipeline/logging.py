"""Rank-aware logging: rank 0 prints INFO; other ranks print only warnings and errors, tagged with
their rank, so a failure on any rank still surfaces."""
from __future__ import annotations

import logging
import os
import sys

_FMT = "%(asctime)s %(levelname)s [%(name)s]%(rank)s %(message)s"


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = os.environ.get("RANK")
        record.rank = f" [rank {rank}]" if rank not in (None, "0") else ""
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the ``pipeline`` logger once per process (idempotent)."""
    root = logging.getLogger("pipeline")
    rank = int(os.environ.get("RANK", "0"))
    root.setLevel(level if rank == 0 else logging.WARNING)
    if not any(getattr(h, "_pipeline", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FMT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        handler._pipeline = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False


def log_to_run_files() -> None:
    """Also write the ``pipeline`` logger's records to the file handlers on the root logger: Hydra puts the
    per-rank log file of the run dir there (``<job>_rank<R>.log``), and the ``pipeline`` logger does not
    propagate (its console format is its own), so without this those files stay empty."""
    ours, root = logging.getLogger("pipeline"), logging.getLogger()
    for handler in [h for h in ours.handlers if isinstance(h, logging.FileHandler) and h not in root.handlers]:
        ours.removeHandler(handler)  # an earlier run's file (several runs in one process: tests, sweeps)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and handler not in ours.handlers:
            ours.addHandler(handler)


def get_logger(name: str) -> logging.Logger:
    setup_logging()
    return logging.getLogger(name if name.startswith("pipeline") else f"pipeline.{name}")
