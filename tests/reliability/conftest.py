"""Fixtures of the reliability suite (helpers in relkit.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from relkit import TOTAL_STEPS, tiny_overrides


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The built-in dataset prepared once (16 train / 8 val images, 64x64, 3 classes)."""
    import torch

    from pipeline.config import compose
    from pipeline.prepare import prepare

    torch.set_num_threads(1)
    data_dir = tmp_path_factory.mktemp("reliability_data") / "prepared"
    prepare(compose(tiny_overrides(data_dir, data_dir.parent / "unused")))
    return data_dir


@pytest.fixture(scope="session")
def reference_run(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted 12-step run every interrupted run must reproduce exactly (one thread, like the
    subprocesses: float reductions differ with the thread count)."""
    import torch

    from pipeline.config import compose
    from pipeline.train import train

    torch.set_num_threads(1)  # session fixtures run before the per-test autouse fixture that does the same

    out = tmp_path_factory.mktemp("reference") / "run"
    summary = train(compose(tiny_overrides(tiny_data, out)))
    assert summary["steps"] == TOTAL_STEPS and summary["stopped"] == "completed"
    return out


@pytest.fixture
def pipeline_log(caplog):
    """caplog that also sees the 'pipeline' loggers (they do not propagate to the root logger)."""
    import logging

    logger = logging.getLogger("pipeline")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
