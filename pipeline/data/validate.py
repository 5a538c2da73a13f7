"""Dataset validation: every problem is either fatal (``DataError`` naming the file / id / line and
what to do) or fixed, counted and listed in the prepare report. Nothing is dropped silently.

Severities:
* ``fatal``   -- raised at once (duplicate image ids, empty split, unreadable annotation file ...);
* ``warning`` -- fixed (box clipped, annotation or image dropped) and counted; ``data.strict=true``
  turns all warnings of a run into one ``DataError`` listing them;
* ``info``    -- facts worth knowing that need no fix (images without boxes, crowd boxes, sizes filled).

Decisions (documented here because they change data):
* image size: the decoded file is the truth (OpenCV applies the EXIF orientation, so a rotated JPEG
  swaps width and height); an annotated size that differs is replaced by the real one and counted,
  boxes are kept as annotated and then clipped to the real size;
* boxes: NaN/inf, not 4 numbers, or width/height <= 0 -> dropped; partly outside the image -> clipped;
  narrower or lower than 1 px after clipping (official CocoDataset rule) -> dropped;
* crowd (``iscrowd``/``ignore``/VOC ``difficult``) boxes are kept with ``iscrowd=1``: COCO evaluation
  ignores them and the training loader leaves them out (as the official code does).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.errors import UserError
from pipeline.logging import get_logger

log = get_logger("data.validate")

MAX_EXAMPLES = 50  # messages kept per issue code in the report (counts are always exact)


class DataError(UserError, ValueError):
    """A dataset problem that stops preparation; the message names the file/id/line and the fix."""


class Issues:
    """Collector of validation findings, grouped by code."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.severity: dict[str, str] = {}
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.dropped: Counter[tuple[str, str]] = Counter()  # (split, class) -> boxes of classes not configured

    def _add(self, code: str, severity: str, message: str, count: int) -> None:
        self.counts[code] += count
        self.severity[code] = severity
        if len(self.examples[code]) < MAX_EXAMPLES:
            self.examples[code].append(message)
        if severity == "warning" and self.counts[code] <= 3:
            log.warning("%s", message)

    def warn(self, code: str, message: str, count: int = 1) -> None:
        self._add(code, "warning", message, count)

    def info(self, code: str, message: str, count: int = 1) -> None:
        self._add(code, "info", message, count)

    @staticmethod
    def fatal(message: str) -> None:
        raise DataError(message)

    def num(self, severity: str) -> int:
        return sum(n for c, n in self.counts.items() if self.severity[c] == severity)

    def summary(self) -> list[dict]:
        """[{code, severity, count, examples}] sorted warnings first, for report.json."""
        order = {"warning": 0, "info": 1}
        codes = sorted(self.counts, key=lambda c: (order[self.severity[c]], c))
        return [{"code": c, "severity": self.severity[c], "count": self.counts[c],
                 "examples": self.examples[c]} for c in codes]

    def raise_if_strict(self) -> None:
        if not self.strict or not self.num("warning"):
            return
        lines = [f"  [{c}] x{self.counts[c]}: {self.examples[c][0]}" for c in self.counts
                 if self.severity[c] == "warning"]
        raise DataError(f"data.strict=true and the data has {self.num('warning')} warning(s):\n" + "\n".join(lines)
                        + "\nFix the data, or set data.strict=false to accept the listed fixes.")


