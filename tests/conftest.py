"""Shared fixtures: the golden tensors of the official implementation, the shared real data, small configs.

The shared folders (../shared/golden: NANODET_GOLDEN_DIR, ../shared/data: NANODET_SHARED_DATA_DIR) follow one
rule, in sharedkit.require_folder: a test needing a missing one is skipped with the folder in the reason,
except under CI (CI=true), where it fails naming the folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from sharedkit import GOLDEN, GOLDEN_MAIN, SHARED_DATA, Folder, require_folder

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """../shared/golden (NANODET_GOLDEN_DIR): the .pt files made by the official implementation."""
    return require_folder(GOLDEN)


@pytest.fixture(scope="session")
def golden(golden_dir: Path) -> dict:
    """The main golden file (1.0x, 3 classes, 128x128)."""
    path = golden_dir / GOLDEN_MAIN
    if not path.is_file():
        pytest.fail(f"golden file {path} is missing ({golden_dir} holds "
                    f"{sorted(p.name for p in golden_dir.glob('*.pt'))})", pytrace=False)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data (NANODET_SHARED_DATA_DIR): real data sets for end-to-end tests."""
    return require_folder(SHARED_DATA)


@pytest.fixture(scope="session")
def raccoon_dir(shared_data_dir: Path) -> Path:
    """The raccoon data set (VOC XML in annotations/, JPEG in images/) inside the shared data folder."""
    root = shared_data_dir / "raccoon"
    require_folder(Folder(root / "annotations", "*.xml", "NANODET_SHARED_DATA_DIR", "raccoon annotations"))
    require_folder(Folder(root / "images", "*.jpg", "NANODET_SHARED_DATA_DIR", "raccoon images"))
    return root


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield
