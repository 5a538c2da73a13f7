"""Image reading, the one evaluation/export preprocessing, and the training augmentation.

Coordinates: boxes are ``[x1, y1, x2, y2]`` in pixels with corners on pixel edges; a 3x3 matrix ``M``
maps original-image pixels to network-input pixels (``p_net = M @ [x, y, 1]``), as the official
``warp_matrix`` does. Images are BGR uint8 as OpenCV reads them; networks get float32 CHW normalised
with the official BGR mean/std.

Training augmentation = the official ``ShapeTransform`` + ``color_aug_and_norm`` (spec section 10),
built from albumentations pieces:
* ``RandomShapeTransform`` (an albumentations ``DualTransform``): isotropic scale x per-axis stretch,
  horizontal flip, translation and the final resize composed into ONE matrix and ONE warp (one
  resampling, like the official code); boxes are warped by their 4 corners, then albumentations clips
  them and drops those under ``min_visibility`` / ``min_size``;
* brightness (+U(-b, b)·255, p=0.5), contrast (×U(c0, c1), p=0.5) as two ``RandomBrightnessContrast``,
  and saturation (HSV S × U(s0, s1), p=0.5) as ``HSVSaturation``, in the official order.
Differences from the official code, by design: colour ops work on uint8 so results are clipped to
0..255 (the official float pipeline never clips); the random numbers come from albumentations'
generators (seeded per worker) instead of Python's global ``random``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home at import otherwise

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.type_definitions import Targets

from pipeline.data.validate import DataError


def read_image(path: str | Path) -> np.ndarray:
    """BGR uint8 [H, W, 3]. Grayscale and alpha images become 3-channel; 16-bit is scaled to 8-bit.

    OpenCV's IMREAD_COLOR applies the EXIF orientation (JPEG, PNG), so sizes in annotations must be
    those of the rotated image; ``pipeline.prepare`` checks and reports this. The bytes are read by
    Python and decoded with ``cv2.imdecode`` (same decoder, same EXIF handling) because ``cv2.imread``
    crashes the process (segfault) on file names that are not valid UTF-8.
    """
    try:
        data = np.fromfile(Path(path), dtype=np.uint8)
    except OSError:
        data = np.zeros(0, np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        hint = "the file does not exist" if not Path(path).is_file() else "truncated or unsupported format"
        raise DataError(f"cannot read image '{path}' ({hint}); re-run `python -m pipeline.prepare` to re-validate "
                        "the data, or remove the image")
    return img


def write_image(path: str | Path, img: np.ndarray) -> None:
    """Encode ``img`` by the file extension and write it (any file name, see ``read_image``)."""
    ok, buf = cv2.imencode(Path(path).suffix or ".png", img)
    if not ok:
        raise ValueError(f"cannot encode an image as '{Path(path).suffix}' for '{path}'")
    buf.tofile(Path(path))


# ------------------------------------------------------------------------------------ matrices
def resize_matrix(src_wh: Sequence[float], dst_wh: Sequence[float], keep_ratio: bool) -> np.ndarray:
    """3x3 matrix mapping a src_w x src_h image onto dst_w x dst_h: stretch, or letterbox (uniform scale
    by the limiting side, centred) when keep_ratio."""
    (sw, sh), (dw, dh) = src_wh, dst_wh
    if not keep_ratio:
        return np.array([[dw / sw, 0, 0], [0, dh / sh, 0], [0, 0, 1]], np.float64)
    r = min(dw / sw, dh / sh)
    return np.array([[r, 0, (dw - sw * r) / 2], [0, r, (dh - sh * r) / 2], [0, 0, 1]], np.float64)


def warp_boxes(boxes: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Apply an affine 3x3 matrix to [k, 4] xyxy boxes via their 4 corners; returns the enclosing boxes."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return boxes.copy()
    corners = boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 2)  # (x1,y1) (x2,y1) (x2,y2) (x1,y2)
    pts = corners @ M[:2, :2].T + M[:2, 2]
    pts = pts.reshape(-1, 4, 2)
    return np.concatenate([pts.min(1), pts.max(1)], axis=1)


def normalize(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 HWC BGR -> float32 CHW, (img - mean) / std per BGR channel."""
    out = img.astype(np.float32)
    out -= np.asarray(mean, np.float32)
    out /= np.asarray(std, np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def preprocess(img_bgr: np.ndarray, input_size: Sequence[int], keep_ratio: bool, mean: Sequence[float],
               std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """THE preprocessing of evaluation, prediction and export: (float32 [3, h, w], M 3x3 float64).

    ``input_size`` is [w, h]. The warp uses M directly (bilinear, black border) exactly like the
    official validation pipeline; pixel (x, y) of the input lands at M @ (x, y, 1).
    """
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3 or img_bgr.dtype != np.uint8:
        raise ValueError(f"preprocess expects a uint8 HxWx3 BGR image, got {img_bgr.dtype} {img_bgr.shape}")
    h, w = img_bgr.shape[:2]
    dw, dh = int(input_size[0]), int(input_size[1])
    M = resize_matrix((w, h), (dw, dh), keep_ratio)
    warped = cv2.warpAffine(img_bgr, M[:2], (dw, dh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=(0, 0, 0))
    return normalize(warped, mean, std), M


def boxes_to_original(boxes: Any, M: Any, orig_hw: Sequence[int]) -> Any:
    """Map [k, 4] network-input boxes back to original-image pixels (clipped to the image).

    Accepts numpy arrays or torch tensors and returns the same type (torch keeps device and dtype).
    """
    h, w = int(orig_hw[0]), int(orig_hw[1])
    inv = np.linalg.inv(np.asarray(M, np.float64))
    if isinstance(boxes, torch.Tensor):
        out = warp_boxes(boxes.detach().cpu().double().numpy(), inv)
        out = np.clip(out, 0, [w, h, w, h])
        return torch.from_numpy(out).to(device=boxes.device, dtype=boxes.dtype)
    out = warp_boxes(np.asarray(boxes), inv)
    return np.clip(out, 0, [w, h, w, h]).astype(np.asarray(boxes).dtype if np.asarray(boxes).size else np.float32)


# ---------------------------------------------------------------------------- training transforms
class RandomShapeTransform(A.DualTransform):
    """Official ShapeTransform with perspective/rotation/shear 0: M = Resize·T·F·Str·Scl·C, one warp.

    C centres the image at the origin, Scl ~ U(scale) isotropic, Str ~ U(stretch) per axis, F mirrors x
    with prob ``flip``, T moves the centre to U(0.5 ± translate)·(W, H), Resize maps W x H onto the
    output size (stretch, or letterbox when keep_ratio). Set ``dst_size`` ([w, h]) before a call to
    change the output size (multi-scale training).
    """

    _targets = (Targets.IMAGE, Targets.BBOXES)

    def __init__(self, dst_size: Sequence[int], scale: Sequence[float] = (0.6, 1.4),
                 stretch: Sequence[float] = (0.8, 1.2), flip: float = 0.5, translate: float = 0.2,
                 keep_ratio: bool = False, p: float = 1.0):
        super().__init__(p=p)
        self.dst_size = (int(dst_size[0]), int(dst_size[1]))
        self.scale, self.stretch = tuple(scale), tuple(stretch)
        self.flip, self.translate, self.keep_ratio = flip, translate, keep_ratio

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        rnd = self.py_random
        C = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]], np.float64)
        s = rnd.uniform(*self.scale)
        S = np.diag([s * rnd.uniform(*self.stretch), s * rnd.uniform(*self.stretch), 1.0])
        F = np.diag([-1.0 if rnd.random() < self.flip else 1.0, 1.0, 1.0])
        t = self.translate
        T = np.array([[1, 0, rnd.uniform(0.5 - t, 0.5 + t) * w], [0, 1, rnd.uniform(0.5 - t, 0.5 + t) * h],
                      [0, 0, 1]], np.float64)
        matrix = resize_matrix((w, h), self.dst_size, self.keep_ratio) @ T @ F @ S @ C
        return {"matrix": matrix, "dst_size": self.dst_size}

    def apply(self, img: np.ndarray, matrix: np.ndarray, dst_size: tuple[int, int], **params: Any) -> np.ndarray:
        return cv2.warpAffine(img, matrix[:2], dst_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=(0, 0, 0))

    def apply_to_bboxes(self, bboxes: np.ndarray, matrix: np.ndarray, dst_size: tuple[int, int],
                        **params: Any) -> np.ndarray:
        """bboxes: [k, 4+] normalised to the input image; returns them normalised to the output (unclipped,
        so albumentations can measure visibility before clipping)."""
        if len(bboxes) == 0:
            return bboxes
        h, w = params["shape"][:2]
        dw, dh = dst_size
        px = bboxes[:, :4] * np.array([w, h, w, h])
        out = warp_boxes(px, matrix) / np.array([dw, dh, dw, dh])
        result = bboxes.copy()
        result[:, :4] = out
        return result

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return "dst_size", "scale", "stretch", "flip", "translate", "keep_ratio"


