"""Readers for COCO, YOLO-txt and Pascal VOC datasets, all converted to one in-memory layout.

Each reader returns ``(splits, class_names)`` where ``splits`` maps a split name (``train``, ``val``,
``test``, or ``all`` when the data has no train/val split) to a *raw split*::

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
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.validate import DataError, Issues

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# folder names that mean a split (Roboflow and Ultralytics exports say "valid")
SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
# where VOC images usually sit beside the annotation folder
VOC_IMAGE_DIRS = ("JPEGImages", "images", "Images", "imgs", "img", "jpegs", "JPEG")
YOLO_YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
SCAN_DEPTH = 3  # folder levels below data.root looked at by data.source=auto


# ------------------------------------------------------------------------------- auto detection
def scan_files(root: Path, max_depth: int = SCAN_DEPTH) -> list[Path]:
    """Files under ``root`` down to ``max_depth`` folder levels (hidden folders skipped), sorted."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth else []
        out += [Path(dirpath) / f for f in sorted(filenames)]
    return out


def _file_kinds(files: list[Path]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for f in files:
        ext = f.suffix.lower()
        kinds["images" if ext in IMAGE_EXTS else ext.lstrip(".") or "other"] += 1
    return kinds


def found_summary(root: Path) -> str:
    """'12 .xml, 1 .json, 0 .txt, 200 images (within 3 folder levels of data.root; folders: a/, b/)'."""
    files = scan_files(root)
    kinds = _file_kinds(files)
    dirs = sorted(p.name + "/" for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return (f"{kinds['xml']} .xml, {kinds['json']} .json, {kinds['txt']} .txt, {kinds['yaml'] + kinds['yml']} "
            f".yaml, {kinds['images']} images within {SCAN_DEPTH} folder levels of data.root (folders: "
            f"{', '.join(dirs[:12]) or 'none'}{' ...' if len(dirs) > 12 else ''})")


def is_coco_json(path: Path) -> bool:
    """True when the json file holds the keys "images" and "categories" (streamed, not parsed: COCO files can
    be hundreds of MB). "annotations" is optional (the reader warns when it is absent)."""
    needed = {b'"images"', b'"categories"'}
    tail = b""
    try:
        with open(path, "rb") as fh:
            while needed:
                chunk = fh.read(1 << 22)
                if not chunk:
                    break
                window = tail + chunk
                needed = {k for k in needed if k not in window}
                tail = window[-32:]
    except OSError:
        return False
    return not needed


def is_voc_xml(path: Path) -> bool:
    """True when the xml file starts (within its first 4 KB) an <annotation> element."""
    try:
        with open(path, "rb") as fh:
            return b"<annotation" in fh.read(4096)
    except OSError:
        return False


def find_yolo_yaml(root: Path) -> Path | None:
    """An Ultralytics dataset yaml in data.root: data.yaml (or data.yml, dataset.yaml)."""
    return next((root / n for n in YOLO_YAML_NAMES if (root / n).is_file()), None)


def detect_source(root: str | None, issues: Issues) -> str:
    """data.source=auto: coco (a json with images + categories), yolo (data.yaml or labels/*.txt) or voc (.xml
    files holding <annotation>), looked for within SCAN_DEPTH folder levels of data.root."""
    root_p = _require_root(root, "auto")
    files = scan_files(root_p)
    rel = lambda p: p.relative_to(root_p).as_posix()
    coco = [p for p in files if p.suffix.lower() == ".json" and is_coco_json(p)]
    yaml_file = find_yolo_yaml(root_p)
    labels = [p for p in files if p.suffix.lower() == ".txt" and "labels" in p.relative_to(root_p).parts[:-1]]
    xmls = [p for p in files if p.suffix.lower() == ".xml"]
    voc = [p for p in xmls[:50] if is_voc_xml(p)]
    found = {}
    if coco:
        found["coco"] = f"{len(coco)} COCO json file(s): {', '.join(rel(p) for p in coco[:3])}"
    if yaml_file is not None or labels:
        found["yolo"] = (f"'{rel(yaml_file)}'" if yaml_file is not None else
                         f"{len(labels)} label .txt file(s) under labels/ (first: {rel(labels[0])})")
    if voc:
        found["voc"] = f"{len(xmls)} .xml file(s) with <annotation> (first: {rel(voc[0])})"
    if not found:
        raise DataError(f"data.source=auto found no COCO, YOLO or VOC dataset in data.root='{root}': "
                        f"{found_summary(root_p)}. Looked for a COCO json with 'images' and 'categories', a YOLO "
                        "data.yaml or labels/*.txt, VOC .xml files with <annotation>. Point data.root at the dataset, "
                        "or set data.source=coco (data.train_ann, data.val_ann), data.source=yolo or data.source=voc "
                        "(data.ann_dir, data.img_dir)")
    if len(found) > 1:
        raise DataError(f"data.source=auto: data.root='{root}' fits several formats: "
                        + "; ".join(f"{k}: {v}" for k, v in found.items())
                        + f". Set data.source to one of {sorted(found)}")
    source = next(iter(found))
    issues.info("source_detected", f"data.source=auto: detected {source} ({found[source]})")
    return source


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
    for name in SPLIT_ALIASES[split]:
        patterns = [f"annotations/instances_{name}*.json", f"annotations/{name}*.json", f"{name}.json",
                    f"{name}/_annotations.coco.json", f"instances_{name}*.json"]
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
    if not isinstance(data["categories"], list) or not data["categories"]:
        raise DataError(f"'{ann_path}' has an empty or invalid 'categories' list ({data['categories']!r:.60}); a COCO "
                        "detection file needs one entry {\"id\": int, \"name\": str} per class in 'categories'")
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
              class_names: Sequence[str], issues: Issues, test_ann: str | None = None
              ) -> tuple[dict[str, dict], list[str]]:
    """COCO folder: data.train_ann (+ data.val_ann, data.test_ann) relative to data.root, or the usual names."""
    root_p = _require_root(root, "coco")
    train_path = find_coco_annotation(root_p, train_ann, "train")
    if train_path is None:
        found = sorted(str(p.relative_to(root_p)) for p in list(root_p.glob("*.json")) + list(root_p.glob("*/*.json")))
        raise DataError(f"no training annotation json found in data.root='{root}'; set data.train_ann (json files "
                        f"there: {found[:10] or 'none'})")
    splits = {}
    splits["train"], names = read_coco_split(train_path, root_p, "train", issues)
    used = {train_path}
    for split, given in (("val", val_ann), ("test", test_ann)):
        path = find_coco_annotation(root_p, given, split)
        if path is None or path in used:
            continue
        used.add(path)
        splits[split], other = read_coco_split(path, root_p, split, issues)
        if set(other) != set(names):
            issues.warn("category_sets_differ", f"categories of '{path}' {other} differ from those of "
                        f"'{train_path}' {names}; classes are matched by name")
    return splits, list(class_names) or names


# ------------------------------------------------------------------------------------------- YOLO
def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"'{path}' is not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read '{path}': {err}") from None
    return data if isinstance(data, dict) else {}


