"""THE evaluation: COCO metrics of a detector on the prepared validation split - a checkpoint (.pt, EMA
weights), an ONNX model, or the model being trained (validation during training) - plus, for the
evaluate stage (``python -m pipeline.evaluate``), PR curves, a confusion matrix and a predictions grid.

Under torchrun every rank runs its shard of the images; the COCO detections are all-gathered and rank 0
scores them and writes (spec section 12):

    <eval.out_dir>/metrics.json          headline numbers for `dvc metrics show`: mAP, AP50, AP75, APs/m/l,
                                         AR1/10/100, image and detection counts (see HEADLINE)
    <eval.out_dir>/details.json          everything: the above plus per-class AP and AP50, model, backend,
                                         input size (not a DVC metric)
    <eval.out_dir>/pr_curves.csv         class, recall, precision (IoU 0.5; for `dvc plots`)
    <eval.out_dir>/confusion_matrix.json rows = ground truth, columns = predicted, last = background
    <eval.out_dir>/detections.json       COCO results (original-image pixels)
    <eval.out_dir>/figures/              pr_curves.png, confusion_matrix.png, predictions.png

metrics.json is written last and atomically (after the old one is removed; details.json just before it),
so its presence means a complete set of outputs from one run.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pipeline import dist
from pipeline.config import Config
from pipeline.data.formats import prepared_json
from pipeline.data.transforms import read_image, write_image
from pipeline.infer import viz
from pipeline.infer.metrics import (
    confusion_matrix,
    detections_to_coco,
    load_coco,
    per_image_from_coco,
    pr_curves,
    run_cocoeval,
    summarize,
)
from pipeline.infer.runtime import Detector, InferenceError, Preprocessing, check_model_file, load_detector
from pipeline.io import atomic_write
from pipeline.logging import get_logger

log = get_logger("pipeline.evaluate")

GRID_CELL = 320  # pixels per tile of the predictions grid
# The keys of metrics.json (the DVC metric, kept to flat headline numbers so `dvc metrics show` stays
# readable); details.json holds the full metrics dict, per-class values included.
HEADLINE = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "num_images", "num_detections")


# what the stage reports beside the COCO numbers (describes the run; training validation drops it)
DESCRIPTION_KEYS = ("num_detections", "model", "backend", "input_size")


def check_out_dir(out_dir: Path) -> None:
    """Fail before the (long) evaluation when ``eval.out_dir`` cannot be created or written."""
    probe = Path(out_dir) / f".write_test.{os.getpid()}"
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InferenceError(f"eval.out_dir={out_dir} is not writable ({err.strerror or err}: {err.filename}); "
                             "point eval.out_dir to a writable folder") from None


# ------------------------------------------------------------------------------------ the split
def split_json(cfg: Config, split: str = "val") -> Path:
    """The prepared split's json (:func:`pipeline.data.formats.prepared_json`); an error when it is missing."""
    path = prepared_json(cfg, split)
    if not path.is_file() and split == "test" and (path.parent / "train.json").is_file():
        raise InferenceError(f"{path} does not exist: prepare found no test split in the data (eval.split=test). "
                             "Give the data one (VOC ImageSets/Main/test.txt, YOLO data.yaml test:, COCO "
                             "data.test_ann) or hold one out with data.test_fraction=0.1, then rerun prepare; "
                             "or score eval.split=val")
    if not path.is_file():
        raise InferenceError(f"{path} does not exist: prepare the data first (`python -m pipeline.prepare`) "
                             "or set data.prepared_dir to the folder holding train.json / val.json")
    return path


def image_records(gt: dict, json_dir: Path) -> list[tuple[int, Path]]:
    """(image_id, absolute path) for every image, sorted by id; relative file names are relative to the json."""
    out = []
    for img in sorted(gt["images"], key=lambda i: i["id"]):
        path = Path(img["file_name"])
        out.append((int(img["id"]), path if path.is_absolute() else json_dir / path))
    return out


def class_names_of(gt: dict) -> list[str]:
    """Category names in class order (categories sorted by id, as the prepared json numbers them 1..C)."""
    return [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]


