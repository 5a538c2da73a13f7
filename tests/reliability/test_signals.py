"""SIGTERM during training (a step, a validation) and during `python -m pipeline.evaluate`: a clean exit
(128 + 15, one clear line, no traceback) with the state saved - training resumes to exactly the
uninterrupted weights - and no partial or stale metrics.json.

(tests/train/test_train.py checks that SIGTERM at step 3 leaves a loadable last.pt; these add the resume
equality, the validation phase and the evaluation entry point.)
"""
from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
from relkit import STEPS_PER_EPOCH, TOTAL_STEPS, assert_same_final_state, tiny_overrides
from testkit import run_cli, train_cli

from pipeline.config import compose
from pipeline.model.checkpoint import load_checkpoint
from pipeline.train import train

SIGTERM_SEED = 7


@pytest.mark.slow
def test_sigterm_at_a_random_step_saves_and_resumes_to_identical_weights(tiny_data, reference_run, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, out)
    step = random.Random(SIGTERM_SEED).randint(1, TOTAL_STEPS - 3)
    code, output, seen = train_cli(overrides, tmp_path, stop_at_step=step, sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output and "train.resume=auto" in output
    stopped = load_checkpoint(out / "last.pt")
    assert f"stopped by SIGTERM at step {stopped['step']}" in output
    assert step <= stopped["step"] <= seen + 1  # the step in flight is finished, then saved
    assert stopped["epoch"] * STEPS_PER_EPOCH + stopped["epoch_step"] == stopped["step"]

    summary = train(compose(overrides))
    assert summary["steps"] == TOTAL_STEPS
    assert_same_final_state(reference_run, out)


@pytest.mark.slow
def test_sigterm_during_validation_finishes_the_epoch_and_resumes_identically(tiny_data, reference_run, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, out)
    # "epoch 0/3 done" is logged right before epoch 0's validation starts
    code, output, _ = train_cli(overrides, tmp_path, stop_on="epoch 0/3 done", sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert f"stopped by SIGTERM at step {STEPS_PER_EPOCH}" in output and "Traceback" not in output
    last = load_checkpoint(out / "last.pt")
    assert (last["epoch"], last["epoch_step"], last["step"]) == (1, 0, STEPS_PER_EPOCH)  # epoch 0 complete
    assert (out / "plots" / "val_map.csv").read_text().splitlines()[1].startswith("0,")  # its validation kept
    assert (out / "best.pt").is_file()

    summary = train(compose(overrides))
    assert summary["steps"] == TOTAL_STEPS
    assert_same_final_state(reference_run, out)


# ------------------------------------------------------------------------------------- evaluation
INJECT = """
import os, runpy, signal, sys
import {module} as target_module
owner = target_module
for part in {owner!r}.split(".") if {owner!r} else []:
    owner = getattr(owner, part)
original = getattr(owner, {attr!r})
def fire(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next Python instruction
    return original(*args, **kwargs)
setattr(owner, {attr!r}, fire)
sys.argv = ["pipeline.evaluate", *sys.argv[1:]]
runpy.run_module("pipeline.evaluate", run_name="__main__", alter_sys=True)
"""


def _evaluate(tiny_data: Path, reference_run: Path, out: Path, cwd: Path, inject: tuple[str, str, str] | None = None):
    overrides = [*tiny_overrides(tiny_data, reference_run), f"eval.checkpoint={reference_run / 'best.pt'}",
                 f"eval.out_dir={out}", "eval.num_vis_images=2", f"hydra.run.dir={cwd / 'hydra'}"]
    if inject is None:
        return run_cli(["-m", "pipeline.evaluate", *overrides], cwd)[:2]
    module, owner, attr = inject
    return run_cli(["-c", INJECT.format(module=module, owner=owner, attr=attr), *overrides], cwd)[:2]


@pytest.mark.slow
def test_sigterm_during_evaluation_exits_cleanly_without_partial_metrics(tiny_data, reference_run, tmp_path):
    out = tmp_path / "evaluate"
    code, output = _evaluate(tiny_data, reference_run, out, tmp_path)
    assert code == 0, output[-3000:]
    complete = (out / "metrics.json").read_bytes()
    assert "mAP" in json.loads(complete)

    # stopped while detecting: the outputs of the previous run stay as they were, complete
    code, output = _evaluate(tiny_data, reference_run, out, tmp_path,
                             inject=("pipeline.infer.runtime", "TorchDetector", "detect"))
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "evaluation stopped by SIGTERM" in output and "Traceback" not in output
    assert (out / "metrics.json").read_bytes() == complete

    # stopped while writing the outputs: no metrics.json at all (it is written last), no temp files
    code, output = _evaluate(tiny_data, reference_run, out, tmp_path,
                             inject=("pipeline.infer.viz", "", "plot_pr_curves"))
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "evaluation stopped by SIGTERM" in output and "Traceback" not in output
    assert not (out / "metrics.json").exists()
    assert not list(out.glob(".*.tmp.*"))
    json.loads((out / "detections.json").read_text())  # what was written is complete

    code, output = _evaluate(tiny_data, reference_run, out, tmp_path)
    assert code == 0 and json.loads((out / "metrics.json").read_bytes()) == json.loads(complete)
