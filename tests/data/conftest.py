"""Helpers for the data tests: configs composed from the real conf/, tiny image files."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import compose


def _make_cfg(prepared: Path, *overrides: str):
    """The demo config (5 classes) with data.prepared_dir set and small, CPU-friendly sizes."""
    return compose([f"data.prepared_dir={prepared}", "data.num_workers=0", "data.batch_size=4",
                    "data.eval_batch_size=3", "data.input_size=[64,64]", *overrides])


def _write_image(path: Path, w: int, h: int, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), value, np.uint8)
    img[h // 4: h // 2, w // 4: w // 2] = 255 - value
    cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    """A prepared built-in dataset: 20 train + 8 val images of 96x96."""
    from pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(_make_cfg(out, "data.builtin.num_train=20", "data.builtin.num_val=8", "data.builtin.image_size=[96,96]"))
    return out


@pytest.fixture
def make_cfg():
    """make_cfg(prepared_dir, *overrides) -> validated Config (demo preset, 64x64 input, no workers)."""
    return _make_cfg


@pytest.fixture
def write_image():
    """write_image(path, w, h) -> path of a small JPEG/PNG with a bright square."""
    return _write_image
