"""Deterministic built-in detection dataset: filled shapes drawn with OpenCV on cluttered backgrounds.

No download: ``generate_dataset`` writes ``<out_dir>/images/<split>/NNNNNN.jpg`` and the COCO json
``<out_dir>/<split>.json`` (``file_name`` relative to the json's folder, so the folder is relocatable).

What makes it a detection task rather than a colour lookup:
* backgrounds are colour gradients with blotchy low-frequency texture, per-pixel noise, random lines,
  curves and thin rectangle outlines (clutter that is not a class);
* object colours are random (only the shape identifies the class), sizes span ~3% (10 px at 320) to
  45% of the short side (log-uniform within a small / medium / large mixture), aspect ratios and
  rotations vary;
* objects overlap (each keeps >= 50% of its pixels visible), some are cut by the image border,
  some images are crowded around a cluster centre, and ``empty_fraction`` of the images hold none.

Boxes are the tight bounds of each object's *visible* pixels, taken from an object-id map drawn
alongside the image, so they agree with the pixels whatever the occlusion or truncation.
Every image has its own ``numpy`` generator seeded from ``(seed, crc32(split), index)``: the same
arguments give identical files (same OpenCV build), and a different seed or split gives other images.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.validate import DataError

DEFAULT_CLASSES = ("circle", "triangle", "square", "star", "cross")
SHAPES = ("circle", "triangle", "square", "star", "cross", "diamond", "hexagon", "ring")
_ALIASES = {"rectangle": "square", "box": "square", "ellipse": "circle", "plus": "cross", "rhombus": "diamond"}
# (probability, min, max) of the object size as a fraction of the short side: at 320 px, small objects are
# ~10-19 px, medium 19-64 px, large 64-144 px. Tuned so the CPU demo (0.5x model, 192 px, 600 steps) learns.
_SIZE_MIX = ((0.12, 0.03, 0.06), (0.53, 0.06, 0.2), (0.35, 0.2, 0.45))
_MIN_VISIBLE = 0.5  # an object placement is rejected if it would hide more than half of another object
_JPEG_QUALITY = 92


def shapes_for(class_names: Sequence[str]) -> list[str]:
    """Map class names to drawable shapes: known names (or aliases) draw themselves, others take the
    unused shapes in order. Raises DataError when there are more classes than shapes."""
    if len(class_names) > len(SHAPES):
        raise DataError(f"the built-in dataset draws at most {len(SHAPES)} shape classes {list(SHAPES)}, but "
                        f"data.class_names has {len(class_names)}; use fewer classes or a real dataset")
    wanted = [_ALIASES.get(n.lower(), n.lower()) for n in class_names]
    taken = {w for w in wanted if w in SHAPES}
    free = [s for s in SHAPES if s not in taken]
    out = []
    for w in wanted:
        out.append(w if w in SHAPES and w not in out else free.pop(0))
    return out


# ------------------------------------------------------------------------------------ background
def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Gradient + low-frequency blotches + per-pixel colour noise, uint8 [h, w, 3] BGR."""
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    angle = rng.uniform(0, 2 * np.pi)
    cells = int(rng.integers(3, 9))  # texture computed on a coarse grid, upsampled (cheap, smooth)
    yy, xx = np.mgrid[0:cells, 0:cells] / (cells - 1)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    small = c0 * (1 - t[..., None]) + c1 * t[..., None] + rng.normal(0, rng.uniform(8, 30), (cells, cells, 3))
    img = cv2.resize(np.clip(small, 0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    noise = np.empty((h, w, 3), np.int16)
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))  # OpenCV's generator: fast and seeded per image
    cv2.randn(noise, 0, float(rng.uniform(2, 14)))
    return cv2.add(img, noise, dtype=cv2.CV_8U)  # saturating


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Thin lines, curves, rectangle outlines and dots: edges a detector must learn to ignore."""
    h, w = img.shape[:2]
    for _ in range(int(rng.integers(1, 7))):
        p, q = rng.integers(0, [w, h], 2), rng.integers(0, [w, h], 2)
        cv2.line(img, tuple(int(v) for v in p), tuple(int(v) for v in q), _color(rng), int(rng.integers(1, 3)),
                 cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 3))):
        pts = np.cumsum(rng.normal(0, max(w, h) * 0.08, (6, 2)), axis=0) + rng.uniform(0, [w, h])
        cv2.polylines(img, [pts.astype(np.int32)], False, _color(rng), 1, cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 3))):
        x, y = rng.integers(0, [w, h])
        bw, bh = rng.integers(6, max(8, w // 3)), rng.integers(6, max(8, h // 3))
        cv2.rectangle(img, (int(x), int(y)), (int(x + bw), int(y + bh)), _color(rng), 1)
    n_dots = int(rng.integers(0, 30))
    if n_dots:
        ys, xs = rng.integers(0, h, n_dots), rng.integers(0, w, n_dots)
        img[ys, xs] = rng.integers(0, 256, (n_dots, 3), dtype=np.uint8)


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _object_color(rng: np.random.Generator, local_mean: np.ndarray) -> tuple[int, int, int]:
    """A random colour that differs from the local background (sum of |diff| >= 150 over B, G, R)."""
    for _ in range(12):
        c = rng.integers(0, 256, 3)
        if np.abs(c - local_mean).sum() >= 150:
            return tuple(int(v) for v in c)
    return tuple(int(v) for v in 255 - local_mean.astype(np.int64))


# ----------------------------------------------------------------------------------------- shapes
def _unit_polygon(shape: str) -> np.ndarray:
    """Outline of a shape in the unit square [-1, 1]^2, [k, 2]."""
    if shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    if shape == "diamond":
        return np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float)
    if shape == "hexagon":
        a = np.deg2rad(np.arange(6) * 60)
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "star":
        a = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        t = 0.33
        return np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t],
                         [-1, t], [-1, -t], [-t, -t]], float)
    raise ValueError(shape)


def _rotation_range(shape: str) -> float:
    """Max |rotation| in degrees; squares and diamonds stay recognisable as such."""
    return {"square": 20.0, "diamond": 15.0}.get(shape, 180.0)


def _draw(canvas: np.ndarray, shape: str, cx: float, cy: float, bw: float, bh: float, angle: float,
          color, line_type: int) -> None:
    """Draw one filled shape of (unrotated) size bw x bh centred at (cx, cy) into canvas."""
    if shape in ("circle", "ring"):
        center, axes = (round(cx * 16), round(cy * 16)), (int(bw * 8), int(bh * 8))
        thick = -1 if shape == "circle" else max(1, int(min(bw, bh) * 0.22))
        cv2.ellipse(canvas, center, axes, angle, 0, 360, color, thick, line_type, 4)
        return
    pts = _unit_polygon(shape) * (bw / 2, bh / 2)
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = pts @ rot.T + (cx, cy)
    cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], color, line_type, 4)


def _sample_geometry(rng, shape: str, w: int, h: int, cluster: np.ndarray | None, min_px: float = 7.0):
    short = min(w, h)
    probs = [m[0] for m in _SIZE_MIX]
    _, lo, hi = _SIZE_MIX[int(rng.choice(len(_SIZE_MIX), p=probs))]
    size = float(np.exp(rng.uniform(np.log(lo * short), np.log(hi * short))))
    size = max(size, min_px)
    spread = 1.7 if shape == "square" else 1.3
    aspect = float(np.exp(rng.uniform(-np.log(spread), np.log(spread))))
    bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
    if cluster is not None:
        cx, cy = rng.normal(cluster, short * 0.12)
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    rmax = _rotation_range(shape)
    return float(cx), float(cy), float(bw), float(bh), float(rng.uniform(-rmax, rmax))


# ----------------------------------------------------------------------------------------- images
def render_image(rng: np.random.Generator, w: int, h: int, shapes: Sequence[str], max_objects: int,
                 empty: bool, min_object_px: float = 7.0) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image and its objects: (uint8 [h, w, 3] BGR, [(class index, [x1, y1, x2, y2]) ...]).

    Box corners are pixel edges: a box covering columns 3..5 is x1=3, x2=6.
    """
    img = _background(rng, w, h)
    _clutter(img, rng)
    if empty:
        return img, []
    ids = np.zeros((h, w), np.uint8)  # 0 = background, k = k-th placed object
    scratch = np.zeros((h, w), np.uint8)
    n_target = int(rng.integers(1, max_objects + 1))
    cluster = rng.uniform([0.25 * w, 0.25 * h], [0.75 * w, 0.75 * h]) if rng.random() < 0.3 else None
    placed: list[tuple[int, int, tuple]] = []  # (class index, full pixel count, rect x, y, w, h)
    visible = np.zeros(256, np.int64)  # visible pixel count per object id
    for _ in range(n_target * 4):  # bounded retries for rejected placements
        if len(placed) == n_target or len(placed) == 254:
            break
        cls = int(rng.integers(0, len(shapes)))
        geo = _sample_geometry(rng, shapes[cls], w, h, cluster, min_object_px)
        _draw(scratch, shapes[cls], *geo, 1, cv2.LINE_8)
        x, y, rw, rh = cv2.boundingRect(scratch)
        crop = scratch[y:y + rh, x:x + rw].view(bool)
        ids_crop = ids[y:y + rh, x:x + rw]
        area = int(crop.sum())
        covered = np.bincount(ids_crop[crop], minlength=256)
        n = len(placed)
        ok = area >= 12 and all(visible[k] - covered[k] >= _MIN_VISIBLE * placed[k - 1][1] for k in range(1, n + 1))
        if ok:
            local = img[y:y + rh, x:x + rw].reshape(-1, 3).mean(0)
            _draw(img, shapes[cls], *geo, _object_color(rng, local), cv2.LINE_AA)
            visible[:n + 1] -= covered[:n + 1]
            visible[n + 1] = area
            ids_crop[crop] = n + 1
            placed.append((cls, area, (x, y, rw, rh)))
        scratch[y:y + rh, x:x + rw] = 0
    objects = []
    for k, (cls, _area, (x, y, rw, rh)) in enumerate(placed, start=1):
        ys, xs = np.nonzero(ids[y:y + rh, x:x + rw] == k)
        if len(xs) == 0:
            continue
        x1, y1, x2, y2 = x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1
        if x2 - x1 >= 3 and y2 - y1 >= 3:  # slivers cut by the border are not labelled
            objects.append((cls, [float(x1), float(y1), float(x2), float(y2)]))
    return img, objects


