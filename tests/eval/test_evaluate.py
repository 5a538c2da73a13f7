"""`pipeline.evaluate`: artefacts, metrics consistent with the written detections, zero detections, errors."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from evalkit import CLASSES, tiny_cfg

from pipeline.evaluate import evaluate_model
from pipeline.infer.metrics import coco_evaluate
from pipeline.infer.runtime import InferenceError

REPO = Path(__file__).resolve().parents[2]


def test_evaluate_writes_consistent_artifacts(tiny):
    cfg, _, prepared, _ = tiny
    metrics = evaluate_model(cfg)
    folder = Path(cfg.eval.out_dir)
    # metrics.json (the DVC metric): only flat headline numbers, so `dvc metrics show` stays readable
    headline = json.loads((folder / "metrics.json").read_text())
    assert list(headline) == ["mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "num_images",
                              "num_detections"]
    assert all(type(v) in (int, float) for v in headline.values()), headline
    # details.json: the full metrics under today's key names, per-class AP included
    saved = json.loads((folder / "details.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["mAP"] == metrics["mAP"] and set(saved["per_class_AP"]) == set(CLASSES)
    assert set(saved["per_class_AP50"]) == set(CLASSES) and saved["backend"] == "torch"
    assert {k: saved[k] for k in headline} == headline
    dets = json.loads((folder / "detections.json").read_text())
    assert len(dets) == headline["num_detections"] > 0
    # boxes are in original-image pixels (96 x 64), not network-input pixels (192 x 128)
    assert max(d["bbox"][0] + d["bbox"][2] for d in dets) <= 96 + 1e-3
    assert max(d["bbox"][1] + d["bbox"][3] for d in dets) <= 64 + 1e-3
    assert {d["category_id"] for d in dets} <= {1, 2, 3}
    again = coco_evaluate(prepared / "val.json", dets, CLASSES)
    assert again["mAP"] == metrics["mAP"] and again["AR100"] == metrics["AR100"]
    with open(folder / "pr_curves.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) == {"class", "recall", "precision"}
    cm = json.loads((folder / "confusion_matrix.json").read_text())
    assert len(cm["matrix"]) == len(CLASSES) + 1 and cm["classes"][-1] == "background"
    n_gt = len(json.loads((prepared / "val.json").read_text())["annotations"])
    assert sum(sum(row) for row in cm["matrix"][: len(CLASSES)]) == n_gt  # every GT box counted once
    for name in ("pr_curves.png", "confusion_matrix.png", "predictions.png"):
        assert (folder / "figures" / name).stat().st_size > 1000


def test_zero_detections(tiny, tmp_path):
    cfg, ckpt, prepared, _ = tiny
    cfg = tiny_cfg(prepared, tmp_path, [f"eval.checkpoint={ckpt}", "eval.score_thr=0.999"])
    metrics = evaluate_model(cfg)
    assert metrics["num_detections"] == 0 and metrics["mAP"] == 0.0 and metrics["AR100"] == 0.0
    assert json.loads((tmp_path / "evaluate" / "detections.json").read_text()) == []
    assert (tmp_path / "evaluate" / "figures" / "pr_curves.png").is_file()


def test_missing_model_and_wrong_class_count(tiny, tmp_path):
    cfg, ckpt, prepared, _ = tiny
    with pytest.raises(InferenceError, match=r"model file .*nope\.pt does not exist"):
        evaluate_model(cfg, checkpoint=tmp_path / "nope.pt")
    gt = json.loads((prepared / "val.json").read_text())
    gt["categories"] = gt["categories"][:2]
    other = tmp_path / "prepared"
    other.mkdir()
    (other / "val.json").write_text(json.dumps(gt))
    cfg = tiny_cfg(other, tmp_path, [f"eval.checkpoint={ckpt}"])
    with pytest.raises(InferenceError, match="predicts 3 classes .* has 2 categories"):
        evaluate_model(cfg)


@pytest.mark.slow
def test_entry_point_missing_model_exits_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipeline.evaluate", f"eval.checkpoint={tmp_path}/none.onnx"],
                         check=False, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 2
    assert "none.onnx does not exist" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_torchrun_sharded_evaluation_matches_single_process(tiny, tmp_path):
    """2 ranks each run half of the images; the gathered detections give the single-process metrics."""
    _, ckpt, prepared, _ = tiny
    single = evaluate_model(tiny_cfg(prepared, tmp_path / "one", [f"eval.checkpoint={ckpt}"]))
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "pipeline.evaluate",
            f"eval.checkpoint={ckpt}", f"eval.out_dir={tmp_path / 'two'}", f"data.prepared_dir={prepared}",
            "model=nanodet_plus_m_0.5x", f"model.num_classes={len(CLASSES)}", "data.input_size=[192,128]",
            "data.num_workers=0", "data.eval_batch_size=2"]
    res = subprocess.run(args, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    sharded = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert sharded["num_detections"] == single["num_detections"] and sharded["num_images"] == single["num_images"]
    for key in ("mAP", "AP50", "AR100"):
        assert sharded[key] == pytest.approx(single[key], abs=1e-9)
    ids = sorted(d["image_id"] for d in json.loads((tmp_path / "two" / "detections.json").read_text()))
    assert sorted(d["image_id"] for d in json.loads((tmp_path / "one" / "evaluate" / "detections.json").read_text())) == ids
