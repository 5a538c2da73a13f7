"""The shared folders beside this repository (../shared/golden, ../shared/data) and the one rule for a missing
one: outside CI the test is skipped with the folder in the reason; under CI (``CI=true``, ``1`` or ``yes``)
it fails, naming the folder and the variable that points to it - parity tests never pass by skipping.

Importable as ``sharedkit`` (tests/ is on sys.path; conftest.py modules are not reliably importable). The
fixtures built on it are in tests/conftest.py: ``golden_dir``, ``golden``, ``shared_data_dir``, ``raccoon_dir``.
To parametrise over the golden files at collection time use ``golden_params()``: under CI a missing folder
then fails the collection instead of yielding zero tests.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


class Folder(NamedTuple):
    path: Path
    pattern: str  # what it must hold (a glob)
    env_var: str  # the variable that points to it
    what: str


GOLDEN = Folder(Path(os.environ.get("NANODET_GOLDEN_DIR", SHARED / "golden")), "*.pt", "NANODET_GOLDEN_DIR",
                "golden files of the official implementation")
SHARED_DATA = Folder(Path(os.environ.get("NANODET_SHARED_DATA_DIR", SHARED / "data")), "*",
                     "NANODET_SHARED_DATA_DIR", "shared real data sets")
GOLDEN_DIR, SHARED_DATA_DIR = GOLDEN.path, SHARED_DATA.path
GOLDEN_MAIN = "m_1.0x_c3_h128_w128.pt"  # 1.0x, 3 classes, 128x128


def in_ci() -> bool:
    """True when the CI variable says so (``true``, ``1`` or ``yes``, any case)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing_reason(folder: Folder) -> str | None:
    """Why ``folder`` cannot be used (absent, or holding nothing that matches its pattern); None if usable."""
    if not folder.path.is_dir():
        state = "does not exist"
    elif not any(folder.path.glob(folder.pattern)):
        state = f"holds no {folder.pattern} file"
    else:
        return None
    return f"{folder.what} not found: folder {folder.path} {state} (set {folder.env_var} to the folder holding them)"


def require_folder(folder: Folder) -> Path:
    """``folder.path`` when usable; otherwise skip the calling test with the reason, or fail it under CI.
    Outside a test (at collection time) the failure is a collection error."""
    reason = missing_reason(folder)
    if reason is None:
        return folder.path
    if in_ci():
        pytest.fail(f"CI={os.environ['CI']}: {reason}. Under CI a missing shared folder is a failure, not a skip.",
                    pytrace=False)
    pytest.skip(reason)


def golden_params() -> list:
    """One ``pytest.param(path, id=name)`` per golden file, for ``@pytest.mark.parametrize`` at collection
    time. A missing folder gives one skipped placeholder whose reason names the folder (outside CI) or fails
    the collection of the module (under CI)."""
    reason = missing_reason(GOLDEN)
    if reason is None:
        return [pytest.param(f, id=f.name) for f in sorted(GOLDEN.path.glob(GOLDEN.pattern))]
    if in_ci():
        require_folder(GOLDEN)  # raises pytest's Failed: a collection error naming the folder
    return [pytest.param(None, id="golden-missing", marks=pytest.mark.skip(reason=reason))]