def yolo_class_names(root: Path, class_names: Sequence[str], issues: Issues) -> list[str]:
    """data.class_names, else classes.txt, else the data.yaml ``names`` (list or {index: name})."""
    from_file, source = None, None
    yaml_file = find_yolo_yaml(root)
    if (root / "classes.txt").is_file():
        from_file = [ln.strip() for ln in (root / "classes.txt").read_text().splitlines() if ln.strip()]
        source = root / "classes.txt"
    elif yaml_file is not None:
        names = _load_yaml(yaml_file).get("names")
        if isinstance(names, dict):
            try:
                names = [names[k] for k in sorted(names, key=int)]
            except (TypeError, ValueError):
                raise DataError(f"'{yaml_file}' names: the keys of {names!r:.80} must be class indices 0..n-1"
                                ) from None
        if not isinstance(names, list):
            raise DataError(f"'{yaml_file}' has no 'names' list; add one or set data.class_names")
        from_file, source = [str(n) for n in names], yaml_file
    if class_names:
        if from_file is not None and list(from_file) != list(class_names):
            issues.warn("yolo_names_differ", f"data.class_names {list(class_names)} differ from '{source}' "
                        f"{from_file}; using data.class_names (YOLO class index i = data.class_names[i])")
        return list(class_names)
    if from_file is None:
        raise DataError(f"YOLO data in '{root}' has no class names: set data.class_names, or write classes.txt "
                        "(one name per line) or data.yaml with a 'names' list in data.root")
    return from_file


