"""Pictures for people: boxes on images (OpenCV), an image grid, PR curves and a confusion matrix
(matplotlib with the Agg backend, so it works on headless machines)."""
from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

GT_COLOR = (0, 200, 0)  # BGR green for ground truth; predictions get per-class colours


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per class (golden-ratio hue walk)."""
    h = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def draw_boxes(img_bgr: np.ndarray, boxes: Any, labels: Any, class_names: Sequence[str],
               scores: Any | None = None, color: tuple[int, int, int] | None = None,
               thickness: int = 2) -> np.ndarray:
    """Copy of ``img_bgr`` (HxWx3 uint8) with xyxy ``boxes`` [k,4] (image pixels) and captions.

    ``color`` None -> one colour per class; captions are "name score" (or "name" without scores).
    """
    out = np.ascontiguousarray(img_bgr.copy())
    boxes, labels = _np(boxes).reshape(-1, 4), _np(labels).reshape(-1).astype(int)
    scores = None if scores is None else _np(scores).reshape(-1)
    scale = max(0.35, min(out.shape[:2]) / 800)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        c = color or class_color(label)
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), c, thickness)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = name if scores is None else f"{name} {scores[i]:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 2 if y1 - th - base >= 0 else y1 + th + 2
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw, ty + base // 2), c, -1)
        cv2.putText(out, text, (x1, ty - base // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return out


def draw_gt_and_pred(img_bgr: np.ndarray, gt: dict, pred: dict, class_names: Sequence[str]) -> np.ndarray:
    """Ground truth in green (thin), predictions in class colours with scores on top."""
    out = draw_boxes(img_bgr, gt["boxes"], gt["labels"], class_names, color=GT_COLOR, thickness=1)
    return draw_boxes(out, pred["boxes"], pred["labels"], class_names, scores=pred["scores"])


def make_grid(images: Sequence[np.ndarray], cols: int = 4, cell: int = 320) -> np.ndarray:
    """Tile BGR images into one picture; each is letterboxed into a ``cell`` x ``cell`` square."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    grid = np.full((rows * cell, cols * cell, 3), 40, dtype=np.uint8)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        s = cell / max(h, w)
        nh, nw = max(1, int(h * s)), max(1, int(w * s))
        small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        r, c = divmod(i, cols)
        y0, x0 = r * cell + (cell - nh) // 2, c * cell + (cell - nw) // 2
        grid[y0:y0 + nh, x0:x0 + nw] = small
    return grid


def _pyplot():
    import matplotlib  # matplotlib is slow to import: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib is slow to import: only when a figure is drawn

    return plt


def plot_pr_curves(curves: dict[str, dict], path: str | Path, title: str = "Precision-recall, IoU 0.5") -> None:
    """One line per class from :func:`pipeline.infer.metrics.pr_curves`; AP50 in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    for k, (name, c) in enumerate(curves.items()):
        ap = float(np.mean(c["precision"]))
        b, g, r = class_color(k)
        ax.plot(c["recall"], c["precision"], label=f"{name} (AP50 {ap:.3f})", color=(r / 255, g / 255, b / 255))
    if not curves:
        ax.text(0.5, 0.5, "no detections / no ground truth", ha="center", va="center")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> None:
    """Row-normalised colours with raw counts written in the cells; last row/column = background."""
    plt = _pyplot()
    names = list(class_names) + ["background"]
    n = len(names)
    rows = matrix.sum(1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = max(4.0, 0.55 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="ground truth", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
