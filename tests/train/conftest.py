"""Tiny configs and data shared by the training-stage tests (64x64 images, 0.5x model, small widths)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = ["model=nanodet_plus_m_0.5x", "model.num_classes=3", "model.neck.out_channels=32",
              "model.head.feat_channels=32", "model.aux_head.feat_channels=64", "model.head.strides=[8,16,32]"]


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
        python = sys.executable
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


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("NANODET_FAULT_NAN_STEPS", None)
    env.pop("NANODET_FAULT_RANK", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env