# ---------------------------------------------------------------------------------- image header
# PIL modes that the loader (cv2 IMREAD_COLOR) converts: reported as "image_converted" (info)
CONVERTED_MODES = {"1": "1-bit -> 3-channel 8-bit", "L": "grayscale -> 3 channels",
                   "LA": "grayscale + alpha -> 3 channels, alpha dropped", "RGBA": "alpha channel dropped",
                   "I;16": "16-bit -> 8-bit (value / 256)", "I;16B": "16-bit -> 8-bit (value / 256)",
                   "I": "32-bit integer -> 8-bit", "F": "float -> 8-bit", "CMYK": "CMYK -> BGR"}


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as OpenCV will decode it (EXIF orientation applied)."""
    return image_header(path)[:2]


def image_header(path: Path) -> tuple[int, int, str]:
    """(width, height, PIL mode) of the image as OpenCV will decode it (EXIF orientation applied).

    Reads the header only (and decodes JPEG/PNG files whose end marker is missing, to catch truncation).
    Raises OSError / ValueError when the file is not a readable image.
    """
    with Image.open(path) as im:
        w, h, mode = *im.size, im.mode
        try:
            orientation = im.getexif().get(274, 1)
        except Exception:  # noqa: BLE001 -- a broken EXIF block does not make the pixels unreadable
            orientation = 1
        if _tail_missing(path, im.format):
            # OpenCV decodes a truncated JPEG/PNG without an error (the missing part grey): only a full
            # decode tells; PIL raises OSError "image file is truncated" here
            im.load()
    return (h, w, mode) if orientation in (5, 6, 7, 8) else (w, h, mode)


def _tail_missing(path: Path, fmt: str | None) -> bool:
    """True when a JPEG lacks its end marker (FF D9) or a PNG its IEND chunk at the end of the file: the
    cheap sign of a truncated file (trailing zero/whitespace padding is tolerated)."""
    ends = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}.get(fmt or "")
    if ends is None:
        return False
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - 1024))
        tail = fh.read().rstrip(b"\x00\r\n\t ")
    return not tail.endswith(ends)


# ----------------------------------------------------------------------------------- validation
def _check_images(raw_images: list[dict], n_boxes: Counter, split: str, issues: Issues) -> dict[int, dict]:
    """Resolve, open and size every image; returns {image id: clean image dict} of the kept ones."""
    seen: dict[int, str] = {}
    by_file: dict[str, int] = {}
    kept: dict[int, dict] = {}
    for im in raw_images:
        iid, where = im["id"], im.get("where", "?")
        if not isinstance(iid, int) or isinstance(iid, bool):
            issues.fatal(f"{split}: image id {iid!r} ({where}) is not an integer; COCO image ids must be integers")
        if iid in seen:
            issues.fatal(f"{split}: duplicate image id {iid}: '{seen[iid]}' and '{im['file_name']}' ({where}); "
                         "image ids must be unique -- renumber the images in the annotation file")
        seen[iid] = im["file_name"]
        path = Path(im["path"]) if im.get("path") else None
        if path is None or not path.is_file():
            tried = ", ".join(str(t) for t in im.get("tried", [path]))
            issues.warn("image_missing", f"{split}: image id {iid} '{im['file_name']}' ({where}) not found "
                        f"(tried: {tried}); dropped with its {n_boxes[iid]} box(es). Fix the path or data.root.")
            continue
        try:
            real_w, real_h, mode = image_header(path)
        except Exception as err:  # noqa: BLE001 -- PIL raises several types for bad files
            issues.warn("image_unreadable", f"{split}: image id {iid} '{path}' cannot be read as an image "
                        f"({type(err).__name__}: {err}); dropped with its {n_boxes[iid]} box(es). Re-encode or remove it.")
            continue
        if mode in CONVERTED_MODES:
            issues.info("image_converted", f"{split}: image id {iid} '{path}' is {mode}: {CONVERTED_MODES[mode]} "
                        "when loaded (OpenCV IMREAD_COLOR)")
        ann_w, ann_h = im.get("width"), im.get("height")
        if ann_w is None or ann_h is None:
            issues.info("size_filled", f"{split}: image id {iid} '{path}' has no size in the annotations; "
                        f"using the file's {real_w}x{real_h}")
        elif (int(ann_w), int(ann_h)) != (real_w, real_h):
            hint = (" (width and height swapped: the file probably has an EXIF rotation, which OpenCV applies)"
                    if (int(ann_w), int(ann_h)) == (real_h, real_w) else "")
            issues.warn("size_mismatch", f"{split}: image id {iid} '{path}': annotation says {ann_w}x{ann_h} but "
                        f"the file is {real_w}x{real_h}{hint}; using the real size, boxes kept as annotated and "
                        "clipped. If the image was resized after labelling, rescale its boxes.")
        key = str(path.resolve())
        if key in by_file:
            issues.warn("duplicate_file", f"{split}: '{path}' is listed twice (image ids {by_file[key]} and {iid}); "
                        "both kept, so its boxes count twice. Remove one entry.")
        by_file[key] = iid
        kept[iid] = {"id": iid, "file_name": str(path), "width": real_w, "height": real_h}
    return kept


def _clean_box(bbox: Any, w: int, h: int, where: str, split: str, issues: Issues) -> list[float] | None:
    """[x, y, w, h] clipped to the image, or None (dropped, counted)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        issues.warn("bbox_malformed", f"{split}: {where}: bbox {bbox!r} is not 4 numbers [x, y, w, h]; dropped")
        return None
    try:
        x, y, bw, bh = (float(v) for v in bbox)
    except (TypeError, ValueError):
        issues.warn("bbox_malformed", f"{split}: {where}: bbox {bbox!r} has a non-numeric value; dropped")
        return None
    if not all(math.isfinite(v) for v in (x, y, bw, bh)):
        issues.warn("bbox_nonfinite", f"{split}: {where}: bbox {bbox!r} has NaN or inf; dropped")
        return None
    if bw <= 0 or bh <= 0:
        issues.warn("bbox_nonpositive", f"{split}: {where}: bbox {bbox!r} has width or height <= 0; dropped")
        return None
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
    if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
        if x2 <= x1 or y2 <= y1:
            issues.warn("bbox_outside", f"{split}: {where}: bbox {bbox!r} lies outside the {w}x{h} image; dropped")
            return None
        issues.warn("bbox_clipped", f"{split}: {where}: bbox {bbox!r} exceeds the {w}x{h} image; clipped to "
                    f"[{x1:g}, {y1:g}, {x2 - x1:g}, {y2 - y1:g}]")
    if x2 - x1 < 1 or y2 - y1 < 1:
        issues.warn("bbox_too_small", f"{split}: {where}: bbox {bbox!r} is narrower or lower than 1 px "
                    "(after clipping); dropped")
        return None
    return [x1, y1, x2 - x1, y2 - y1]


