"""The first DVC stage's work (``python -m pipeline.prepare`` runs :func:`prepare`). Reads (or generates) the data, validates it and
writes ``<data.prepared_dir>/``:

* ``train.json``, ``val.json`` (+ ``test.json`` when there is a test split) -- COCO, categories 1..C in class order, ``file_name`` relative to the
  json's folder when the image lies inside it (built-in data: relocatable) and absolute otherwise;
* ``classes.json`` -- {"class_names": [...], "category_ids": [1..C]};
* ``report.json`` -- counts per class, box size / aspect histograms, images without boxes, and every
  fix-up and warning (``pipeline.data.validate``); ``report.png`` -- the same as charts.

Splits come from the data (VOC ImageSets/Main, YOLO data.yaml train/val/test, COCO data.{train,val,test}_ann).
Without a validation split in the source, a seeded one is drawn (data.val_fraction, data.split_seed); with
data.test_fraction > 0 and no test split, a seeded test split is held out the same way.
``prepare(cfg)`` is the plain function that the entry point, the sweeps and the tests call.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.formats import (
    detect_source,
    prepared_json,
    read_coco,
    read_coco_split,
    read_voc,
    read_yolo,
)
from pipeline.data.generate import SHAPES, generate_dataset
from pipeline.data.validate import DataError, Issues, check_splits, validate_split
from pipeline.io import atomic_write
from pipeline.logging import get_logger

log = get_logger("prepare")

SPLITS = ("train", "val", "test")
SIZE_EDGES = [0, 8, 16, 32, 64, 128, 256, 100000]  # sqrt(box area) in pixels
ASPECT_EDGES = [-100.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 100.0]  # log2(width / height)


def builtin_class_names(cfg: Any) -> list[str]:
    """data.class_names, else the first model.num_classes built-in shapes."""
    if cfg.data.class_names:
        return list(cfg.data.class_names)
    n = int(cfg.model.num_classes)
    if n > len(SHAPES):
        raise DataError(f"the built-in dataset has at most {len(SHAPES)} classes {list(SHAPES)} but model.num_classes="
                        f"{n}; set model.num_classes<={len(SHAPES)} (e.g. experiment=demo) or use a real dataset")
    return list(SHAPES[:n])


def _generate_builtin(cfg: Any, out: Path, names: list[str], issues: Issues) -> dict[str, dict]:
    b = cfg.data.builtin
    splits = {}
    for split, count in (("train", b.num_train), ("val", b.num_val)):
        shutil.rmtree(out / "images" / split, ignore_errors=True)  # no stale images from a larger earlier run
        t0 = time.perf_counter()
        path = generate_dataset(out, int(count), list(b.image_size), int(b.seed), names, int(b.max_objects),
                                float(b.empty_fraction), split, float(b.min_object_px))
        dt = time.perf_counter() - t0
        issues.info("builtin_generated", f"{split}: generated {count} images of {list(b.image_size)} in {dt:.2f} s "
                    f"({count / max(dt, 1e-9):.0f} images/s)")
        splits[split], _ = read_coco_split(path, out, split, issues)
    return splits


def read_source(cfg: Any, issues: Issues) -> tuple[dict[str, dict], list[str], str]:
    """Raw splits, class names and the format read (data.source, or what data.source=auto detected); builtin
    generates into data.prepared_dir."""
    d = cfg.data
    if d.source == "builtin":
        names = builtin_class_names(cfg)
        return _generate_builtin(cfg, Path(d.prepared_dir), names, issues), names, "builtin"
    source = detect_source(d.root, issues) if d.source == "auto" else d.source
    if source == "coco":
        return (*read_coco(d.root, d.train_ann, d.val_ann, list(d.class_names), issues, test_ann=d.test_ann), source)
    if source == "yolo":
        return (*read_yolo(d.root, list(d.class_names), issues), source)
    if source == "voc":
        return (*read_voc(d.root, list(d.class_names), issues, ann_dir=d.ann_dir, img_dir=d.img_dir), source)
    raise DataError(f"data.source='{d.source}' is not one of builtin, auto, coco, yolo, voc")


def split_pool(raw: dict, val_fraction: float, seed: int, test_fraction: float = 0.0) -> tuple[dict, ...]:
    """Seeded split of one raw split (images and their annotations): (rest, val) or, with ``test_fraction`` > 0,
    (rest, val, test). ``val_fraction`` 0 draws no val part (when the data has its own)."""
    ids = sorted(im["id"] for im in raw["images"] if isinstance(im["id"], int))
    n_val = max(1, round(len(ids) * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(len(ids) * test_fraction)) if test_fraction > 0 else 0
    if len(ids) - n_val - n_test < 1:
        what = " and ".join(w for w, n in (("validation", n_val), ("test", n_test)) if n)
        raise DataError(f"cannot draw a {what} split ({n_val + n_test} image(s)) from the {len(ids)} image(s) of "
                        f"'{raw['source']}' and keep any for training; add images, lower data.val_fraction / "
                        "data.test_fraction, or give the data its own splits")
    order = np.asarray(ids)[np.random.default_rng(seed).permutation(len(ids))].tolist() if ids else []
    val_ids, test_ids = set(order[:n_val]), set(order[n_val:n_val + n_test])

    def part(keep) -> dict:
        return {**raw, "images": [im for im in raw["images"] if keep(im["id"])],
                "annotations": [a for a in raw["annotations"] if keep(a["image_id"])]}

    rest = part(lambda i: i not in val_ids and i not in test_ids)
    if test_fraction > 0:
        return rest, part(lambda i: i in val_ids), part(lambda i: i in test_ids)
    return rest, part(lambda i: i in val_ids)


def make_splits(raw_splits: dict[str, dict], d: Any, issues: Issues) -> dict[str, str]:
    """Turn the reader's splits into train / val (/ test) in place, drawing seeded ones where the data has none;
    returns {split: where it came from} for the report."""
    origin = {s: "data" for s in raw_splits if s != "all"}
    pool_name = "all" if "all" in raw_splits else "train"
    pool = raw_splits.pop(pool_name)
    need_val, need_test = "val" not in raw_splits, "test" not in raw_splits and float(d.test_fraction) > 0
    parts = split_pool(pool, float(d.val_fraction) if need_val else 0.0, int(d.split_seed),
                       float(d.test_fraction) if need_test else 0.0) if need_val or need_test else (pool,)
    raw_splits["train"] = parts[0]
    origin["train"] = ("data" if len(parts) == 1 else
                       f"data ({'the whole set' if pool_name == 'all' else 'its train split'}, less the drawn images)")
    if need_val:
        raw_splits["val"] = parts[1]
        origin["val"] = f"drawn: data.val_fraction={d.val_fraction}, data.split_seed={d.split_seed}"
    if need_test:
        raw_splits["test"] = parts[-1]
        origin["test"] = f"drawn: data.test_fraction={d.test_fraction}, data.split_seed={d.split_seed}"
    if need_val:
        issues.info("val_split_made", f"no validation split in the source: drew {len(parts[1]['images'])} of "
                    f"{len(pool['images'])} images (data.val_fraction={d.val_fraction}, data.split_seed={d.split_seed})")
    if need_test:
        issues.info("test_split_made", f"no test split in the source: drew {len(parts[-1]['images'])} of "
                    f"{len(pool['images'])} images (data.test_fraction={d.test_fraction}, "
                    f"data.split_seed={d.split_seed})")
    return {s: origin[s] for s in SPLITS if s in raw_splits}


# ---------------------------------------------------------------------------------------- report
def _hist(values: np.ndarray, edges: list[float]) -> dict:
    counts, _ = np.histogram(values, bins=np.asarray(edges, float))
    return {"edges": edges, "counts": counts.astype(int).tolist()}


def split_stats(coco: dict, class_names: list[str], input_size: list[int]) -> dict:
    """Counts and histograms of one clean split; net_* use the box size after resizing to input_size."""
    img_by_id = {im["id"]: im for im in coco["images"]}
    boxes = [a for a in coco["annotations"] if not a["iscrowd"]]
    wh = np.asarray([a["bbox"][2:] for a in boxes], float).reshape(-1, 2)
    scale = np.asarray([[input_size[0] / img_by_id[a["image_id"]]["width"],
                         input_size[1] / img_by_id[a["image_id"]]["height"]] for a in boxes], float).reshape(-1, 2)
    side, net_side = np.sqrt(wh.prod(1)), np.sqrt((wh * scale).prod(1))
    area = wh.prod(1)
    per_class = Counter(a["category_id"] for a in boxes)
    img_per_class = Counter(c for c, _ in {(a["category_id"], a["image_id"]) for a in boxes})
    with_boxes = {a["image_id"] for a in coco["annotations"]}
    return {
        "num_images": len(coco["images"]), "num_boxes": len(boxes),
        "num_crowd": len(coco["annotations"]) - len(boxes),
        "images_without_boxes": sum(1 for im in coco["images"] if im["id"] not in with_boxes),
        "boxes_per_class": {n: per_class[k] for k, n in enumerate(class_names, 1)},
        "images_per_class": {n: img_per_class[k] for k, n in enumerate(class_names, 1)},
        "coco_area": {"small": int((area < 32**2).sum()), "medium": int(((area >= 32**2) & (area < 96**2)).sum()),
                      "large": int((area >= 96**2).sum())},
        "box_size_hist": _hist(side, SIZE_EDGES), "net_box_size_hist": _hist(net_side, SIZE_EDGES),
        "aspect_log2_hist": _hist(np.log2(wh[:, 0] / wh[:, 1]) if len(wh) else wh[:, 0], ASPECT_EDGES),
        "image_sizes": [list(s) for s in Counter((im["width"], im["height"]) for im in coco["images"]).most_common(5)],
    }


def plot_report(report: dict, path: Path) -> None:
    """report.png: boxes per class, box sizes at network input, aspect ratios (one bar per split)."""
    import matplotlib  # matplotlib is slow to import: only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib is slow to import: only when a figure is drawn

    splits = report["splits"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = report["class_names"]
    x = np.arange(len(names))
    bw = 0.8 / max(1, len(splits))
    for k, (split, st) in enumerate(splits.items()):
        off = bw * k - 0.4 + bw / 2
        axes[0].bar(x + off, [st["boxes_per_class"][n] for n in names], width=bw, label=split)
        for ax, key, labels in ((axes[1], "net_box_size_hist", ["<8", "8-16", "16-32", "32-64", "64-128",
                                                                 "128-256", ">256"]),
                                (axes[2], "aspect_log2_hist", ["<1/4", "1/4-1/2", "1/2-0.7", "0.7-1.4", "1.4-2",
                                                               "2-4", ">4"])):
            counts = st[key]["counts"]
            ax.bar(np.arange(len(counts)) + off, counts, width=bw, label=split)
            ax.set_xticks(np.arange(len(counts)), labels, rotation=30)
    axes[0].set_xticks(x, names, rotation=30, ha="right")
    axes[0].set_title("boxes per class")
    axes[1].set_title(f"box size sqrt(w*h) at input {report['input_size']} (px)")
    axes[2].set_title("aspect ratio w/h")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------- prepare
def _relocatable(coco: dict, out: Path) -> dict:
    """file_name relative to the json folder when the image is inside it, absolute otherwise."""
    base = out.resolve()
    images = []
    for im in coco["images"]:
        p = Path(im["file_name"]).resolve()
        rel = p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p)
        images.append({**im, "file_name": rel})
    return {**coco, "images": images}


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    atomic_write(path, json.dumps(data, indent=indent))


def prepare(cfg: Any) -> dict:
    """Read / generate, validate, split and write the prepared dataset; returns the report dict."""
    t0 = time.perf_counter()
    d = cfg.data
    out = Path(d.prepared_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.prepared_dir={out} cannot be created ({err.strerror or err}: {err.filename}); "
                        "point data.prepared_dir to a writable folder") from None
    issues = Issues(strict=bool(d.strict))
    raw_splits, class_names, fmt = read_source(cfg, issues)
    if len(class_names) != int(cfg.model.num_classes):
        origin = "" if d.class_names else f" (data.class_names is unset: the classes come from the {fmt} data)"
        raise DataError(f"the data has {len(class_names)} classes {class_names} but model.num_classes="
                        f"{cfg.model.num_classes}{origin}; set model.num_classes={len(class_names)} (and "
                        f"data.class_names=[{','.join(class_names)}] to fix their order)")
    for msg in issues.examples.get("source_detected", []):
        log.info("%s", msg)
    if not d.class_names and fmt != "builtin":
        log.info("data.class_names is unset: using the %d class(es) of the %s data %s", len(class_names), fmt,
                 class_names)
    origin = make_splits(raw_splits, d, issues)
    clean = {split: validate_split(raw_splits[split], class_names, split, issues) for split in origin}
    check_splits(clean, issues)
    dropped = dropped_classes(issues)
    issues.raise_if_strict()
    stale = prepared_json(cfg, "test")
    if "test" not in clean and stale.exists():
        stale.unlink()  # a test.json of an earlier run must not be scored as if it belonged to this data
    for split, coco in clean.items():
        coco["info"] = {"description": f"prepared by pipeline.prepare from data.source={d.source} ({fmt})",
                        "split": split}
        _write_json(prepared_json(cfg, split), _relocatable(coco, out))
    _write_json(out / "classes.json", {"class_names": class_names, "category_ids": list(range(1, len(class_names) + 1))},
                indent=2)
    input_size = list(d.input_size)
    report = {"source": d.source, "format": fmt, "root": d.root, "prepared_dir": str(out), "class_names": class_names,
              "input_size": input_size, "strict": bool(d.strict), "split_origin": origin,
              "splits": {s: split_stats(c, class_names, input_size) for s, c in clean.items()},
              "classes_not_in_config": dropped,
              "num_warnings": issues.num("warning"), "issues": issues.summary(),
              "seconds": round(time.perf_counter() - t0, 3)}
    _write_json(out / "report.json", report, indent=2)
    plot_report(report, out / "report.png")
    counts = ", ".join(f"{s} {st['num_images']} images / {st['num_boxes']} boxes" for s, st in report["splits"].items())
    codes = ", ".join(f"{c}x{n}" for c, n in issues.counts.items() if issues.severity[c] == "warning")
    print(f"prepared {fmt} data -> {out}: {counts}, {len(class_names)} classes, "
          f"{report['num_warnings']} warning(s){' (' + codes + ')' if codes else ''}; see {out / 'report.json'}",
          flush=True)
    return report


def dropped_classes(issues: Issues) -> dict[str, dict[str, int]]:
    """{class: {split: boxes, ..., "total": boxes}} of the classes in the data but not in data.class_names, each
    also logged as one warning line "dog: 42 boxes dropped (not in data.class_names)"."""
    out: dict[str, dict[str, int]] = {}
    for (split, name), n in sorted(issues.dropped.items(), key=lambda kv: (kv[0][1], SPLITS.index(kv[0][0])
                                                                           if kv[0][0] in SPLITS else 9)):
        out.setdefault(name, {})[split] = n
    for name, per in out.items():
        per["total"] = sum(per.values())
        where = ", ".join(f"{s} {n}" for s, n in per.items() if s != "total")
        log.warning("%s: %d boxes dropped (not in data.class_names; %s)", name, per["total"], where)
    return out
