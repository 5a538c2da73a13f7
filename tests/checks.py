"""Assertions shared by several test folders (importable as ``checks``: pytest puts tests/ on sys.path
because tests/conftest.py lives there)."""
from __future__ import annotations

import torch


def assert_same_tensors(a, b, where: str = "") -> int:
    """torch.equal on every tensor of two nested structures (other leaves compared with ==); returns the
    number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {where}"
        return 1
    if isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        return sum(assert_same_tensors(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        return sum(assert_same_tensors(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0