def validate_split(raw: dict, class_names: Sequence[str], split: str, issues: Issues) -> dict:
    """Check and fix one split read by ``pipeline.data.formats``; returns a COCO dict.

    ``raw``: {"images": [{id, file_name, path, width?, height?, where, tried?}],
    "annotations": [{image_id, category (name or None when the reader already reported it),
    bbox [x, y, w, h] pixels or bbox_norm [cx, cy, w, h] in 0..1, iscrowd, where}]}. Output categories have ids 1..C in ``class_names`` order;
    ``images[].file_name`` are absolute paths; annotation ids are renumbered 1..n.
    """
    if not raw["images"]:
        issues.fatal(f"{split}: the split has no images (source: {raw.get('source', '?')}); check data.root and "
                     "the annotation files")
    images = _check_images(raw["images"], Counter(a["image_id"] for a in raw["annotations"]), split, issues)
    if not images:
        first = raw["images"][0]
        tried = ", ".join(str(t) for t in first.get("tried", [first.get("path")]))
        issues.fatal(f"{split}: none of the {len(raw['images'])} images could be opened (first: "
                     f"'{first['file_name']}', looked for {tried}); "
                     + raw.get("hint", "data.root or the file paths are probably wrong"))
    cat_id = {name: k + 1 for k, name in enumerate(class_names)}
    all_ids = {im["id"] for im in raw["images"]}
    unknown_names: Counter[str] = Counter()
    annotations = []
    for ann in raw["annotations"]:
        where = ann.get("where", "?")
        image = images.get(ann["image_id"])
        if image is None:
            if ann["image_id"] not in all_ids:  # boxes of dropped images were counted with the image
                issues.warn("annotation_unknown_image", f"{split}: {where}: image_id {ann['image_id']} is not in "
                            "the image list; dropped")
            continue
        name = ann["category"]
        if name is None:
            continue  # the reader reported it (unknown category id / YOLO class index)
        if name not in cat_id:
            unknown_names[name] += 1
            continue
        bbox = ann.get("bbox")
        if "bbox_norm" in ann:  # YOLO: centre/size normalised by the (now known) real image size
            cx, cy, bw, bh = ann["bbox_norm"]
            w, h = image["width"], image["height"]
            bbox = [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]
        box = _clean_box(bbox, image["width"], image["height"], where, split, issues)
        if box is None:
            continue
        crowd = int(bool(ann.get("iscrowd", 0)))
        annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": cat_id[name],
                            "bbox": box, "area": box[2] * box[3], "iscrowd": crowd})
    for name, n in sorted(unknown_names.items()):
        issues.dropped[(split, name)] += n
        issues.warn("class_not_in_config", f"{split}: '{name}': {n} box(es) dropped (not in data.class_names "
                    f"{list(class_names)}). Add it to data.class_names (and model.num_classes) to train on it; "
                    "data.strict=true refuses such data.", count=n)
    coco = {"images": sorted(images.values(), key=lambda im: im["id"]), "annotations": annotations,
            "categories": [{"id": k + 1, "name": n, "supercategory": "object"} for k, n in enumerate(class_names)]}
    _check_content(coco, class_names, split, issues)
    return coco


def _check_content(coco: dict, class_names: Sequence[str], split: str, issues: Issues) -> None:
    """Split-level facts: no boxes at all (fatal for train), classes without boxes, empty images, crowd."""
    trainable = [a for a in coco["annotations"] if not a["iscrowd"]]
    if not trainable:
        msg = (f"{split}: no usable boxes in {len(coco['images'])} images (see the warnings above for what was "
               "dropped); check the class names and the annotation files")
        if split == "train":
            issues.fatal(msg)
        issues.warn("split_without_boxes", msg)
    per_class = Counter(a["category_id"] for a in trainable)
    for k, name in enumerate(class_names, start=1):
        if trainable and not per_class[k]:
            issues.warn("class_without_boxes", f"{split}: class '{name}' (data.class_names[{k - 1}]) has no boxes "
                        "in this split; the model cannot learn or be scored on it. Check the spelling or drop it.")
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    n_empty = sum(1 for im in coco["images"] if im["id"] not in with_boxes)
    if n_empty:
        issues.info("images_without_boxes", f"{split}: {n_empty} image(s) have no boxes; kept as background "
                    "(negatives)", count=n_empty)
    n_crowd = len(coco["annotations"]) - len(trainable)
    if n_crowd:
        issues.info("crowd_boxes", f"{split}: {n_crowd} crowd/ignore/difficult box(es) kept with iscrowd=1 (ignored "
                    "in training and by COCO evaluation)", count=n_crowd)


def check_splits(splits: dict[str, dict], issues: Issues) -> None:
    """Cross-split checks: the same image file in two splits leaks validation data into training."""
    files = {name: {im["file_name"] for im in coco["images"]} for name, coco in splits.items()}
    names = list(files)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(files[a] & files[b])
            if shared:
                issues.warn("split_overlap", f"{len(shared)} image(s) are in both '{a}' and '{b}' (first: "
                            f"'{shared[0]}'); validation scores will be optimistic. Make the splits disjoint.",
                            count=len(shared))