class HSVSaturation(A.ImageOnlyTransform):
    """Multiply the HSV saturation by U(lo, hi) (official ``_saturation``), uint8 in and out."""

    def __init__(self, saturation: Sequence[float] = (0.5, 1.2), p: float = 0.5):
        super().__init__(p=p)
        self.saturation = tuple(saturation)

    def get_params(self) -> dict[str, float]:
        return {"factor": self.py_random.uniform(*self.saturation)}

    def apply(self, img: np.ndarray, factor: float, **params: Any) -> np.ndarray:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[..., 1] = cv2.convertScaleAbs(hsv[..., 1], alpha=factor)  # saturating uint8 multiply
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("saturation",)


class TrainTransform:
    """Official training pipeline: shape transform, colour jitter, normalisation.

    ``__call__(img uint8 HxWx3 BGR, boxes [k,4] xyxy, labels [k], dst_size=None) ->
    (float32 [3, h, w], boxes float32 [k', 4], labels int64 [k'], M 3x3)``.
    """

    def __init__(self, augment: Any, input_size: Sequence[int], keep_ratio: bool, mean: Sequence[float],
                 std: Sequence[float], seed: int | None = None):
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean, self.std = list(mean), list(std)
        self.shape = RandomShapeTransform(self.input_size, augment.scale, augment.stretch, augment.flip,
                                          augment.translate, keep_ratio)
        b, (c0, c1) = augment.brightness, augment.contrast
        self.compose = A.Compose(
            [self.shape,
             A.RandomBrightnessContrast(brightness_limit=(-b, b), contrast_limit=(0.0, 0.0), p=0.5),
             A.RandomBrightnessContrast(brightness_limit=(0.0, 0.0), contrast_limit=(c0 - 1.0, c1 - 1.0), p=0.5),
             HSVSaturation(augment.saturation, p=0.5)],
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True,
                                     min_visibility=augment.min_visibility, min_width=augment.min_size,
                                     min_height=augment.min_size),
            seed=seed)

    def reseed(self, seed: int) -> None:
        """Give this copy its own random stream (called in each DataLoader worker)."""
        self.compose.set_random_seed(seed)

    def __call__(self, img: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                 dst_size: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self.shape.dst_size = tuple(int(v) for v in (dst_size or self.input_size))
        out = self.compose(image=img, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                           labels=np.asarray(labels, np.int64))
        M = self.shape.get_applied_params()["matrix"]
        boxes_out = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        labels_out = np.asarray(out["labels"], np.int64).reshape(-1)
        return normalize(out["image"], self.mean, self.std), boxes_out, labels_out, M