class _Images(torch.utils.data.Dataset):
    """Reads and preprocesses images for inference; items are (chw [3,H,W] float32, meta dict)."""

    def __init__(self, records: Sequence[tuple[int, Path]], preprocessing: Preprocessing):
        self.records, self.preprocessing = list(records), preprocessing

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        image_id, path = self.records[i]
        img = read_image(path)
        chw, matrix = self.preprocessing(img)
        return chw, {"image_id": image_id, "file": str(path), "orig_size": tuple(img.shape[:2]),
                     "transform": matrix.tolist()}


def _collate(items: list[tuple[np.ndarray, dict]]) -> tuple[np.ndarray, list[dict]]:
    return np.stack([chw for chw, _ in items]), [meta for _, meta in items]


def detect_records(detector: Detector, records: Sequence[tuple[int, Path]], batch_size: int, num_workers: int,
                   score_thr: float, iou_thr: float, max_dets: int, category_ids: Sequence[int]) -> list[dict]:
    """COCO detections for ``records`` (this process only)."""
    loader = torch.utils.data.DataLoader(_Images(records, detector.preprocessing), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate)
    out: list[dict] = []
    for images, metas in loader:
        dets = detector.detect(images, score_thr, iou_thr, max_dets)
        out += detections_to_coco(dets, metas, category_ids)
    return out


def detect_split(detector: Detector, gt: dict, json_dir: Path, cfg: Config) -> list[dict]:
    """COCO detections for the whole split (sharded over torchrun ranks, gathered on every rank)."""
    records = image_records(gt, json_dir)
    shard = records[dist.get_rank()::dist.get_world_size()]
    cat_ids = sorted(c["id"] for c in gt["categories"])
    e = cfg.eval
    mine = detect_records(detector, shard, cfg.data.eval_batch_size, cfg.data.num_workers,
                          e.score_thr, e.iou_thr, e.max_dets, cat_ids)
    return [d for part in dist.all_gather_object(mine) for d in part]


def check_classes(detector: Detector, class_names: list[str], gt_path: Path) -> None:
    if detector.num_classes != len(class_names):
        raise InferenceError(f"{detector.path} predicts {detector.num_classes} classes {detector.class_names} but "
                             f"{gt_path} has {len(class_names)} categories {class_names}; evaluate on the data "
                             "the model was trained for")
    if detector.class_names != class_names and not all(n.startswith("class") for n in detector.class_names):
        log.warning("class names differ between %s %s and %s %s; scoring by class index",
                    detector.path, detector.class_names, gt_path, class_names)


# ------------------------------------------------------------------------------------ scoring
_GT_CACHE: dict[tuple[str, float], Any] = {}


def load_gt(gt_json: str | Path) -> tuple[Any, list[str]]:
    """The ground-truth COCO object (cached per file and mtime: training validates often) and its class
    names in id order."""
    key = (os.path.abspath(gt_json), os.path.getmtime(gt_json))
    if key not in _GT_CACHE:
        coco = load_coco(Path(gt_json))
        _GT_CACHE.clear()
        _GT_CACHE[key] = (coco, class_names_of(coco.dataset))
    return _GT_CACHE[key]


def evaluate_detector(detector: Detector, cfg: Config, out_dir: str | Path | None = None,
                      return_detections: bool = False, split: str = "val") -> dict[str, Any]:
    """THE evaluation function, for the evaluate stage, export verification and validation during training:
    run ``detector`` on the prepared ``split`` (val; eval.split for the evaluate stage) (sharded over torchrun ranks, gathered), score it on rank 0
    and broadcast the metrics (the same dict on every rank). With ``out_dir`` rank 0 also writes the
    artefacts; with ``return_detections`` rank 0's result also holds "detections" (COCO result dicts).
    """
    gt_path = split_json(cfg, split)
    coco, class_names = load_gt(gt_path)
    gt = coco.dataset
    check_classes(detector, class_names, gt_path)
    dets = detect_split(detector, gt, gt_path.parent, cfg)
    metrics = None
    if dist.is_main():
        ev = run_cocoeval(coco, dets)
        metrics = summarize(ev, class_names)
        metrics.update(num_images=len(gt["images"]), num_detections=len(dets), model=str(detector.path),
                       backend=detector.backend, input_size=list(detector.preprocessing.input_size))
        if not dets:
            log.warning("no detections above eval.score_thr=%s on %d images: all metrics are 0",
                        cfg.eval.score_thr, len(gt["images"]))
        if out_dir is not None:
            write_artifacts(Path(out_dir), coco, gt_path.parent, dets, ev, metrics, class_names, cfg)
    metrics = dist.broadcast_object(metrics)
    if return_detections and dist.is_main():
        metrics = {**metrics, "detections": dets}
    return metrics


