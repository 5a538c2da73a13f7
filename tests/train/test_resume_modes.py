"""What the README promises about resume beyond the float32 / NCHW / in-process-data case of test_train.py:
bf16 autocast and channels_last (exact: the resumed run's last.pt holds the uninterrupted run's tensors), and
data.num_workers > 0 (the data order and the augmentation draws of every step are repeated)."""
from __future__ import annotations

import signal

import pytest
import torch
from testkit import assert_same_tensors, read_csv_rows, train_cli

from pipeline.config import compose
from pipeline.faults import KILL_STEP_ENV
from pipeline.model.checkpoint import load_checkpoint
from pipeline.train import train

# 3 epochs x 4 steps; a step checkpoint every 3 steps. Killed at the end of step 7 (epoch 1, before that step's
# checkpoint): the resume starts from the step-6 checkpoint, 2 batches into epoch 1 (a mid-epoch resume).
EXTRA = ("train.epochs=3", "train.val_interval=1", "train.save_interval_steps=3")
KILL_STEP, RESUMED_FROM = 7, 6


def _assert_same_run(reference, resumed) -> None:
    a, b = load_checkpoint(reference / "last.pt"), load_checkpoint(resumed / "last.pt")
    compared = sum(assert_same_tensors(a[k], b[k], k) for k in ("model", "ema", "optimizer", "scaler"))
    assert compared > 3 * len(a["model"])
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"] == 12 and a["best_map"] == b["best_map"]
    for plot in ("train_loss.csv", "val_map.csv"):
        assert read_csv_rows(resumed / "plots" / plot) == read_csv_rows(reference / "plots" / plot), plot


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["train.amp=bf16"], ["train.channels_last=true"]], ids=["bf16", "channels_last"])
def test_sigkill_mid_epoch_then_resume_is_exact_with(mode, tiny, tiny_data, tmp_path):
    """README: train.resume=auto "on CPU ... equals an uninterrupted run, weight for weight" - also under bf16
    autocast and with channels_last (the performance settings)."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(compose(tiny.overrides(tiny_data, reference, *EXTRA, *mode)))

    code, output, _ = train_cli(tiny.overrides(tiny_data, resumed, *EXTRA, *mode), tmp_path, timeout=300,
                                env=tiny.env(**{KILL_STEP_ENV: str(KILL_STEP)}))
    assert code == -signal.SIGKILL, f"run was not killed (exit {code}):\n{output[-3000:]}"
    assert load_checkpoint(resumed / "last.pt")["step"] == RESUMED_FROM
    summary = train(compose(tiny.overrides(tiny_data, resumed, *EXTRA, *mode)))
    assert summary["steps"] == 12
    _assert_same_run(reference, resumed)


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_with_loader_workers_repeats_data_order_and_augmentation(tiny, tiny_data, tmp_path, monkeypatch):
    """data.num_workers=2 (augmentation in worker processes): every step after a mid-epoch resume sees the same
    images (ids) with the same augmentation (pixels) as the uninterrupted run, and the weights end identical.
    The crash is an exception at the end of step 7 (in-process, so that the batches can be recorded)."""
    from pipeline import faults
    from pipeline.train import step as train_step

    seen: dict[int, tuple[list[int], torch.Tensor]] = {}
    step = {"n": 0}
    to_device = train_step.to_device

    def recording(batch, device, channels_last=False):
        seen[step["n"]] = ([int(m["image_id"]) for m in batch["meta"]], batch["images"].clone())
        step["n"] += 1
        return to_device(batch, device, channels_last)

    monkeypatch.setattr(train_step, "to_device", recording)
    workers = ("data.num_workers=2",)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(compose(tiny.overrides(tiny_data, reference, *EXTRA, *workers)))
    ref_seen = dict(seen)
    assert sorted(ref_seen) == list(range(12))

    def crash(done: int, rank: int) -> None:
        if done == KILL_STEP:
            raise _Interrupt
    seen.clear()
    step["n"] = 0
    monkeypatch.setattr(faults, "step_end", crash)
    with pytest.raises(_Interrupt):
        train(compose(tiny.overrides(tiny_data, resumed, *EXTRA, *workers)))
    assert load_checkpoint(resumed / "last.pt")["step"] == RESUMED_FROM
    monkeypatch.setattr(faults, "step_end", lambda done, rank: None)
    seen.clear()
    step["n"] = RESUMED_FROM
    train(compose(tiny.overrides(tiny_data, resumed, *EXTRA, *workers)))
    assert sorted(seen) == list(range(RESUMED_FROM, 12))
    for s in range(RESUMED_FROM, 12):
        assert seen[s][0] == ref_seen[s][0], f"step {s}: images {seen[s][0]} vs {ref_seen[s][0]} uninterrupted"
    differ = [s for s in range(RESUMED_FROM, 12) if not torch.equal(seen[s][1], ref_seen[s][1])]
    assert not differ, f"steps {differ}: same images, other augmentation than the uninterrupted run"
    _assert_same_run(reference, resumed)
