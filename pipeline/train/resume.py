"""Resume: which checkpoint a training run continues from (``train.resume``), and what to do when the
config changed since (``train.on_config_change``)."""
from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline import dist as pdist
from pipeline.config import Config, diff_keys, to_dict
from pipeline.logging import get_logger
from pipeline.model.checkpoint import PREV_SUFFIX, CheckpointError, check_model_config, load_checkpoint

log = get_logger(__name__)


def _require_keys(ckpt: dict, path: Path, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is not a training checkpoint")


RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "config")


def find_resume_checkpoint(cfg: Config) -> tuple[Path, dict] | None:
    """Pick the checkpoint that ``train.resume`` asks for and load it, or None to start fresh.

    ``never``: None. ``auto``: ``<out_dir>/last.pt`` when present; if it is unreadable the previous
    one (``last.pt.prev``) is used and a warning says so; if neither is usable a CheckpointError is
    raised (a broken run is never restarted silently). Any other value is a path that must load.
    """
    mode = str(cfg.train.resume)
    if mode == "never":
        return None
    if mode != "auto":
        path = Path(mode)
        ckpt = load_checkpoint(path)
        _require_keys(ckpt, path, RESUME_KEYS)
        return path, ckpt
    last = Path(cfg.train.out_dir) / "last.pt"
    prev = last.with_name(last.name + PREV_SUFFIX)
    if not last.exists() and not prev.exists():
        return None
    errors = []
    for path in (last, prev):
        if not path.exists():
            errors.append(f"{path} is missing")
            continue
        try:
            ckpt = load_checkpoint(path)
            _require_keys(ckpt, path, RESUME_KEYS)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if errors:
            log.warning("resume: %s; resuming from the previous checkpoint %s (step %s) instead",
                        "; ".join(errors), path, ckpt.get("step"))
        return path, ckpt
    raise CheckpointError(f"train.resume=auto found no usable checkpoint in {last.parent}: "
                          f"{'; '.join(errors)}. Delete the broken files or set train.resume=never "
                          "to start over")


# Keys that may change between a run and its resume without making it another run.
RESUME_BENIGN_KEYS = ("train.resume", "train.on_config_change", "train.nproc", "train.log_interval",
                      "train.dist_timeout_s", "train.device", "data.num_workers", "data.eval_batch_size")


def run_config_changes(stored: dict, cfg: Config) -> list[str]:
    """Differences between a checkpoint's config and ``cfg`` in what defines the run (model, data, train)."""
    now = to_dict(cfg)
    changes = []
    for section in ("model", "data", "train"):
        for line in diff_keys(stored.get(section, {}), now[section], f"{section}."):
            if not line.split(":", 1)[0] in RESUME_BENIGN_KEYS:
                changes.append(line)
    return changes


def archive_run(out_dir: Path) -> Path:
    """Move a previous run's checkpoints, metrics and plots to <out_dir>/previous/<time>/ (nothing is lost)."""
    dest = out_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("last.pt", "last.pt.prev", "best.pt", "metrics.json", "details.json", "config.yaml", "plots"):
        if (out_dir / name).exists():
            os.replace(out_dir / name, dest / name)
    return dest


def resume_checkpoint(cfg: Config) -> tuple[Path, dict] | None:
    """Rank 0 picks the checkpoint (with its fallback rules); every rank then loads the same file.

    With train.on_config_change=restart, a last.pt made with another model/data/train config is moved
    aside (see :func:`archive_run`) and training starts fresh."""
    choice: tuple[str, str] | None = None
    if pdist.is_main():
        try:
            found = find_resume_checkpoint(cfg)
            choice = ("ok", str(found[0])) if found else None
            if found and cfg.train.on_config_change == "restart":
                changes = run_config_changes(found[1].get("config", {}), cfg)
                if changes:
                    dest = archive_run(Path(cfg.train.out_dir))
                    log.warning("train.on_config_change=restart: the config changed (%s); previous run moved "
                                "to %s, starting fresh", "; ".join(changes[:5]), dest)
                    choice = None
        except CheckpointError as err:
            choice = ("error", str(err))
    choice = pdist.broadcast_object(choice)
    if choice is None:
        return None
    if choice[0] == "error":
        raise CheckpointError(choice[1])
    path = Path(choice[1])
    ckpt = load_checkpoint(path)
    check_model_config(ckpt, cfg, path)
    return path, ckpt
