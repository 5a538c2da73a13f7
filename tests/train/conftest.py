"""Tiny configs and data shared by the training-stage tests (64x64 images, 0.5x model, small widths)."""
from __future__ import annotations

from pathlib import Path

import pytest
from testkit import PYTHON, REPO, TINY_MODEL, subprocess_env


def tiny_overrides(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """Overrides for a 4-steps-per-epoch CPU run on the prepared tiny builtin data."""
    return [*TINY_MODEL, "data.input_size=[64,64]", "data.builtin.num_train=16", "data.builtin.num_val=8",
            "data.builtin.image_size=[64,64]", "data.builtin.max_objects=3", "data.batch_size=4",
            "data.eval_batch_size=8", "data.num_workers=0", f"data.prepared_dir={data_dir}",
            f"train.out_dir={out_dir}", "train.epochs=2", "train.val_interval=1", "train.warmup_steps=5",
            "train.log_interval=1", "train.device=cpu", "tracking.mode=disabled", *extra]


@pytest.fixture(scope="session")
def tiny():
    """Helpers for the tests: ``tiny.model`` overrides, ``tiny.overrides(data, out, *extra)``,
    ``tiny.env()`` for subprocesses, ``tiny.python``."""
    class Tiny:
        model = TINY_MODEL
        overrides = staticmethod(tiny_overrides)
        env = staticmethod(subprocess_env)
        python = PYTHON
        repo = REPO
    return Tiny


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The built-in dataset prepared once: 16 train / 8 val images of 64x64, 3 classes."""
    from pipeline.config import compose
    from pipeline.prepare import prepare

    data_dir = tmp_path_factory.mktemp("tiny_data") / "prepared"
    prepare(compose(tiny_overrides(data_dir, data_dir.parent / "unused")))
    return data_dir

