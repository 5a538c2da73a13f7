"""Real photographs end to end (issue #16, item 5): the raccoon set (../shared/data/raccoon, fixture
``raccoon_dir``: VOC XML in annotations/, JPEG in images/, used as published) through the real command-line
stages, each a subprocess as a user runs them: prepare -> train -> evaluate on the held-out test split ->
export (ONNX, which verifies itself) -> evaluate of the ONNX model on the same test split.

The recipe is ``conf/experiment/raccoon.yaml`` unchanged (0.5x backbone from scratch at 128x128, 30 epochs on
the 160 training images); only the paths are overridden. The AP50 floor comes from runs of that recipe on the
same seeded test split (20 images, 22 boxes); see AP50_FLOOR. Outside CI the test skips when the folder is
absent; under CI=true it fails naming it (tests/sharedkit.py).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from testkit import PYTHON, subprocess_env

NUM_IMAGES, NUM_BOXES = 200, 217
SPLITS = {"train": (160, 174), "val": (20, 21), "test": (20, 22)}  # data.test_fraction=0.1, data.split_seed=0
# Measured with the recipe as committed (test split, best.pt chosen on val): see README, "Train on your own
# data: a walkthrough with real photographs". The floor sits below the lowest seed by the margin explained there.
AP50_FLOOR = 0.55


def _stage(stage: str, overrides: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    # one thread (testkit's subprocess environment), as the seeds behind AP50_FLOOR were measured; two threads on
    # a machine that other jobs keep busy ran several times slower here
    proc = subprocess.run([PYTHON, "-m", f"pipeline.{stage}", *overrides, f"hydra.run.dir={cwd / 'hydra' / stage}"],
                          cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, \
        f"{stage} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_raccoon_prepare_train_evaluate_export(raccoon_dir: Path, tmp_path: Path):
    prepared, run = tmp_path / "prepared", tmp_path / "runs"
    common = ["experiment=raccoon", f"data.root={raccoon_dir}", f"data.prepared_dir={prepared}",
              "tracking.mode=disabled"]

    # prepare: the published layout, detected (data.source=auto in the recipe), a seeded held-out test split
    out = _stage("prepare", common, tmp_path, timeout=300)
    assert "detected voc" in out.stderr, out.stderr[-2000:]
    report = _json(prepared / "report.json")
    assert report["format"] == "voc" and report["class_names"] == ["raccoon"] and report["num_warnings"] == 0
    counts = {s: (st["num_images"], st["num_boxes"]) for s, st in report["splits"].items()}
    assert counts == SPLITS, counts
    assert sum(n for n, _ in counts.values()) == NUM_IMAGES and sum(b for _, b in counts.values()) == NUM_BOXES
    assert "train 160 images / 174 boxes, val 20 images / 21 boxes, test 20 images / 22 boxes" in out.stdout

    # train: the whole recipe
    _stage("train", [*common, f"train.out_dir={run / 'train'}"], tmp_path, timeout=1800)
    best = run / "train" / "best.pt"
    trained = _json(run / "train" / "metrics.json")
    assert best.is_file() and trained["epochs_completed"] == 30 and trained["steps"] == 30 * 10, trained

    # evaluate the held-out test split: the AP50 floor
    _stage("evaluate", [*common, "eval.split=test", f"eval.checkpoint={best}", f"eval.out_dir={run / 'evaluate'}"],
           tmp_path, timeout=300)
    test = _json(run / "evaluate" / "metrics.json")
    assert test["num_images"] == SPLITS["test"][0], test
    assert test["AP50"] >= AP50_FLOOR, f"test AP50 {test['AP50']:.4f} < floor {AP50_FLOOR}: {test}"
    assert (run / "evaluate" / "figures" / "predictions.png").is_file()

    # export: ONNX, verified by the stage itself against PyTorch (outputs and mAP on the val split)
    _stage("export", [*common, f"export.checkpoint={best}", f"export.out_dir={run / 'export'}"], tmp_path, timeout=600)
    exported = _json(run / "export" / "export.json")
    assert exported["max_abs_diff"] <= exported["atol"], exported
    assert exported["map_diff"] <= exported["map_tolerance"], exported
    assert _json(run / "export" / "metrics.json")["map_onnx"] == exported["map_onnx"]  # written only when all passed

    # the exported ONNX model scored by evaluate on the test split: the PyTorch model's result
    onnx = run / "export" / "model.onnx"
    _stage("evaluate", [*common, "eval.split=test", f"eval.checkpoint={onnx}", f"eval.out_dir={run / 'evaluate_onnx'}"],
           tmp_path, timeout=300)
    onnx_test = _json(run / "evaluate_onnx" / "metrics.json")
    assert _json(run / "evaluate_onnx" / "details.json").get("backend") == "onnxruntime"
    assert abs(onnx_test["mAP"] - test["mAP"]) <= exported["map_tolerance"], (onnx_test, test)
    assert abs(onnx_test["AP50"] - test["AP50"]) <= exported["map_tolerance"], (onnx_test, test)
