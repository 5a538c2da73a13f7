"""`python -m pipeline.evaluate`: COCO metrics of a checkpoint (.pt, EMA weights) or an ONNX model on the
prepared validation split, plus PR curves, a confusion matrix and a predictions grid.

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
so its presence means a complete set of outputs from one run. SIGTERM/SIGINT stop the run with exit code 128 + signal and a
one-line message; a partial metrics.json is never left behind.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import dist
from pipeline.cli import hydra_entry
from pipeline.config import Config
from pipeline.logging import get_logger
from pipeline.metrics import (
    confusion_matrix,
    detections_to_coco,
    load_coco,
    per_image_from_coco,
    pr_curves,
    run_cocoeval,
    summarize,
)
from pipeline.runtime import Detector, InferenceError, Preprocessing, load_detector

log = get_logger("pipeline.evaluate")

GRID_CELL = 320  # pixels per tile of the predictions grid
# The keys of metrics.json (the DVC metric, kept to flat headline numbers so `dvc metrics show` stays
# readable); details.json holds the full metrics dict, per-class values included.
HEADLINE = ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "num_images", "num_detections")


class EvaluationInterrupted(Exception):
    """Raised from the SIGTERM/SIGINT handler of the entry point; ``exit_code`` = 128 + signal."""

    def __init__(self, signum: int):
        self.exit_code = 128 + signum
        super().__init__(f"evaluation stopped by {signal.Signals(signum).name} before it finished; no metrics.json "
                         "was written by this run (it is written last, so a metrics.json on disk is always "
                         "complete). Run the same command again")


def _interrupt(signum: int, _frame) -> None:
    raise EvaluationInterrupted(signum)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    path = Path(cfg.data.prepared_dir) / f"{split}.json"
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
        from pipeline.data.transforms import read_image

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
def evaluate_detector(detector: Detector, cfg: Config, out_dir: str | Path | None = None,
                      split: str = "val") -> dict[str, Any]:
    """Run ``detector`` on the prepared ``split`` (val, or eval.split for the evaluate stage) and score it; with
    ``out_dir`` also write the artefacts.

    Returns the metrics dict (same on every rank).
    """
    gt_path = split_json(cfg, split)
    gt = json.loads(gt_path.read_text())
    class_names = class_names_of(gt)
    check_classes(detector, class_names, gt_path)
    dets = detect_split(detector, gt, gt_path.parent, cfg)
    metrics = None
    if dist.is_main():
        coco = load_coco(gt)
        ev = run_cocoeval(coco, dets)
        metrics = summarize(ev, class_names)
        metrics.update(num_images=len(gt["images"]), num_detections=len(dets), model=str(detector.path),
                       backend=detector.backend, input_size=list(detector.preprocessing.input_size))
        if not dets:
            log.warning("no detections above eval.score_thr=%s on %d images: all metrics are 0",
                        cfg.eval.score_thr, len(gt["images"]))
        if out_dir is not None:
            write_artifacts(Path(out_dir), coco, gt_path.parent, dets, ev, metrics, class_names, cfg)
    return dist.broadcast_object(metrics)


def write_artifacts(out_dir: Path, coco, json_dir: Path, dets: list[dict], ev, metrics: dict,
                    class_names: list[str], cfg: Config) -> None:
    from pipeline import viz

    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # an old one must not describe the new outputs
    write_atomic(out_dir / "detections.json", json.dumps(dets))
    curves = pr_curves(ev, class_names, iou=0.5)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["class", "recall", "precision"])
    for name, c in curves.items():
        writer.writerows([name, f"{r:.4f}", f"{p:.6f}"] for r, p in zip(c["recall"], c["precision"]))
    write_atomic(out_dir / "pr_curves.csv", buf.getvalue())
    viz.plot_pr_curves(curves, figures / "pr_curves.png")
    per_dets, per_gts = per_image_from_coco(coco, dets)
    e = cfg.eval
    matrix = confusion_matrix(per_dets, per_gts, len(class_names), e.confusion_iou, e.confusion_score)
    write_atomic(out_dir / "confusion_matrix.json", json.dumps({
        "classes": class_names + ["background"], "rows": "ground truth", "columns": "predicted",
        "iou_thr": e.confusion_iou, "score_thr": e.confusion_score, "matrix": matrix.tolist()}, indent=1))
    viz.plot_confusion_matrix(matrix, class_names, figures / "confusion_matrix.png")
    write_prediction_grid(coco, json_dir, per_dets, per_gts, class_names, e.num_vis_images, e.confusion_score,
                          figures / "predictions.png")
    write_atomic(out_dir / "details.json", json.dumps(metrics, indent=2))
    headline = {k: metrics[k] for k in HEADLINE}
    write_atomic(out_dir / "metrics.json", json.dumps(headline, indent=2))  # last: marks the set complete
    log.info("wrote metrics, curves, confusion matrix and predictions to %s", out_dir)


def write_prediction_grid(coco, json_dir: Path, per_dets: list[dict], per_gts: list[dict], class_names: list[str],
                          num: int, score_thr: float, path: Path) -> None:
    """The first ``num`` images (by id): ground truth green, predictions with score >= score_thr."""
    import cv2

    from pipeline import viz
    from pipeline.data.transforms import read_image, write_image

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
    """Evaluate ``checkpoint`` (default ``eval.checkpoint``; .pt or .onnx) and write ``eval.out_dir``."""
    device = dist.select_device(cfg.train.device)
    dist.init_distributed(device, cfg.train.dist_timeout_s)
    path = Path(checkpoint or cfg.eval.checkpoint)
    if dist.is_main():
        check_out_dir(Path(cfg.eval.out_dir))
    gt_path = split_json(cfg, cfg.eval.split)  # a missing split stops before the model is loaded
    # onnxruntime gets torch's thread count (1 per rank under torchrun) instead of every core
    detector = load_detector(path, device=device, input_size=cfg.data.input_size, threads=torch.get_num_threads())
    log.info("evaluating %s (%s) at %s on %s", path, detector.backend, list(cfg.data.input_size), gt_path)
    metrics = evaluate_detector(detector, cfg, out_dir=cfg.eval.out_dir, split=cfg.eval.split)
    log.info("mAP %.4f AP50 %.4f AP75 %.4f (%d images, %d detections)", metrics["mAP"], metrics["AP50"],
             metrics["AP75"], metrics["num_images"], metrics["num_detections"])
    return metrics


@hydra_entry("evaluate")
def main(cfg: Config) -> int:
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        evaluate_model(cfg)
    except EvaluationInterrupted as err:
        log.error("%s", err)
        return err.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        dist.cleanup()
    return 0


if __name__ == "__main__":
    main()
