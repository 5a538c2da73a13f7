"""Checkpoint files: atomic writes, safe loads, resume fallback rules, config compatibility."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from testkit import TINY_MODEL

from pipeline.config import compose, to_dict
from pipeline.errors import UserError
from pipeline.model.checkpoint import (
    CheckpointError,
    check_model_config,
    load_checkpoint,
    load_model_for_inference,
    load_weights_for_finetune,
    save_checkpoint,
)
from pipeline.train.resume import find_resume_checkpoint


class Payload:  # a pickled object: never loaded
    pass


def _state(step: int, cfg=None) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scheduler": {}, "epoch": 0,
            "step": step, "config": to_dict(cfg) if cfg is not None else {"model": {}}}


def _cfg(out_dir: Path, *extra: str):
    return compose([*TINY_MODEL, f"train.out_dir={out_dir}", *extra])


@pytest.fixture
def pipeline_log(caplog):
    logger = logging.getLogger("pipeline")  # does not propagate to the root logger caplog watches
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_checkpoint_error_is_a_user_error():
    assert issubclass(CheckpointError, UserError)  # the entry points catch UserError once


def test_atomic_save_keeps_previous_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(tmp_path / "last.pt.prev")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.prev"]


def test_crash_while_writing_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1))

    def dying_save(obj, fh):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(CheckpointError, match="disk full.*previous last.pt is intact"):
        save_checkpoint(path, _state(2))
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_last_falls_back_to_previous_with_a_message(tmp_path, pipeline_log, damage):
    cfg = _cfg(tmp_path)
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1, cfg))
    save_checkpoint(path, _state(2, cfg))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"{path}.*corrupt or truncated"):
        load_checkpoint(path)
    found_path, ckpt = find_resume_checkpoint(cfg)
    assert found_path == tmp_path / "last.pt.prev" and ckpt["step"] == 1
    assert any("previous checkpoint" in r.getMessage() and "last.pt" in r.getMessage() for r in pipeline_log.records)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    cfg = _cfg(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"junk")
    (tmp_path / "last.pt.prev").write_bytes(b"junk too")
    with pytest.raises(CheckpointError, match="no usable checkpoint.*train.resume=never"):
        find_resume_checkpoint(cfg)
    assert find_resume_checkpoint(_cfg(tmp_path, "train.resume=never")) is None
    assert find_resume_checkpoint(_cfg(tmp_path / "empty")) is None  # nothing there: a fresh run
    with pytest.raises(CheckpointError, match="does not exist"):
        find_resume_checkpoint(_cfg(tmp_path, f"train.resume={tmp_path / 'missing.pt'}"))


def test_last_missing_but_previous_present_is_used(tmp_path, pipeline_log):
    cfg = _cfg(tmp_path)
    save_checkpoint(tmp_path / "last.pt", _state(1, cfg))
    save_checkpoint(tmp_path / "last.pt", _state(2, cfg))
    os.remove(tmp_path / "last.pt")  # killed between the two renames of a save
    path, ckpt = find_resume_checkpoint(cfg)
    assert path.name == "last.pt.prev" and ckpt["step"] == 1
    assert any("missing" in r.getMessage() for r in pipeline_log.records)


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": Payload()}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*unsafe pickled payload"):
        load_checkpoint(path)


def test_incompatible_model_config_is_refused_naming_keys(tmp_path):
    old = _cfg(tmp_path)
    new = _cfg(tmp_path, "model.neck.out_channels=48", "model.num_classes=4")
    with pytest.raises(CheckpointError) as err:
        check_model_config(_state(1, old), new, tmp_path / "last.pt")
    msg = str(err.value)
    assert "model.neck.out_channels: 32 != 48" in msg and "model.num_classes: 3 != 4" in msg
    assert str(tmp_path / "last.pt") in msg
    check_model_config(_state(1, old), _cfg(tmp_path, "train.lr=0.5"), "x.pt")  # non-model keys may change


def test_load_model_for_inference_prefers_ema_and_drops_aux(tmp_path):
    from pipeline.model import build_model

    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, with_aux=True)
    ema = {k: (v + 1 if v.dtype.is_floating_point else v) for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "best.pt", {"model": model.state_dict(), "ema": ema, "config": to_dict(cfg)})
    loaded, loaded_cfg = load_model_for_inference(tmp_path / "best.pt", "cpu")
    assert not loaded.training and not loaded.with_aux
    assert loaded_cfg.model.neck.out_channels == 32
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, ema[key]), key
    raw, _ = load_model_for_inference(tmp_path / "best.pt", "cpu", prefer_ema=False)
    assert torch.equal(raw.state_dict()["head.gfl_cls.0.bias"], model.state_dict()["head.gfl_cls.0.bias"])


def test_init_from_skips_mismatched_shapes(tmp_path):
    from pipeline.model import build_model

    src_cfg = _cfg(tmp_path)
    src = build_model(src_cfg.model)
    save_checkpoint(tmp_path / "src.pt", {"model": src.state_dict(), "ema": None, "config": to_dict(src_cfg)})
    dst = build_model(_cfg(tmp_path, "model.num_classes=5").model)
    report = load_weights_for_finetune(dst, tmp_path / "src.pt")
    assert report["skipped"] and all("gfl_cls" in s for s in report["skipped"])
    assert torch.equal(dst.state_dict()["backbone.conv1.0.weight"], src.state_dict()["backbone.conv1.0.weight"])
