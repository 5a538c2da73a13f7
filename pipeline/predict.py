"""``python -m pipeline.predict predict.source=PATH [predict.checkpoint=model.pt|model.onnx]``: detections
on an image, a folder of images or a video (:func:`pipeline.infer.predict.run_predict`).

``source=...`` and ``checkpoint=...`` are accepted as shorthands for ``predict.source`` / ``predict.checkpoint``.
Exit code 1 when some file could not be read (each is named).
"""
from __future__ import annotations

import sys

from pipeline.cli import hydra_entry
from pipeline.config import Config
from pipeline.infer.predict import run_predict
from pipeline.logging import get_logger

__all__ = ["expand_shorthands", "main", "run_predict"]

log = get_logger("pipeline.predict")


@hydra_entry("predict")
def main(cfg: Config) -> int:
    summary = run_predict(cfg)
    if summary["failed"]:
        log.error("%d file(s) could not be read: %s", len(summary["failed"]), ", ".join(summary["failed"]))
        return 1
    return 0


def expand_shorthands(argv: list[str]) -> list[str]:
    """``source=X`` / ``checkpoint=X`` -> ``predict.source=X`` / ``predict.checkpoint=X``."""
    return [f"predict.{a}" if a.split("=", 1)[0] in ("source", "checkpoint") else a for a in argv]


if __name__ == "__main__":
    sys.argv[1:] = expand_shorthands(sys.argv[1:])
    main()