def _empty_indices(num_images: int, empty_fraction: float, rng: np.random.Generator) -> set[int]:
    k = round(num_images * empty_fraction)
    return set(rng.permutation(num_images)[:k].tolist())


def generate_dataset(out_dir: str | Path, num_images: int, image_size: Sequence[int], seed: int,
                     class_names: Sequence[str] | None = None, max_objects: int = 8,
                     empty_fraction: float = 0.05, split_name: str = "train", min_object_px: float = 7.0) -> Path:
    """Write ``num_images`` images of size ``image_size`` = (width, height) and their COCO json.

    Returns the json path ``<out_dir>/<split_name>.json``. Category ids are 1..C in ``class_names``
    order (default: DEFAULT_CLASSES). ``min_object_px``: no object is drawn smaller than this (pixels).
    """
    w, h = int(image_size[0]), int(image_size[1])
    if w < 16 or h < 16:
        raise DataError(f"data.builtin.image_size={list(image_size)} is too small; use at least 16x16")
    if num_images < 1 or max_objects < 1 or not 0.0 <= empty_fraction <= 1.0:
        raise DataError(f"built-in dataset '{split_name}': need num_images >= 1 (got {num_images}), "
                        f"max_objects >= 1 (got {max_objects}), 0 <= empty_fraction <= 1 (got {empty_fraction})")
    names = list(class_names) if class_names else list(DEFAULT_CLASSES)
    shapes = shapes_for(names)
    out_dir = Path(out_dir)
    img_dir = out_dir / "images" / split_name
    img_dir.mkdir(parents=True, exist_ok=True)
    split_key = zlib.crc32(split_name.encode())
    empties = _empty_indices(num_images, empty_fraction, np.random.default_rng([seed, split_key]))
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_key, i])
        img, objects = render_image(rng, w, h, shapes, max_objects, i in empties, min_object_px)
        rel = f"images/{split_name}/{i + 1:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
        if not ok:
            raise DataError(f"OpenCV could not encode built-in image {rel}")
        (out_dir / rel).write_bytes(buf.tobytes())
        images.append({"id": i + 1, "file_name": rel, "width": w, "height": h})
        for cls, (x1, y1, x2, y2) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco = {"info": {"description": f"nanodet-pipeline built-in shapes, split {split_name}", "seed": seed},
            "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(names)]}
    json_path = out_dir / f"{split_name}.json"
    json_path.write_text(json.dumps(coco))
    return json_path
