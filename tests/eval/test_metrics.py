"""COCO scoring against pycocotools run by hand, zero detections, coordinate mapping, confusion matrix."""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.infer.metrics import (
    coco_evaluate,
    confusion_matrix,
    detections_to_coco,
    pr_curves,
    run_cocoeval,
)
from pipeline.model.decode import Detections

NAMES = ["cat", "dog", "bird"]


def gt_dict() -> dict:
    """3 images, classes 1..3; class 3 ('bird') has no ground truth at all."""
    anns = [
        (1, 1, [10, 10, 40, 30]), (1, 2, [60, 50, 30, 30]),
        (2, 1, [5, 5, 20, 20]), (2, 1, [50, 40, 60, 50]),
        (3, 2, [0, 0, 100, 80]),
    ]
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 128, "height": 96} for i in (1, 2, 3)],
        "annotations": [{"id": k + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for k, (im, c, b) in enumerate(anns)],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)],
    }


def known_detections() -> list[dict]:
    return [
        {"image_id": 1, "category_id": 1, "bbox": [12, 11, 38, 30], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [58, 52, 30, 26], "score": 0.6},
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.7},  # false positive of 'bird'
        {"image_id": 2, "category_id": 1, "bbox": [50, 45, 55, 45], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [70, 10, 20, 20], "score": 0.85},  # false positive
        {"image_id": 3, "category_id": 1, "bbox": [0, 0, 100, 80], "score": 0.3},  # wrong class
        {"image_id": 3, "category_id": 2, "bbox": [4, 2, 90, 75], "score": 0.5},
    ]


def reference_stats(gt: dict, dets: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_coco_evaluate_equals_pycocotools(capsys):
    gt, dets = gt_dict(), known_detections()
    ref = reference_stats(gt, dets)
    got = coco_evaluate(gt, dets, NAMES)
    keys = ["mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"]
    np.testing.assert_allclose([got[k] for k in keys], ref.stats[:9], rtol=0, atol=1e-12)
    assert 0.0 < got["mAP"] < 1.0
    # per-class AP: mean over IoU thresholds and recall points of the class' precision (valid entries)
    for k, name in enumerate(NAMES[:2]):
        p = ref.eval["precision"][:, :, k, 0, -1]
        assert got["per_class_AP"][name] == pytest.approx(p[p > -1].mean())
        p50 = ref.eval["precision"][0, :, k, 0, -1]
        assert got["per_class_AP50"][name] == pytest.approx(p50[p50 > -1].mean())
    assert got["per_class_AP"]["bird"] is None  # no ground truth -> null, not a fake number
    assert capsys.readouterr().out == ""  # pycocotools' printing is silenced
    assert "area" not in dets[0]  # the caller's dicts are not modified by loadRes


def test_perfect_detections_score_one():
    gt = gt_dict()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    got = coco_evaluate(gt, dets, NAMES)
    assert got["mAP"] == pytest.approx(1.0) and got["AP50"] == pytest.approx(1.0)
    curves = pr_curves(run_cocoeval(gt, dets), NAMES)
    assert set(curves) == {"cat", "dog"}
    assert len(curves["cat"]["recall"]) == 101 and min(curves["cat"]["precision"]) == pytest.approx(1.0)


def test_zero_detections_give_zeros_without_crash(tmp_path):
    path = tmp_path / "gt.json"
    import json

    path.write_text(json.dumps(gt_dict()))
    got = coco_evaluate(path, [], NAMES)
    assert all(got[k] == 0.0 for k in ("mAP", "AP50", "AP75", "AR100"))
    assert got["per_class_AP"] == {n: 0.0 for n in NAMES}
    assert pr_curves(run_cocoeval(path, []), NAMES) == {}


def test_unknown_image_id_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ValueError, match="image ids not in the ground truth"):
        coco_evaluate(gt_dict(), [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}], NAMES)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        coco_evaluate(tmp_path / "nothing.json", [], NAMES)


def test_detections_to_coco_maps_back_to_original_pixels():
    # network input 192x128 from an original 96x256 (w x h) image: stretch x*2, y*0.5
    matrix = np.array([[2.0, 0, 0], [0, 0.5, 0], [0, 0, 1]])
    det = Detections(torch.tensor([[20.0, 10.0, 60.0, 50.0], [0.0, 0.0, 192.0, 128.0]]),
                     torch.tensor([0.9, 0.2]), torch.tensor([2, 0]))
    meta = {"image_id": 7, "orig_size": (256, 96), "transform": matrix.tolist()}
    out = detections_to_coco([det], [meta])
    assert [d["category_id"] for d in out] == [3, 1]
    np.testing.assert_allclose(out[0]["bbox"], [10.0, 20.0, 20.0, 80.0], atol=1e-5)
    np.testing.assert_allclose(out[1]["bbox"], [0.0, 0.0, 96.0, 256.0], atol=1e-5)
    assert out[0]["image_id"] == 7 and out[0]["score"] == pytest.approx(0.9)
    assert detections_to_coco([det], [meta], category_ids=[5, 6, 9])[0]["category_id"] == 9
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert detections_to_coco([empty], [meta]) == []


def test_confusion_matrix_counts():
    gts = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]]), "labels": np.array([0, 1, 1])}]
    dets = [{"boxes": np.array([[0, 0, 10, 11], [21, 20, 40, 40], [100, 100, 110, 110], [50, 50, 60, 60]]),
             "scores": np.array([0.9, 0.8, 0.7, 0.1]), "labels": np.array([0, 0, 1, 1])}]
    m = confusion_matrix(dets, gts, num_classes=2, iou_thr=0.5, score_thr=0.3)
    expected = np.array([
        [1, 0, 0],  # gt class 0: matched as class 0
        [1, 0, 1],  # gt class 1: one predicted as class 0, one missed (its detection is under score_thr)
        [0, 1, 0],  # background: one false positive of class 1
    ])
    np.testing.assert_array_equal(m, expected)
    assert confusion_matrix([{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}],
                            [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0)}], 2).sum() == 0
