"""W&B mode resolution and fallback, and the DVC metric/plot files."""
from __future__ import annotations

import json

import pytest

from pipeline.config import compose
from pipeline.train.tracking import (
    Tracker,
    WandbTracker,
    append_plot_row,
    build_tracker,
    has_api_key,
    resolve_mode,
    write_metrics_json,
)


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    return tmp_path


def test_auto_mode_is_offline_without_a_key_and_online_with_one(no_credentials, monkeypatch):
    assert not has_api_key() and resolve_mode("auto") == "offline"
    (no_credentials / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password dummy\n")
    assert has_api_key() and resolve_mode("auto") == "online"
    (no_credentials / ".netrc").write_text("machine example.org\n  login user\n  password dummy\n")
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"  # an explicit WANDB_MODE wins over auto
    assert resolve_mode("offline") == "offline"  # and an explicit tracking.mode over everything


def test_disabled_and_other_ranks_get_the_noop_tracker(tmp_path):
    cfg = compose([f"tracking.dir={tmp_path}", "tracking.mode=offline"])
    assert type(build_tracker(cfg, rank=1)) is Tracker
    assert type(build_tracker(compose(["tracking.mode=disabled"]))) is Tracker


@pytest.mark.slow
def test_online_without_a_server_falls_back_to_offline(no_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)  # syntactically valid, never sent anywhere real
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = compose(["tracking.mode=online", f"tracking.dir={no_credentials / 'wb'}", "tracking.init_timeout_s=3"])
    tracker = build_tracker(cfg)
    try:
        assert isinstance(tracker, WandbTracker) and tracker.mode == "offline"
        tracker.log({"train/loss": 1.0}, step=0)
    finally:
        tracker.finish()
    assert list((no_credentials / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_plot_rows_of_redone_epochs_are_replaced(tmp_path):
    path = tmp_path / "plots" / "val_map.csv"
    for epoch, value in [(0, 0.1), (1, 0.2), (2, 0.3)]:
        append_plot_row(path, {"epoch": epoch, "mAP": value})
    append_plot_row(path, {"epoch": 1, "mAP": 0.25, "AP50": 0.5})  # a resumed run redoes epoch 1
    assert path.read_text().splitlines() == ["epoch,mAP,AP50", "0,0.1,", "1,0.25,0.5"]


def test_metrics_json_has_no_nan(tmp_path):
    write_metrics_json(tmp_path / "metrics.json", {"best": {"mAP": float("nan"), "AP50": 0.5}, "steps": 3})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"best": {"mAP": None, "AP50": 0.5}, "steps": 3}
