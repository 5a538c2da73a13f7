"""Prediction on images, folders and videos (``python -m pipeline.predict predict.source=PATH
[predict.checkpoint=model.pt|model.onnx]`` runs :func:`run_predict`).

PATH is an image, a folder of images (searched recursively) or a video. The model runs through the
same preprocessing and decoder as evaluation (pipeline.infer.runtime). Writes to ``predict.out_dir``:

    predictions.json    [{"image", "bbox" [x, y, w, h] original pixels, "score", "category_id", "category"}]
    images/<relpath>    annotated copies (predict.save_images)
    <video>.mp4 / .json annotated video and per-frame detections [{"frame", "detections": [...]}]
    summary.json        counts and the files that could not be read

An unreadable image is reported by name and skipped; the command then exits 1 at the end.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pipeline import dist
from pipeline.config import Config, ConfigError
from pipeline.data.transforms import boxes_to_original, read_image, write_image
from pipeline.data.validate import DataError
from pipeline.infer.runtime import Detector, InferenceError, load_detector
from pipeline.infer.viz import draw_boxes
from pipeline.logging import get_logger

log = get_logger("pipeline.predict")

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


def list_images(source: Path) -> list[Path]:
    """The image files under a folder (recursive, sorted) or the single file given."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise InferenceError(f"predict.source={source} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
        return files
    return [source]


def detect_image(detector: Detector, img_bgr: np.ndarray, score_thr: float, iou_thr: float,
                 max_dets: int) -> list[dict[str, Any]]:
    """Detections of one BGR image in its own pixels: dicts bbox [x, y, w, h], score, category_id, category."""
    chw, matrix = detector.preprocessing(img_bgr)
    det = detector.detect(chw[None], score_thr, iou_thr, max_dets)[0]
    boxes = boxes_to_original(det.boxes.numpy().astype(np.float64), matrix, img_bgr.shape[:2])
    out = []
    for (x1, y1, x2, y2), score, label in zip(boxes, det.scores.tolist(), det.labels.tolist()):
        out.append({"bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score),
                    "category_id": int(label) + 1, "category": detector.class_names[int(label)]})
    return out


def draw(img_bgr: np.ndarray, dets: list[dict], class_names: list[str]) -> np.ndarray:
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]).reshape(-1, 4)
    labels = np.array([d["category_id"] - 1 for d in dets], dtype=int)
    return draw_boxes(img_bgr, boxes, labels, class_names, scores=np.array([d["score"] for d in dets]))


def predict_images(detector: Detector, files: list[Path], root: Path, out_dir: Path, thr: tuple,
                   save_images: bool) -> tuple[list[dict], list[str]]:
    results, failed = [], []
    for path in files:
        try:
            img = read_image(path)
        except DataError as err:
            log.error("%s", err)
            failed.append(str(path))
            continue
        dets = detect_image(detector, img, *thr)
        results += [{"image": str(path), **d} for d in dets]
        if save_images:
            rel = path.relative_to(root) if root.is_dir() else Path(path.name)
            target = out_dir / "images" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write_image(target, draw(img, dets, detector.class_names))
    return results, failed


def predict_video(detector: Detector, path: Path, out_dir: Path, thr: tuple, save_images: bool) -> int:
    """Annotated ``<stem>.mp4`` and per-frame ``<stem>.json``; returns the number of frames."""
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise InferenceError(f"cannot open video '{path}' (missing, truncated or unsupported codec)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer, frames = None, []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            dets = detect_image(detector, frame, *thr)
            frames.append({"frame": len(frames), "detections": dets})
            if save_images:
                if writer is None:
                    h, w = frame.shape[:2]
                    writer = cv2.VideoWriter(str(out_dir / f"{path.stem}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                writer.write(draw(frame, dets, detector.class_names))
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if not frames:
        raise InferenceError(f"video '{path}' has no readable frames")
    (out_dir / f"{path.stem}.json").write_text(json.dumps(frames))
    return len(frames)


def run_predict(cfg: Config) -> dict[str, Any]:
    """Run ``predict`` as configured; returns the summary (also written to summary.json)."""
    p = cfg.predict
    if not p.source:
        raise ConfigError("predict.source is not set: pass an image, a folder or a video, e.g. "
                          "`python -m pipeline.predict predict.source=photo.jpg`")
    source = Path(p.source)
    if not source.exists():
        raise InferenceError(f"predict.source={source} does not exist")
    device = dist.select_device(cfg.train.device)
    detector = load_detector(p.checkpoint or cfg.eval.checkpoint, device=device, threads=torch.get_num_threads())
    thr = (cfg.eval.score_thr if p.score_thr is None else p.score_thr, cfg.eval.iou_thr, cfg.eval.max_dets)
    out_dir = Path(p.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"model": str(detector.path), "backend": detector.backend, "source": str(source),
                               "score_thr": thr[0], "out_dir": str(out_dir)}
    if source.is_file() and source.suffix.lower() in VIDEO_EXTS:
        summary.update(kind="video", frames=predict_video(detector, source, out_dir, thr, p.save_images),
                       failed=[])
    else:
        files = list_images(source)
        results, failed = predict_images(detector, files, source, out_dir, thr, p.save_images)
        (out_dir / "predictions.json").write_text(json.dumps(results, indent=1))
        summary.update(kind="images", images=len(files) - len(failed), detections=len(results), failed=failed)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("predict: %s -> %s (%s)", source, out_dir, ", ".join(f"{k}={summary[k]}" for k in
                                                                    ("kind", "images", "frames", "detections")
                                                                    if k in summary))
    return summary