def write_artifacts(out_dir: Path, coco, json_dir: Path, dets: list[dict], ev, metrics: dict,
                    class_names: list[str], cfg: Config) -> None:
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # an old one must not describe the new outputs
    atomic_write(out_dir / "detections.json", json.dumps(dets))
    curves = pr_curves(ev, class_names, iou=0.5)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["class", "recall", "precision"])
    for name, c in curves.items():
        writer.writerows([name, f"{r:.4f}", f"{p:.6f}"] for r, p in zip(c["recall"], c["precision"]))
    atomic_write(out_dir / "pr_curves.csv", buf.getvalue())
    viz.plot_pr_curves(curves, figures / "pr_curves.png")
    per_dets, per_gts = per_image_from_coco(coco, dets)
    e = cfg.eval
    matrix = confusion_matrix(per_dets, per_gts, len(class_names), e.confusion_iou, e.confusion_score)
    atomic_write(out_dir / "confusion_matrix.json", json.dumps({
        "classes": class_names + ["background"], "rows": "ground truth", "columns": "predicted",
        "iou_thr": e.confusion_iou, "score_thr": e.confusion_score, "matrix": matrix.tolist()}, indent=1))
    viz.plot_confusion_matrix(matrix, class_names, figures / "confusion_matrix.png")
    write_prediction_grid(coco, json_dir, per_dets, per_gts, class_names, e.num_vis_images, e.confusion_score,
                          figures / "predictions.png")
    atomic_write(out_dir / "details.json", json.dumps(metrics, indent=2))
    headline = {k: metrics[k] for k in HEADLINE}
    atomic_write(out_dir / "metrics.json", json.dumps(headline, indent=2))  # last: marks the set complete
    log.info("wrote metrics, curves, confusion matrix and predictions to %s", out_dir)


def write_prediction_grid(coco, json_dir: Path, per_dets: list[dict], per_gts: list[dict], class_names: list[str],
                          num: int, score_thr: float, path: Path) -> None:
    """The first ``num`` images (by id): ground truth green, predictions with score >= score_thr."""
    records = image_records(coco.dataset, json_dir)[:num]
    tiles = []
    for (_, img_path), det, gt in zip(records, per_dets, per_gts):
        img = read_image(img_path)
        s = GRID_CELL / max(img.shape[:2])  # draw at the tile's size so captions stay legible
        img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)))
        keep = det["scores"] >= score_thr
        pred = {"boxes": det["boxes"][keep] * s, "scores": det["scores"][keep], "labels": det["labels"][keep]}
        tiles.append(viz.draw_gt_and_pred(img, {"boxes": gt["boxes"] * s, "labels": gt["labels"]}, pred, class_names))
    if tiles:
        write_image(path, viz.make_grid(tiles, cols=4, cell=GRID_CELL))


def evaluate_model(cfg: Config, checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default ``eval.checkpoint``; .pt, .onnx or an exported .xml / .param / .mnn) and write ``eval.out_dir``."""
    device = dist.select_device(cfg.train.device)
    dist.init_distributed(device, cfg.train.dist_timeout_s)
    path = Path(checkpoint or cfg.eval.checkpoint)
    if dist.is_main():
        check_out_dir(Path(cfg.eval.out_dir))
    check_model_file(path)  # a missing model, then a missing split, are reported before anything is loaded
    gt_path = split_json(cfg, cfg.eval.split)
    # onnxruntime gets torch's thread count (1 per rank under torchrun) instead of every core
    detector = load_detector(path, device=device, input_size=cfg.data.input_size, threads=torch.get_num_threads())
    log.info("evaluating %s (%s) at %s on %s", path, detector.backend, list(cfg.data.input_size), gt_path)
    metrics = evaluate_detector(detector, cfg, out_dir=cfg.eval.out_dir, split=cfg.eval.split)
    log.info("mAP %.4f AP50 %.4f AP75 %.4f (%d images, %d detections)", metrics["mAP"], metrics["AP50"],
             metrics["AP75"], metrics["num_images"], metrics["num_detections"])
    return metrics
