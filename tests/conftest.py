"""Shared fixtures: the golden tensors of the official implementation and small configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("NANODET_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def golden_files() -> list[Path]:
    return sorted(GOLDEN_DIR.glob("*.pt")) if GOLDEN_DIR.is_dir() else []


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not golden_files():
        pytest.skip(f"golden fixtures not found in {GOLDEN_DIR} (set NANODET_GOLDEN_DIR to the folder "
                    "holding the official-implementation .pt files)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden(golden_dir: Path) -> dict:
    """The main golden file (1.0x, 3 classes, 128x128)."""
    return torch.load(golden_dir / "m_1.0x_c3_h128_w128.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(1)
    yield