def yolo_label_path(image: Path) -> Path:
    """The Ultralytics rule: the last 'images' folder of the path becomes 'labels', the suffix '.txt'; an image
    outside any 'images' folder has its label beside it."""
    parts = image.parts
    idx = max((i for i, part in enumerate(parts[:-1]) if part == "images"), default=None)
    if idx is None:
        return image.with_suffix(".txt")
    return Path(*parts[:idx], "labels", *parts[idx + 1:]).with_suffix(".txt")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def _yolo_layout(root: Path) -> dict[str, tuple[Path, Path]]:
    """{split: (images dir, labels dir)} for images/<split> + labels/<split>, <split>/images + <split>/labels,
    or a flat images/ + labels/ (split 'all')."""
    layout = {}
    for split, names in SPLIT_ALIASES.items():
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
        return {"all": (root / "images", root / "labels"), **({"test": layout["test"]} if "test" in layout else {})}
    raise DataError(f"no YOLO layout found in data.root='{root}': expected a data.yaml with train/val keys, "
                    "images/train + labels/train (and images/val + labels/val), train/images + train/labels, or a "
                    f"flat images/ + labels/ ({found_summary(root)})")


def _yaml_base(yaml_file: Path, spec: dict, issues: Issues) -> Path:
    """The dataset folder of a data.yaml: its ``path`` (absolute, or relative to the yaml's folder) when that
    exists, else the yaml's folder."""
    given = spec.get("path")
    if not given:
        return yaml_file.parent
    p = Path(str(given)).expanduser()
    for cand in ([p] if p.is_absolute() else [yaml_file.parent / p]):
        if cand.is_dir():
            return cand
    issues.info("yolo_path_ignored", f"'{yaml_file}' path: '{given}' is not a folder here; train/val/test are "
                f"resolved relative to '{yaml_file.parent}' instead")
    return yaml_file.parent


def _yaml_split_images(yaml_file: Path, base: Path, key: str, value: object) -> tuple[list[Path], list[Path]]:
    """(image files, folders given) of one data.yaml split entry: a folder of images, a .txt list of image paths
    (relative ones: to the list's folder, then to the dataset folder), or a list of those."""
    entries = value if isinstance(value, list) else [value]
    images: list[Path] = []
    folders: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise DataError(f"'{yaml_file}' {key}: {entry!r} is not a path; give a folder of images or a .txt list "
                            "of image paths (relative to the yaml's 'path')")
        p = Path(entry).expanduser()
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            images += _images_in(p)
            folders.append(p)
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(errors="replace").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                q = Path(line).expanduser()
                if not q.is_absolute():
                    q = next((c for c in (p.parent / q, base / q) if c.is_file()), p.parent / q)
                images.append(q)
        else:
            raise DataError(f"'{yaml_file}' {key}: '{entry}' not found (looked at '{p}'); give a folder of images or "
                            "a .txt list of image paths, relative to the yaml's 'path' (or the yaml's folder)")
    return images, folders


def _read_yolo_images(files: list[Path], names: list[str], split: str, issues: Issues, source: str,
                      label_dirs: Sequence[tuple[Path, Path]] = ()) -> dict:
    """Images and their labels (``yolo_label_path``); label files under ``label_dirs`` (image folder, label
    folder) without an image are counted as orphans."""
    images, annotations, used_labels = [], [], set()
    for i, path in enumerate(files, start=1):
        label = yolo_label_path(path)
        images.append({"id": i, "file_name": str(path), "path": str(path) if path.is_file() else None,
                       "width": None, "height": None, "where": str(path), "tried": [str(path)]})
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
    for img_dir, lbl_dir in label_dirs:
        if lbl_dir.is_dir() and lbl_dir.resolve() != img_dir.resolve():
            for orphan in sorted(p for p in lbl_dir.rglob("*.txt") if p.resolve() not in used_labels):
                if orphan.name != "classes.txt":
                    issues.warn("yolo_orphan_label", f"{split}: label file '{orphan}' has no image in '{img_dir}'; "
                                "ignored")
    return {"source": source, "images": images, "annotations": annotations}


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


def read_yolo(root: str | None, class_names: Sequence[str], issues: Issues) -> tuple[dict[str, dict], list[str]]:
    """YOLO txt data: an Ultralytics data.yaml (``path``, ``train``, ``val``, ``test``: folders of images or .txt
    lists of image paths; ``names``), else a folder layout (see ``_yolo_layout``). Labels are found by the
    images -> labels path rule and hold 'class cx cy w h' normalised to 0..1."""
    root_p = _require_root(root, "yolo")
    yaml_file = find_yolo_yaml(root_p)
    spec = _load_yaml(yaml_file) if yaml_file is not None else {}
    names = yolo_class_names(root_p, class_names, issues)
    if yaml_file is not None and any(spec.get(k) for k in SPLIT_ALIASES):
        base = _yaml_base(yaml_file, spec, issues)
        splits = {}
        for split in SPLIT_ALIASES:
            if not spec.get(split):
                continue
            files, folders = _yaml_split_images(yaml_file, base, split, spec[split])
            dirs = [(f, yolo_label_path(f / "x.jpg").parent) for f in folders]
            splits[split] = _read_yolo_images(files, names, split, issues, f"{yaml_file} {split}", dirs)
        if "train" not in splits:
            raise DataError(f"'{yaml_file}' has no 'train' entry (keys: {sorted(spec)}); add train: <folder or .txt "
                            "list of images> (and val:, test:)")
        return splits, names
    layout = _yolo_layout(root_p)
    return {split: _read_yolo_images(_images_in(i), names, split, issues, str(i), [(i, lbl)])
            for split, (i, lbl) in layout.items()}, names


