"""COCO scoring (pycocotools, the reference), PR curves and a confusion matrix.

Coordinates: detections arrive as :class:`pipeline.model.decode.Detections` in network-input pixels;
:func:`detections_to_coco` maps them back to original-image pixels with the same 3x3 matrix the
preprocessing used, then writes COCO ``[x, y, w, h]`` boxes (no +1, as the official evaluator).
The prepared jsons number categories 1..C in class order, so ``category_id = label + 1``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.data.transforms import boxes_to_original

STAT_NAMES = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


@contextlib.contextmanager
def _quiet():
    """pycocotools prints progress and tables; keep stdout clean for JSON-printing callers."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def load_coco(gt: str | Path | dict | COCO) -> COCO:
    """A COCO object from a json path, a dict or an existing COCO (returned as is).

    Annotations without ``area`` get ``w * h`` (COCOeval's area ranges need it).
    """
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, Path)):
        path = Path(gt)
        if not path.is_file():
            raise FileNotFoundError(f"ground-truth json {path} does not exist; run `python -m pipeline.prepare`")
        gt = json.loads(path.read_text())
    data = copy.deepcopy(gt)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"ground-truth COCO dict has no '{key}' list")
    for ann in data["annotations"]:
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


def run_cocoeval(gt: str | Path | dict | COCO, detections: list[dict]) -> COCOeval | None:
    """evaluate + accumulate + summarize on a copy of ``detections``; None when there are none.

    ``loadRes([])`` raises in pycocotools, and it writes ids into the dicts it gets, hence the copy.
    """
    coco_gt = load_coco(gt)
    if not detections:
        return None
    known = set(coco_gt.getImgIds())
    unknown = {d["image_id"] for d in detections} - known
    if unknown:
        raise ValueError(f"detections refer to image ids not in the ground truth: {sorted(unknown)[:10]}")
    with _quiet():
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _class_ap(precision: np.ndarray) -> float | None:
    """Mean of valid entries (> -1) of a precision slice; None when the class has no ground truth."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else None


def summarize(ev: COCOeval | None, class_names: Sequence[str]) -> dict[str, Any]:
    """Headline stats (pycocotools order, -1 = no ground truth in that area range) + per-class AP.

    Zero detections (``ev is None``) give all zeros. Per-class values are None for classes without
    ground truth in the split (JSON null).
    """
    if ev is None:
        out: dict[str, Any] = {name: 0.0 for name in STAT_NAMES}
        out["per_class_AP"] = {name: 0.0 for name in class_names}
        out["per_class_AP50"] = {name: 0.0 for name in class_names}
        return out
    out = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats[: len(STAT_NAMES)])}
    precision = ev.eval["precision"]  # [T iou, R recall, K class, A area, M maxdets]
    cat_ids = list(ev.params.catIds)
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    if len(cat_ids) != len(class_names):
        raise ValueError(f"ground truth has {len(cat_ids)} categories but {len(class_names)} class names "
                         f"were given ({list(class_names)})")
    out["per_class_AP"] = {n: _class_ap(precision[:, :, k, 0, -1]) for k, n in enumerate(class_names)}
    out["per_class_AP50"] = {n: _class_ap(precision[t50, :, k, 0, -1]) for k, n in enumerate(class_names)}
    return out


def coco_evaluate(gt: str | Path | dict | COCO, detections: list[dict], class_names: Sequence[str]) -> dict:
    """COCO bbox metrics of ``detections`` (dicts image_id, category_id, bbox [x,y,w,h], score).

    Returns mAP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, per_class_AP and per_class_AP50.
    """
    return summarize(run_cocoeval(gt, detections), class_names)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco(dets: Sequence[Any], metas: Sequence[dict],
                       category_ids: Sequence[int] | None = None) -> list[dict]:
    """COCO result dicts from per-image Detections (boxes [k,4] xyxy network-input px, scores, labels).

    Each meta needs "image_id", "orig_size" (h, w) and "transform" (3x3 original -> network input).
    ``category_ids[label]`` gives the json id; default ``label + 1``.
    """
    if len(dets) != len(metas):
        raise ValueError(f"{len(dets)} detection sets but {len(metas)} image metas")
    out: list[dict] = []
    for det, meta in zip(dets, metas):
        boxes, scores, labels = _to_numpy(det.boxes), _to_numpy(det.scores), _to_numpy(det.labels)
        if len(boxes) == 0:
            continue
        orig = boxes_to_original(boxes.astype(np.float32), np.asarray(meta["transform"], dtype=np.float64),
                                 tuple(meta["orig_size"]))
        orig = _to_numpy(orig).astype(np.float64)
        for (x1, y1, x2, y2), score, label in zip(orig, scores, labels):
            cat = int(category_ids[int(label)]) if category_ids is not None else int(label) + 1
            out.append({"image_id": int(meta["image_id"]), "category_id": cat,
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)})
    return out


def pr_curves(ev: COCOeval | None, class_names: Sequence[str], iou: float = 0.5) -> dict[str, dict]:
    """Per-class precision at COCO's 101 recall points at one IoU threshold (area all, maxDets 100).

    Returns {name: {"recall": [...], "precision": [...]}}; classes without ground truth are left out.
    Precision beyond the highest reached recall is 0 (pycocotools' convention).
    """
    if ev is None:
        return {}
    t = int(np.argmin(np.abs(ev.params.iouThrs - iou)))
    recall = ev.params.recThrs
    curves = {}
    for k, name in enumerate(class_names):
        prec = ev.eval["precision"][t, :, k, 0, -1]
        if (prec > -1).any():
            curves[name] = {"recall": [float(r) for r in recall], "precision": [float(p) for p in prec]}
    return curves


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [n,4] and b [m,4] (xyxy) -> [n,m]."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def confusion_matrix(dets: Sequence[dict], gts: Sequence[dict], num_classes: int,
                     iou_thr: float = 0.5, score_thr: float = 0.3) -> np.ndarray:
    """[(C+1), (C+1)] counts; rows = ground-truth class, columns = predicted class, index C = background.

    Per image: detections with score >= score_thr are matched to ground truth class-agnostically,
    greedily by descending IoU (each box used once, IoU >= iou_thr). Matched pairs count at
    [gt, pred]; unmatched ground truth at [gt, C] (missed); unmatched detections at [C, pred].
    ``dets[i]`` = {"boxes" [k,4] xyxy, "scores" [k], "labels" [k]}, ``gts[i]`` = {"boxes", "labels"}.
    """
    if len(dets) != len(gts):
        raise ValueError(f"{len(dets)} detection sets but {len(gts)} ground-truth sets")
    bg = num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for det, gt in zip(dets, gts):
        keep = _to_numpy(det["scores"]).reshape(-1) >= score_thr
        d_boxes = _to_numpy(det["boxes"]).reshape(-1, 4)[keep]
        d_labels = _to_numpy(det["labels"]).reshape(-1)[keep].astype(int)
        g_boxes = _to_numpy(gt["boxes"]).reshape(-1, 4)
        g_labels = _to_numpy(gt["labels"]).reshape(-1).astype(int)
        iou = box_iou(g_boxes.astype(np.float64), d_boxes.astype(np.float64))
        gi, di = np.nonzero(iou >= iou_thr)
        order = np.argsort(-iou[gi, di], kind="stable")
        used_g, used_d = set(), set()
        for g, d in zip(gi[order], di[order]):
            if g in used_g or d in used_d:
                continue
            used_g.add(g)
            used_d.add(d)
            matrix[g_labels[g], d_labels[d]] += 1
        for g in set(range(len(g_labels))) - used_g:
            matrix[g_labels[g], bg] += 1
        for d in set(range(len(d_labels))) - used_d:
            matrix[bg, d_labels[d]] += 1
    return matrix


def per_image_from_coco(gt: str | Path | dict | COCO, detections: list[dict]) -> tuple[list[dict], list[dict]]:
    """Group ground truth (non-crowd) and COCO detections per image as xyxy arrays with 0-based labels.

    Labels are the index of the category id in the sorted category ids (= class order of the
    prepared json). Returns (dets, gts) lists aligned with the sorted image ids.
    """
    coco = load_coco(gt)
    cat_index = {cid: k for k, cid in enumerate(sorted(coco.getCatIds()))}
    img_ids = sorted(coco.getImgIds())
    by_img: dict[int, list[dict]] = {i: [] for i in img_ids}
    for d in detections:
        by_img[d["image_id"]].append(d)
    dets, gts = [], []
    for img_id in img_ids:
        anns = [a for a in coco.imgToAnns.get(img_id, []) if not a.get("iscrowd", 0)]
        gts.append({"boxes": _xywh_to_xyxy([a["bbox"] for a in anns]),
                    "labels": np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)})
        ds = by_img[img_id]
        dets.append({"boxes": _xywh_to_xyxy([d["bbox"] for d in ds]),
                     "scores": np.array([d["score"] for d in ds], dtype=np.float64),
                     "labels": np.array([cat_index[d["category_id"]] for d in ds], dtype=np.int64)})
    return dets, gts


def _xywh_to_xyxy(boxes: list) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([arr[:, :2], arr[:, :2] + arr[:, 2:]], axis=1)
