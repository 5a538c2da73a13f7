"""Fixtures of the evaluate / export / predict tests (helpers live in evalkit.py)."""
from __future__ import annotations

import pytest
from evalkit import save_tiny_checkpoint, tiny_cfg, write_split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cfg, checkpoint path, prepared dir, out dir) shared by a test module."""
    root = tmp_path_factory.mktemp("tiny")
    prepared = root / "prepared"
    write_split(prepared, "val", 5, seed=1)
    write_split(prepared, "train", 6, seed=2)
    out = root / "runs"
    ckpt = out / "best.pt"
    cfg = tiny_cfg(prepared, out, [f"eval.checkpoint={ckpt}", f"export.checkpoint={ckpt}"])
    save_tiny_checkpoint(ckpt, cfg)
    return cfg, ckpt, prepared, out
