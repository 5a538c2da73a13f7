"""``python -m pipeline.evaluate``: the evaluate stage - COCO metrics of a checkpoint (.pt, EMA weights) or an
ONNX model on the prepared validation split, plus PR curves, a confusion matrix and a predictions grid
(:func:`pipeline.infer.evaluate.evaluate_model`).

SIGTERM/SIGINT stop the run with exit code 128 + signal and a one-line message; a partial metrics.json is
never left behind (it is written last).
"""
from __future__ import annotations

import signal

from pipeline import dist
from pipeline.cli import hydra_entry
from pipeline.config import Config
from pipeline.infer.evaluate import evaluate_model
from pipeline.logging import get_logger

__all__ = ["EvaluationInterrupted", "evaluate_model", "main"]

log = get_logger("pipeline.evaluate")


class EvaluationInterrupted(Exception):
    """Raised from the SIGTERM/SIGINT handler of the entry point; ``exit_code`` = 128 + signal."""

    def __init__(self, signum: int):
        self.exit_code = 128 + signum
        super().__init__(f"evaluation stopped by {signal.Signals(signum).name} before it finished; no metrics.json "
                         "was written by this run (it is written last, so a metrics.json on disk is always "
                         "complete). Run the same command again")


def _interrupt(signum: int, _frame) -> None:
    raise EvaluationInterrupted(signum)


@hydra_entry("evaluate")
def main(cfg: Config) -> int:
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        evaluate_model(cfg)
    except EvaluationInterrupted as err:
        log.error("%s", err)
        return err.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        dist.cleanup()
    return 0


if __name__ == "__main__":
    main()