# -------------------------------------------------------------------------------------------- VOC
def _voc_number(node: ET.Element | None, tag: str) -> float | None:
    text = node.findtext(tag) if node is not None else None
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _voc_image_dirs(xml_dir: Path, root: Path, img_dir: Path | None) -> list[Path]:
    """Folders where the image of an XML in ``xml_dir`` may be: data.img_dir, the XML's own folder, image
    folders beside it (JPEGImages/, images/ ...), the same under data.root, data.root itself."""
    dirs = [img_dir] if img_dir is not None else []
    dirs.append(xml_dir)
    for base in (xml_dir.parent, root):
        dirs += [base / n for n in VOC_IMAGE_DIRS]
    dirs.append(root)
    out: list[Path] = []
    for d in dirs:
        if d not in out and d.is_dir():
            out.append(d)
    return out or [img_dir or xml_dir.parent / "JPEGImages"]


def _read_voc_xml(xml: Path, img_dirs: list[Path], image_id: int, issues: Issues) -> tuple[dict, list[dict]] | None:
    try:
        tree = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as err:
        issues.warn("voc_parse_error", f"'{xml}' is not readable XML ({err}); image dropped")
        return None
    fname = (tree.findtext("filename") or "").strip()
    names = [fname, Path(fname).name] if fname else []
    path = next((d / n for n in names for d in img_dirs if (d / n).is_file()), None)
    if path is None:
        stems = dict.fromkeys([xml.stem, *(Path(n).stem for n in names)])
        path = next((d / (st + e) for st in stems for d in img_dirs for e in (*IMAGE_EXTS, *(x.upper() for x in
                     IMAGE_EXTS)) if (d / (st + e)).is_file()), None)
        if fname and path is not None:
            issues.info("voc_filename_fallback", f"'{xml}': <filename>{fname}</filename> not found; using "
                        f"'{path}' (same name stem)")
    size = tree.find("size")
    w, h = _voc_number(size, "width"), _voc_number(size, "height")
    if not w or not h:
        issues.warn("voc_no_size", f"'{xml}' has no valid <size><width>/<height>; the image file's size is used")
        w = h = None
    image = {"id": image_id, "file_name": fname or xml.stem, "path": str(path) if path else None,
             "width": int(w) if w else None, "height": int(h) if h else None, "where": str(xml),
             "tried": [str(d / (fname or xml.stem + ".jpg")) for d in img_dirs]}
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


def _sub_dir(root: Path, value: str, key: str) -> Path:
    p = Path(value).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.is_dir():
        raise DataError(f"{key}='{value}' is not a folder (looked at '{p}'); {key} is relative to data.root "
                        f"('{root}'): {found_summary(root)}")
    return p


def _voc_xml_files(root: Path, ann_dir: str | None, issues: Issues) -> tuple[list[Path], str]:
    """The annotation files and where they came from: data.ann_dir, else Annotations/, else every .xml with
    <annotation> under data.root."""
    if ann_dir:
        folder = _sub_dir(root, ann_dir, "data.ann_dir")
        return sorted(folder.glob("*.xml")), f"data.ann_dir='{ann_dir}'"
    if (root / "Annotations").is_dir():
        return sorted((root / "Annotations").glob("*.xml")), "Annotations/"
    xmls, other = [], []
    for p in sorted(root.rglob("*.xml")):
        (xmls if is_voc_xml(p) else other).append(p)
    if other:
        issues.info("voc_xml_ignored", f"{len(other)} .xml file(s) under data.root hold no <annotation> and were "
                    f"ignored (first: '{other[0]}')", count=len(other))
    dirs = sorted({p.parent.relative_to(root).as_posix() + "/" for p in xmls})
    return xmls, f"found under data.root in {', '.join(dirs[:6])}{' ...' if len(dirs) > 6 else ''}"


