"""Unwritable or full output folders: a clear error naming the path (exit code 2 at the CLI, no traceback)
and the previous checkpoint intact. Tests run as root, for whom chmod does not block writes, so an
unwritable folder is a path under a regular file (ENOTDIR) and a full disk is torch.save raising ENOSPC.
"""
from __future__ import annotations

import errno
import io

import pytest
import torch
from relkit import TOTAL_STEPS, assert_same_final_state, tiny_overrides
from testkit import run_cli, train_cli

from pipeline.config import compose
from pipeline.model.checkpoint import CheckpointError, load_checkpoint
from pipeline.train import train

FULL_AT_SAVE = 3  # the step-3 checkpoint hits the full disk


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


@pytest.mark.slow
def test_train_out_dir_under_a_file_fails_at_start_with_one_line(tiny_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, output, seen = train_cli(tiny_overrides(tiny_data, blocker / "run"), tmp_path)
    assert code == 2 and seen == 0, output[-3000:]
    line = _one_error_line(output)
    assert f"train.out_dir={blocker / 'run'} is not writable" in line and "Not a directory" in line


@pytest.mark.slow
def test_prepare_and_evaluate_refuse_an_unwritable_folder(tiny_data, reference_run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, output, _ = run_cli(["-m", "pipeline.prepare", *tiny_overrides(blocker / "prepared", tmp_path / "x"),
                               f"hydra.run.dir={tmp_path / 'hydra'}"], tmp_path)
    assert code == 2, output[-3000:]
    assert f"data.prepared_dir={blocker / 'prepared'}" in _one_error_line(output)

    from pipeline.evaluate import evaluate_model
    from pipeline.infer.runtime import InferenceError

    cfg = compose([*tiny_overrides(tiny_data, reference_run), f"eval.checkpoint={reference_run / 'best.pt'}",
                   f"eval.out_dir={blocker / 'evaluate'}"])
    with pytest.raises(InferenceError, match=r"eval.out_dir=.*a_file/evaluate is not writable \(Not a directory"):
        evaluate_model(cfg)


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resume_is_exact(tiny_data, reference_run,
                                                                                   tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = compose(tiny_overrides(tiny_data, out))
    real_save, calls = torch.save, []

    def filling_save(obj, fh, *args, **kwargs):
        calls.append(1)
        if len(calls) < FULL_AT_SAVE:
            return real_save(obj, fh, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 3])  # part of the bytes fit, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", filling_save)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last.pt: No space left on device.*"
                                              r"the previous last.pt is intact"):
        train(cfg)
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["step"] == FULL_AT_SAVE - 1
    assert not list(out.glob(".*.tmp.*"))

    summary = train(cfg)  # space is back: the run resumes and ends exactly as the uninterrupted one
    assert summary["steps"] == TOTAL_STEPS
    assert_same_final_state(reference_run, out)
