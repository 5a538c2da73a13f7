"""Readers for COCO, YOLO-txt and Pascal VOC datasets, all converted to one in-memory layout.

Each reader returns ``(splits, class_names)`` where ``splits`` maps a split name (``train``, ``val``,
or ``all`` when the data has no split) to a *raw split*::

    {"source": str,
     "images": [{"id": int, "file_name": str (as written), "path": str (resolved) | None,
                 "width": int | None, "height": int | None, "where": str, "tried": [str]}],
     "annotations": [{"image_id": int, "category": str | None, "bbox": [x, y, w, h] pixels
                      (or "bbox_norm": [cx, cy, w, h] in 0..1 for YOLO), "iscrowd": 0 | 1, "where": str}]}

``category`` is None when the reader already reported the problem (unknown id / index). Format
problems are reported to ``Issues`` with the file and line; ``pipeline.data.validate.validate_split``
then checks images and boxes and builds the clean COCO dict.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.validate import DataError, Issues

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def prepared_json(cfg: Any, split: str) -> Path:
    """THE path of a prepared split: ``<data.prepared_dir>/<split>.json`` (written by pipeline.prepare)."""
    return Path(cfg.data.prepared_dir) / f"{split}.json"


def load_json(path: Path) -> dict:
    """Parse a json file; errors name the file and the line/column."""
    if not path.is_file():
        raise DataError(f"annotation file '{path}' does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"'{path}' is not valid json (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read '{path}': {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"'{path}' must hold a json object with 'images', 'annotations', 'categories'")
    return data


def _require_root(root: str | None, source: str) -> Path:
    if not root:
        raise DataError(f"data.source={source} needs data.root (the dataset folder)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root='{root}' is not a folder (source {source}); point it at the dataset")
    return path


# ------------------------------------------------------------------------------------------- COCO
def _coco_candidates(file_name: str, ann_path: Path, root: Path) -> list[Path]:
    """Where a COCO ``file_name`` may live: absolute, next to the json, under root, root/images, and the
    folder named after the annotation file (instances_train2017.json -> train2017)."""
    p = Path(file_name)
    if p.is_absolute():
        return [p]
    stem = ann_path.stem.split("_", 1)[-1]
    bases = [ann_path.parent, root, root / "images", root / stem, root / "images" / stem, ann_path.parent.parent / stem]
    out: list[Path] = []
    for b in bases:
        if b / p not in out:
            out.append(b / p)
    return out


def find_coco_annotation(root: Path, given: str | None, split: str) -> Path | None:
    """The annotation json of a split: ``given`` (relative to root or absolute), else a usual name."""
    if given:
        p = Path(given).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise DataError(f"data.{split}_ann='{given}' not found (looked at '{p}'); paths are relative to data.root")
        return p
    patterns = [f"annotations/instances_{split}*.json", f"annotations/{split}*.json", f"{split}.json",
                f"{split}/_annotations.coco.json", f"instances_{split}*.json"]
    for pattern in patterns:
        hits = sorted(root.glob(pattern))
        if hits:
            return hits[0]
    return None


def read_coco_split(ann_path: Path, root: Path, split: str, issues: Issues) -> tuple[dict, list[str]]:
    """One COCO annotation file -> (raw split, category names sorted by category id)."""
    data = load_json(ann_path)
    for key in ("images", "categories"):
        if key not in data:
            raise DataError(f"'{ann_path}' has no '{key}' list (keys: {sorted(data)}); a COCO detection file needs "
                            "'images', 'annotations' and 'categories'")
    cats = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"'{ann_path}': category entry {c!r} needs 'id' and 'name'")
        if c["name"] in cats.values():
            raise DataError(f"'{ann_path}': category name '{c['name']}' appears twice; names must be unique")
        cats[c["id"]] = str(c["name"])
    if "annotations" not in data:
        issues.warn("coco_no_annotations", f"'{ann_path}' has no 'annotations' list; all its images are treated "
                    "as background")
    images = []
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            issues.warn("image_malformed", f"'{ann_path}' images[{k}] = {im!r} lacks 'id' or 'file_name'; dropped")
            continue
        tried = _coco_candidates(str(im["file_name"]), ann_path, root)
        path = next((t for t in tried if t.is_file()), None)
        images.append({"id": im["id"], "file_name": str(im["file_name"]), "path": str(path) if path else None,
                       "width": im.get("width"), "height": im.get("height"), "tried": [str(t) for t in tried],
                       "where": f"{ann_path.name} images[{k}]"})
    annotations = []
    for k, a in enumerate(data.get("annotations") or []):
        where = f"{ann_path.name} annotation id {a.get('id', f'#{k}')} (image_id {a.get('image_id')})"
        if a.get("category_id") not in cats:
            issues.warn("unknown_category", f"{split}: {where}: category_id {a.get('category_id')!r} is not in the "
                        f"file's categories {sorted(cats)}; dropped")
            name = None
        else:
            name = cats[a["category_id"]]
        crowd = int(bool(a.get("iscrowd", 0)) or bool(a.get("ignore", 0)))
        annotations.append({"image_id": a.get("image_id"), "category": name, "bbox": a.get("bbox"),
                            "iscrowd": crowd, "where": where})
    names = [cats[i] for i in sorted(cats, key=lambda v: (str(type(v)), v))]
    return {"source": str(ann_path), "images": images, "annotations": annotations}, names


def read_coco(root: str | None, train_ann: str | None, val_ann: str | None,
              class_names: Sequence[str], issues: Issues) -> tuple[dict[str, dict], list[str]]:
    """COCO folder: data.train_ann (+ data.val_ann) relative to data.root, or the usual file names."""
    root_p = _require_root(root, "coco")
    train_path = find_coco_annotation(root_p, train_ann, "train")
    if train_path is None:
        found = sorted(str(p.relative_to(root_p)) for p in list(root_p.glob("*.json")) + list(root_p.glob("*/*.json")))
        raise DataError(f"no training annotation json found in data.root='{root}'; set data.train_ann (json files "
                        f"there: {found[:10] or 'none'})")
    splits = {}
    splits["train"], names = read_coco_split(train_path, root_p, "train", issues)
    val_path = find_coco_annotation(root_p, val_ann, "val")
    if val_path is not None and val_path != train_path:
        splits["val"], val_names = read_coco_split(val_path, root_p, "val", issues)
        if set(val_names) != set(names):
            issues.warn("category_sets_differ", f"categories of '{val_path}' {val_names} differ from those of "
                        f"'{train_path}' {names}; classes are matched by name")
    return splits, list(class_names) or names


# ------------------------------------------------------------------------------------------- YOLO
def yolo_class_names(root: Path, class_names: Sequence[str], issues: Issues) -> list[str]:
    """data.class_names, else classes.txt, else data.yaml ``names`` (list or {index: name})."""
    from_file, source = None, None
    if (root / "classes.txt").is_file():
        from_file = [ln.strip() for ln in (root / "classes.txt").read_text().splitlines() if ln.strip()]
        source = root / "classes.txt"
    elif (root / "data.yaml").is_file():
        try:
            names = (yaml.safe_load((root / "data.yaml").read_text()) or {}).get("names")
        except yaml.YAMLError as err:
            raise DataError(f"'{root / 'data.yaml'}' is not valid YAML: {err}") from None
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list):
            raise DataError(f"'{root / 'data.yaml'}' has no 'names' list; add one or set data.class_names")
        from_file, source = [str(n) for n in names], root / "data.yaml"
    if class_names:
        if from_file is not None and list(from_file) != list(class_names):
            issues.warn("yolo_names_differ", f"data.class_names {list(class_names)} differ from '{source}' "
                        f"{from_file}; using data.class_names (YOLO class index i = data.class_names[i])")
        return list(class_names)
    if from_file is None:
        raise DataError(f"YOLO data in '{root}' has no class names: set data.class_names, or write classes.txt "
                        "(one name per line) or data.yaml with a 'names' list in data.root")
    return from_file


def _yolo_layout(root: Path) -> dict[str, tuple[Path, Path]]:
    """{split: (images dir, labels dir)} for images/<split> + labels/<split>, <split>/images + <split>/labels,
    or a flat images/ + labels/ (split 'all')."""
    aliases = {"train": ("train",), "val": ("val", "valid", "validation")}
    layout = {}
    for split, names in aliases.items():
        for n in names:
            if (root / "images" / n).is_dir():
                layout[split] = (root / "images" / n, root / "labels" / n)
                break
            if (root / n / "images").is_dir():
                layout[split] = (root / n / "images", root / n / "labels")
                break
    if "train" in layout:
        return layout
    if (root / "images").is_dir():
        return {"all": (root / "images", root / "labels")}
    raise DataError(f"no YOLO layout found in data.root='{root}': expected images/train + labels/train (and "
                    "images/val + labels/val), train/images + train/labels, or a flat images/ + labels/")


def _parse_yolo_line(line: str, where: str, n_names: int, issues: Issues) -> tuple[int, list[float]] | None:
    """'cls cx cy w h' (or a polygon 'cls x1 y1 x2 y2 ...') -> (class index, [cx, cy, w, h]) or None."""
    fields = line.split()
    if len(fields) != 5 and not (len(fields) >= 7 and len(fields) % 2 == 1):
        issues.warn("yolo_fields", f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)} ({line!r}); "
                    "line dropped")
        return None
    try:
        cls_f, values = float(fields[0]), [float(v) for v in fields[1:]]
    except ValueError:
        issues.warn("yolo_not_number", f"{where}: non-numeric field in {line!r}; line dropped")
        return None
    if cls_f != int(cls_f) or not 0 <= cls_f < n_names:
        issues.warn("yolo_class_range", f"{where}: class index {fields[0]} is not an integer in 0..{n_names - 1} "
                    f"(there are {n_names} class names); line dropped")
        return None
    if len(values) > 4:  # segmentation polygon: use its bounding box
        xs, ys = values[0::2], values[1::2]
        values = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        issues.info("yolo_polygon", f"{where}: polygon label converted to its bounding box")
    if any(v > 1.0 + 1e-3 for v in values) or any(v < -1e-3 for v in values):
        issues.warn("yolo_not_normalised", f"{where}: values {values} are outside 0..1; YOLO boxes must be "
                    "normalised by the image size (pixel coordinates?). Read as normalised, then clipped/dropped.")
    return int(cls_f), values


def _read_yolo_dir(img_dir: Path, lbl_dir: Path, names: list[str], split: str, issues: Issues) -> dict:
    files = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    images, annotations, used_labels = [], [], set()
    for i, path in enumerate(files, start=1):
        label = lbl_dir / path.relative_to(img_dir).with_suffix(".txt")
        images.append({"id": i, "file_name": str(path), "path": str(path), "width": None, "height": None,
                       "where": str(path)})
        if not label.is_file():
            issues.info("yolo_no_label", f"{split}: no label file '{label}' for '{path}'; image used as background")
            continue
        used_labels.add(label.resolve())
        for n, line in enumerate(label.read_text(errors="replace").splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parsed = _parse_yolo_line(line, f"{label}:{n}", len(names), issues)
            if parsed is not None:
                annotations.append({"image_id": i, "category": names[parsed[0]], "bbox_norm": parsed[1],
                                    "iscrowd": 0, "where": f"{label}:{n}"})
    if lbl_dir.is_dir():
        for orphan in sorted(p for p in lbl_dir.rglob("*.txt") if p.resolve() not in used_labels):
            if orphan.name != "classes.txt":
                issues.warn("yolo_orphan_label", f"{split}: label file '{orphan}' has no image in '{img_dir}'; ignored")
    return {"source": str(img_dir), "images": images, "annotations": annotations}


def read_yolo(root: str | None, class_names: Sequence[str], issues: Issues) -> tuple[dict[str, dict], list[str]]:
    """YOLO txt layout (see ``_yolo_layout``); labels hold 'class cx cy w h' normalised to 0..1."""
    root_p = _require_root(root, "yolo")
    layout = _yolo_layout(root_p)
    names = yolo_class_names(root_p, class_names, issues)
    return {split: _read_yolo_dir(i, lbl, names, split, issues) for split, (i, lbl) in layout.items()}, names


# -------------------------------------------------------------------------------------------- VOC
def _voc_number(node: ET.Element | None, tag: str) -> float | None:
    text = node.findtext(tag) if node is not None else None
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _read_voc_xml(xml: Path, img_dir: Path, image_id: int, issues: Issues) -> tuple[dict, list[dict]] | None:
    try:
        tree = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as err:
        issues.warn("voc_parse_error", f"'{xml}' is not readable XML ({err}); image dropped")
        return None
    fname = (tree.findtext("filename") or "").strip()
    if fname and (img_dir / fname).is_file():
        path = img_dir / fname
    else:
        path = next((img_dir / (xml.stem + e) for e in IMAGE_EXTS if (img_dir / (xml.stem + e)).is_file()), None)
        if fname and path is not None:
            issues.info("voc_filename_fallback", f"'{xml}': <filename>{fname}</filename> not in '{img_dir}'; "
                        f"using '{path.name}'")
    size = tree.find("size")
    w, h = _voc_number(size, "width"), _voc_number(size, "height")
    if not w or not h:
        issues.warn("voc_no_size", f"'{xml}' has no valid <size><width>/<height>; the image file's size is used")
        w = h = None
    image = {"id": image_id, "file_name": fname or xml.stem, "path": str(path) if path else None,
             "width": int(w) if w else None, "height": int(h) if h else None, "where": str(xml),
             "tried": [str(img_dir / (fname or xml.stem + ".jpg"))]}
    anns = []
    for k, obj in enumerate(tree.findall("object")):
        where = f"{xml} object #{k}"
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        coords = [_voc_number(box, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        if not name or box is None or None in coords:
            issues.warn("voc_object_malformed", f"{where}: needs <name> and numeric <bndbox> xmin/ymin/xmax/ymax; "
                        "dropped")
            continue
        x1, y1, x2, y2 = coords  # used as written (no 1-based shift), like the official XMLDataset
        crowd = int((obj.findtext("difficult") or "0").strip() == "1")
        anns.append({"image_id": image_id, "category": name, "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": crowd,
                     "where": where})
    return image, anns


def _voc_lists(root: Path, ann_dir: Path, issues: Issues) -> dict[str, list[Path]]:
    sets = root / "ImageSets" / "Main"
    lists = {s: sets / f"{s}.txt" for s in ("train", "val")}
    if not lists["train"].is_file() and (sets / "trainval.txt").is_file():
        lists = {"all": sets / "trainval.txt"}
    out = {}
    for split, lst in lists.items():
        if not lst.is_file():
            continue
        xmls = []
        for n, line in enumerate(lst.read_text().splitlines(), start=1):
            stem = line.split()[0] if line.split() else ""
            if not stem:
                continue
            if (ann_dir / f"{stem}.xml").is_file():
                xmls.append(ann_dir / f"{stem}.xml")
            else:
                issues.warn("voc_imageset_missing", f"{lst}:{n}: '{stem}' has no '{ann_dir / (stem + '.xml')}'; skipped")
        out[split] = xmls
    if "train" not in out and "all" not in out:
        out = {"all": sorted(ann_dir.glob("*.xml"))}
    return out


def read_voc(root: str | None, class_names: Sequence[str], issues: Issues) -> tuple[dict[str, dict], list[str]]:
    """Pascal VOC: Annotations/*.xml + JPEGImages/ (+ ImageSets/Main/{train,val}.txt)."""
    root_p = _require_root(root, "voc")
    ann_dir, img_dir = root_p / "Annotations", root_p / "JPEGImages"
    for d in (ann_dir, img_dir):
        if not d.is_dir():
            raise DataError(f"VOC data.root='{root}' has no '{d.name}/' folder; expected Annotations/ and JPEGImages/")
    splits, seen = {}, set()
    next_id = 1
    for split, xmls in _voc_lists(root_p, ann_dir, issues).items():
        images, annotations = [], []
        for xml in xmls:
            parsed = _read_voc_xml(xml, img_dir, next_id, issues)
            next_id += 1
            if parsed is not None:
                images.append(parsed[0])
                annotations += parsed[1]
                seen.update(a["category"] for a in parsed[1])
        splits[split] = {"source": str(ann_dir), "images": images, "annotations": annotations}
    if not class_names:
        class_names = sorted(seen)
        issues.info("class_names_derived", f"data.class_names is empty: using the sorted object names of the VOC "
                    f"files {class_names}; set data.class_names to fix the order")
    return splits, list(class_names)