def _voc_imagesets(root: Path, xmls: list[Path], issues: Issues) -> dict[str, list[Path]] | None:
    """Splits from ImageSets/Main/{train,val,test}.txt (or trainval.txt) beside the annotation folder or in
    data.root; None when there are no such lists."""
    by_stem = {p.stem: p for p in xmls}
    candidates = ([xmls[0].parent.parent / "ImageSets" / "Main"] if xmls else []) + [root / "ImageSets" / "Main"]
    sets = next((c for c in candidates if any((c / f"{s}.txt").is_file() for s in ("train", "trainval", "val",
                                                                                       "test"))), None)
    if sets is None:
        return None
    lists = {s: sets / f"{s}.txt" for s in ("train", "val", "test")}
    if not lists["train"].is_file() and (sets / "trainval.txt").is_file():
        lists["all"] = sets / "trainval.txt"
        del lists["train"], lists["val"]
    out: dict[str, list[Path]] = {}
    for split, lst in lists.items():
        if not lst.is_file():
            continue
        out[split] = []
        for n, line in enumerate(lst.read_text().splitlines(), start=1):
            stem = line.split()[0] if line.split() else ""
            if not stem:
                continue
            if stem in by_stem:
                out[split].append(by_stem[stem])
            else:
                issues.warn("voc_imageset_missing", f"{lst}:{n}: '{stem}' has no annotation file '{stem}.xml'; "
                            "skipped")
    if "train" not in out and "all" not in out:
        return None
    listed = {p for ps in out.values() for p in ps}
    unlisted = [p for p in xmls if p not in listed]
    if unlisted:
        issues.info("voc_not_in_imageset", f"{len(unlisted)} annotation file(s) are in no list of '{sets}' and are "
                    f"not used (first: '{unlisted[0]}')", count=len(unlisted))
    return out


def _split_of_folder(xml: Path, root: Path) -> str | None:
    for part in reversed(xml.parent.relative_to(root).parts):
        for split, aliases in SPLIT_ALIASES.items():
            if part.lower() in aliases:
                return split
    return None


def read_voc(root: str | None, class_names: Sequence[str], issues: Issues, ann_dir: str | None = None,
             img_dir: str | None = None) -> tuple[dict[str, dict], list[str]]:
    """Pascal VOC XML in any layout: data.ann_dir (else Annotations/, else every .xml with <annotation> under
    data.root); each <filename> is looked for in data.img_dir, next to the XML, in JPEGImages/ or images/ beside
    it, then under data.root. Splits: ImageSets/Main/{train,val,test}.txt, else folders named train/val/test,
    else one pool ('all')."""
    root_p = _require_root(root, "voc")
    img_p = _sub_dir(root_p, img_dir, "data.img_dir") if img_dir else None
    xmls, where = _voc_xml_files(root_p, ann_dir, issues)
    if not xmls:
        raise DataError(f"no VOC annotation .xml files ({where}) in data.root='{root}': {found_summary(root_p)}. "
                        "Set data.ann_dir to the folder of the .xml files (relative to data.root), or data.source "
                        "to the data's format")
    groups = _voc_imagesets(root_p, xmls, issues)
    if groups is None:
        folder_splits = {p: _split_of_folder(p, root_p) for p in xmls} if not ann_dir else {}
        if folder_splits and all(folder_splits.values()) and "train" in folder_splits.values():
            groups = {s: [p for p in xmls if folder_splits[p] == s] for s in SPLIT_ALIASES
                      if s in folder_splits.values()}
        else:
            groups = {"all": xmls}
    splits, seen = {}, set()
    next_id = 1
    dir_cache: dict[Path, list[Path]] = {}
    for split, files in groups.items():
        images, annotations = [], []
        for xml in files:
            if xml.parent not in dir_cache:
                dir_cache[xml.parent] = _voc_image_dirs(xml.parent, root_p, img_p)
            parsed = _read_voc_xml(xml, dir_cache[xml.parent], next_id, issues)
            next_id += 1
            if parsed is not None:
                images.append(parsed[0])
                annotations += parsed[1]
                seen.update(a["category"] for a in parsed[1])
        splits[split] = {"source": f"{where} ({split})", "images": images, "annotations": annotations,
                         "hint": "set data.img_dir to the folder of the images (relative to data.root)"}
    if not class_names:
        class_names = sorted(seen)
        issues.info("class_names_derived", f"data.class_names is unset: using the sorted object names of the VOC "
                    f"files {class_names}; set data.class_names (and model.num_classes={len(class_names)}) to "
                    "choose or order the classes")
    return splits, list(class_names)
