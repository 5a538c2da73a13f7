"""``python -m pipeline.prepare``: the prepare stage (read or generate, validate, split, write
``<data.prepared_dir>/``); the work is :func:`pipeline.data.prepare.prepare`."""
from __future__ import annotations

from pipeline.cli import hydra_entry
from pipeline.config import Config
from pipeline.data.prepare import prepare

__all__ = ["main", "prepare"]


@hydra_entry("prepare")
def main(cfg: Config) -> int:
    prepare(cfg)
    return 0


if __name__ == "__main__":
    main()
