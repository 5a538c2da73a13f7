"""The corpus of malformed inputs used by test_bad_inputs.py and the README table (guarantees.py).

Every case starts from a small clean dataset (COCO, YOLO or VOC; classes cat and dog; 64x48 images; train
a/b/c, val v1/v2) and adds or breaks one thing. ``expect`` is ``error`` (``detail``: a regex the DataError
must match, naming the item), ``fixed`` (``detail``: {report code: count}) or ``ok``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

W, H = 64, 48
CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
INFO_CODES = {"image_converted", "size_filled", "images_without_boxes", "crowd_boxes", "yolo_polygon",
              "yolo_no_label", "voc_filename_fallback", "class_names_derived", "val_split_made",
              "builtin_generated", "category_sets_differ"}


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # the input, for the README table
    fmt: str  # coco | yolo | voc | auto (data.source=auto)
    build: Callable[[Path], list[str]]  # breaks the base dataset under root; returns extra overrides
    expect: str  # error | fixed | ok
    detail: object = None  # error: regex; fixed: {code: count}
    names: tuple[str, ...] = ()  # texts the report's messages for the expected codes must contain
    stage: str = "prepare"  # error raised by: prepare | load (the training dataset after a clean prepare)
    check: Callable[[list[dict]], None] | None = field(default=None, compare=False)


# ----------------------------------------------------------------------------------------- images
def image(path: Path, w: int = W, h: int = H, kind: str = "bgr", exif_orientation: int | None = None) -> Path:
    """A small picture (grey, one bright square) as ``kind``: bgr, gray, rgba, u16, cmyk, noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    img = np.full((h, w, 3), 90, np.uint8)
    img[h // 4: h // 2, w // 4: w // 2] = 220
    if kind == "noise":
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    if kind in ("cmyk",) or exif_orientation:
        pil = Image.fromarray(img[:, :, ::-1]).convert("CMYK" if kind == "cmyk" else "RGB")
        kwargs = {}
        if exif_orientation:
            exif = pil.getexif()
            exif[274] = exif_orientation
            kwargs["exif"] = exif.tobytes()
        pil.save(path, format="PNG" if path.suffix == ".png" else "JPEG", **kwargs)
        return path
    data = {"bgr": img, "noise": img, "gray": img[:, :, 0], "rgba": np.dstack([img, np.full((h, w), 128, np.uint8)]),
            "u16": img[:, :, 0].astype(np.uint16) * 257}[kind]
    ok, buf = cv2.imencode(path.suffix, data)
    assert ok, path
    buf.tofile(path)
    return path


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ----------------------------------------------------------------------------------- base datasets
BASE_TRAIN = [("a.jpg", [(1, [8, 8, 16, 16])]), ("b.jpg", [(2, [30, 10, 20, 20])]),
              ("c.jpg", [(1, [4, 20, 12, 12]), (2, [36, 20, 20, 20])])]
BASE_VAL = [("v1.jpg", [(1, [8, 8, 16, 16])]), ("v2.jpg", [(2, [30, 10, 20, 20])])]
COMMON = ["data.input_size=[64,64]", "data.num_workers=0", "data.batch_size=2", "data.eval_batch_size=2",
          "model=nanodet_plus_m_0.5x", "train.device=cpu"]


def _coco_split(root: Path, entries) -> dict:
    images, anns = [], []
    for i, (name, boxes) in enumerate(entries, start=1):
        image(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": W, "height": H})
        anns += [{"id": 10 * i + k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                 for k, (c, b) in enumerate(boxes)]
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in CATS]}


def _overrides(result: object) -> list[str]:
    """A change function's return value when it is a list of overrides (anything else: none)."""
    if isinstance(result, list) and all(isinstance(x, str) for x in result):
        return result
    return []


def coco(change: Callable[[Path, dict, dict], list[str] | None]) -> Callable[[Path], list[str]]:
    """A COCO case: ``change(root, train, val)`` edits the two dicts (and writes files); both jsons are
    written afterwards unless the change wrote them itself."""
    def build(root: Path) -> list[str]:
        train, val = _coco_split(root, BASE_TRAIN), _coco_split(root, BASE_VAL)
        extra = _overrides(change(root, train, val))
        for name, data in (("train.json", train), ("val.json", val)):
            if not (root / name).exists():
                (root / name).write_text(json.dumps(data))
        return ["data.source=coco", f"data.root={root}", "data.train_ann=train.json", "data.val_ann=val.json",
                "data.class_names=[cat,dog]", "model.num_classes=2", *extra]
    return build


def add_image(train: dict, root: Path, name: str, boxes=((1, [8, 8, 16, 16]),), w: int = W, h: int = H,
              write: Callable[[Path], object] | None = None, image_id: object = 10) -> dict:
    """Append image ``name`` (written by ``write`` or as a plain JPEG) with ``boxes`` to a COCO split."""
    if write is not None:
        write(root / "images" / name)
    elif write is None and name:
        image(root / "images" / name, w, h)
    entry = {"id": image_id, "file_name": name, "width": w, "height": h}
    train["images"].append(entry)
    for k, (c, b) in enumerate(boxes):
        train["annotations"].append({"id": 100 + k, "image_id": image_id, "category_id": c, "bbox": b, "iscrowd": 0})
    return entry


def add_box(train: dict, bbox, cat: int = 1, image_id: int = 1) -> None:
    train["annotations"].append({"id": 100, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0})


def yolo(change: Callable[[Path], list[str] | None], classes_txt: str | None = "cat\ndog\n",
         class_names: str = "[cat,dog]") -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        for split, entries in (("train", BASE_TRAIN), ("val", BASE_VAL)):
            for name, boxes in entries:
                image(root / "images" / split / name)
                lines = [f"{c - 1} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}"
                         for c, (x, y, w, h) in boxes]
                label = root / "labels" / split / (Path(name).stem + ".txt")
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("\n".join(lines) + "\n")
        if classes_txt is not None:
            (root / "classes.txt").write_text(classes_txt)
        extra = _overrides(change(root))
        names = [f"data.class_names={class_names}", "model.num_classes=2"] if class_names else ["model.num_classes=2"]
        return ["data.source=yolo", f"data.root={root}", *names, *extra]
    return build


def voc_xml(name: str, boxes, size: bool = True) -> str:
    objs = "".join(f"<object><name>{['cat', 'dog'][c - 1]}</name><difficult>0</difficult><bndbox><xmin>{x}</xmin>"
                   f"<ymin>{y}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
                   for c, (x, y, w, h) in boxes)
    size_xml = f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><filename>{name}</filename>{size_xml}{objs}</annotation>"


def voc(change: Callable[[Path], list[str] | None]) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        (root / "Annotations").mkdir(parents=True)
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for split, entries in (("train", BASE_TRAIN), ("val", BASE_VAL)):
            for name, boxes in entries:
                image(root / "JPEGImages" / name)
                (root / "Annotations" / f"{Path(name).stem}.xml").write_text(voc_xml(name, boxes))
            (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(Path(n).stem for n, _ in entries) + "\n")
        extra = _overrides(change(root))
        return ["data.source=voc", f"data.root={root}", "data.class_names=[cat,dog]", "model.num_classes=2", *extra]
    return build


def voc_add(root: Path, stem: str, xml: str, write_image: bool = True) -> None:
    if write_image:
        image(root / "JPEGImages" / f"{stem}.jpg")
    (root / "Annotations" / f"{stem}.xml").write_text(xml)
    append(root / "ImageSets" / "Main" / "train.txt", stem + "\n")


def prepare_case(case: Case, root: Path) -> list[str]:
    """Write the case's files under ``root``; returns the full override list (prepared_dir = root/prepared)."""
    root.mkdir(parents=True, exist_ok=True)
    overrides = [*COMMON, f"data.prepared_dir={root / 'prepared'}", *case.build(root)]
    if case.stage == "load":  # prepare cleanly with the base classes first, then load with the case's config
        from pipeline.config import compose
        from pipeline.prepare import prepare

        prepare(compose([o for o in overrides if not o.startswith(("data.class_names=[cat,bird]",))]
                        + ["data.class_names=[cat,dog]"]))
    return overrides


# ------------------------------------------------------------------------------------------ checks
def check_loading(cfg, prepared: Path) -> list[dict]:
    """Load every image of both prepared splits (evaluation preprocessing and training augmentation):
    3x64x64 finite images, decoded size == the size in the prepared json, boxes inside the input.
    Returns the evaluation items' metadata (with "boxes" and "image")."""
    from pipeline.data.dataset import DetectionDataset

    metas = []
    for split in ("train", "val"):
        coco = json.loads((prepared / f"{split}.json").read_text())
        sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
        for train in (False, True):
            ds = DetectionDataset(prepared / f"{split}.json", cfg, train=train, seed=0)
            assert len(ds) == len(coco["images"])
            for i in range(len(ds)):
                img, boxes, labels, meta = ds[i]
                assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and torch.isfinite(img).all()
                assert tuple(meta["orig_size"]) == sizes[meta["image_id"]], (meta, sizes[meta["image_id"]])
                assert boxes.shape[0] == labels.shape[0] and ((boxes >= 0) & (boxes <= 64)).all(), boxes
                if not train:
                    metas.append({**meta, "boxes": boxes, "image": img})
    return metas


def big_image_box(metas: list[dict]) -> None:
    """The 8000x6000 image's box [4000, 3000, 800, 600] maps to [32, 32, 38.4, 38.4] at 64x64."""
    big = next(m for m in metas if m["orig_size"] == (6000, 8000))
    torch.testing.assert_close(big["boxes"], torch.tensor([[32.0, 32.0, 38.4, 38.4]]), rtol=0, atol=1e-4)


def not_black(metas: list[dict]) -> None:
    """The converted image still shows its picture (grey background, bright square), not zeros."""
    img = next(m for m in metas if m["file"].endswith(("x.png", "x.jpg")))["image"]
    assert img.std() > 0.1, img.std()


def _u16(p: Path) -> None:
    image(p, kind="u16")


def _png_as_jpg(p: Path) -> None:
    _, buf = cv2.imencode(".png", np.full((H, W, 3), 120, np.uint8))
    buf.tofile(p)


def _truncated(kind: str, suffix: str) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        image(p.with_suffix(suffix), 256, 192, kind="noise")
        truncate(p.with_suffix(suffix))
    return write


NON_UTF8 = os.fsdecode(b"caf\xe9")  # a file name that is not valid UTF-8 (latin-1 'café')


def _non_utf8_pair(root: Path) -> None:
    image(root / "images" / "train" / f"{NON_UTF8}.png")
    (root / "labels" / "train" / f"{NON_UTF8}.txt").write_text("1 0.5 0.5 0.3 0.3\n")

CASES: list[Case] = [
    # ------------------------------------------------------------------ image files (COCO)
    Case("truncated_jpeg", "JPEG cut at 60% of its bytes", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.jpg", w=256, h=192, write=_truncated("noise", ".jpg")) and None),
         "fixed", {"image_unreadable": 1}, ("x.jpg", "truncated")),
    Case("truncated_png", "PNG cut at 60% of its bytes", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.png", w=256, h=192, write=_truncated("noise", ".png")) and None),
         "fixed", {"image_unreadable": 1}, ("x.png",)),
    Case("png_with_alpha", "RGBA PNG", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.png", write=lambda p: image(p, kind="rgba")) and None),
         "fixed", {"image_converted": 1}, ("x.png", "alpha"), check=not_black),
    Case("grayscale_jpeg", "single-channel JPEG", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.jpg", write=lambda p: image(p, kind="gray")) and None),
         "fixed", {"image_converted": 1}, ("x.jpg", "grayscale"), check=not_black),
    Case("png_16bit", "16-bit grayscale PNG", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.png", write=_u16) and None),
         "fixed", {"image_converted": 1}, ("x.png", "16-bit"), check=not_black),
    Case("cmyk_jpeg", "CMYK JPEG", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.jpg", write=lambda p: image(p, kind="cmyk")) and None),
         "fixed", {"image_converted": 1}, ("x.jpg", "CMYK"), check=not_black),
    Case("exif_rotated_jpeg", "JPEG stored 64x48 with EXIF orientation 6, annotated as displayed (48x64)", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.jpg", ((1, [5, 40, 20, 20]),), w=H, h=W,
                                        write=lambda p: image(p, exif_orientation=6)) and None), "ok"),
    Case("exif_rotated_jpeg_stored_size", "EXIF-rotated JPEG annotated with its stored size (64x48)", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.jpg", ((1, [5, 20, 20, 20]),),
                                        write=lambda p: image(p, exif_orientation=6)) and None),
         "fixed", {"size_mismatch": 1}, ("x.jpg", "EXIF")),
    Case("exif_rotated_png", "PNG with an eXIf orientation 8 chunk, annotated as displayed", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.png", ((2, [5, 40, 20, 20]),), w=H, h=W,
                                        write=lambda p: image(p, exif_orientation=8)) and None), "ok"),
    Case("very_large_image", "8000x6000 PNG", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.png", ((1, [4000, 3000, 800, 600]),), w=8000, h=6000,
                                        write=lambda p: image(p, 8000, 6000)) and None), "ok", check=big_image_box),
    Case("png_named_jpg", "PNG bytes in a .jpg file", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.jpg", write=_png_as_jpg) and None), "ok"),
    Case("not_an_image", "text file named .jpg", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.jpg", write=lambda p: p.write_text("hello")) and None),
         "fixed", {"image_unreadable": 1}, ("x.jpg",)),
    Case("zero_byte_image", "empty .jpg file", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.jpg", write=lambda p: p.write_bytes(b"")) and None),
         "fixed", {"image_unreadable": 1}, ("x.jpg",)),
    Case("missing_file", "image listed but absent", "coco",
         coco(lambda r, t, v: add_image(t, r, "gone.jpg", write=lambda p: None) and None),
         "fixed", {"image_missing": 1}, ("gone.jpg", "image id 10")),
    Case("size_mismatch", "annotated 50x40, file 64x48", "coco",
         coco(lambda r, t, v: add_image(t, r, "x.jpg", write=lambda p: image(p)).update(width=50, height=40)),
         "fixed", {"size_mismatch": 1}, ("x.jpg", "50x40")),
    Case("duplicate_file_entry", "the same file under two image ids", "coco",
         coco(lambda r, t, v: t["images"].append({**t["images"][0], "id": 10})),
         "fixed", {"duplicate_file": 1}, ("image ids 1 and 10",)),
    Case("same_image_in_train_and_val", "one file in both splits", "coco",
         coco(lambda r, t, v: v["images"].append({**t["images"][0], "id": 10})),
         "fixed", {"split_overlap": 1}, ("a.jpg",)),
    # ------------------------------------------------------------------ boxes and categories (COCO)
    Case("zero_area_box", "bbox [5, 5, 0, 0]", "coco", coco(lambda r, t, v: add_box(t, [5, 5, 0, 0])),
         "fixed", {"bbox_nonpositive": 1}, ("annotation id 100",)),
    Case("negative_width", "bbox [5, 5, -3, 4]", "coco", coco(lambda r, t, v: add_box(t, [5, 5, -3, 4])),
         "fixed", {"bbox_nonpositive": 1}, ("annotation id 100",)),
    Case("nan_coordinate", "bbox [NaN, 5, 10, 10]", "coco", coco(lambda r, t, v: add_box(t, [float("nan"), 5, 10, 10])),
         "fixed", {"bbox_nonfinite": 1}, ("annotation id 100",)),
    Case("infinite_coordinate", "bbox [5, 5, Infinity, 10]", "coco",
         coco(lambda r, t, v: add_box(t, [5, 5, float("inf"), 10])), "fixed", {"bbox_nonfinite": 1}),
    Case("string_bbox", "bbox \"5,5,10,10\" (a string)", "coco", coco(lambda r, t, v: add_box(t, "5,5,10,10")),
         "fixed", {"bbox_malformed": 1}, ("annotation id 100",)),
    Case("string_coordinate", "bbox [5, 5, \"ten\", 10]", "coco", coco(lambda r, t, v: add_box(t, [5, 5, "ten", 10])),
         "fixed", {"bbox_malformed": 1}, ("annotation id 100",)),
    Case("bbox_three_numbers", "bbox [5, 5, 10]", "coco", coco(lambda r, t, v: add_box(t, [5, 5, 10])),
         "fixed", {"bbox_malformed": 1}),
    Case("box_outside_image", "bbox [100, 100, 10, 10] on 64x48", "coco", coco(lambda r, t, v: add_box(t, [100, 100, 10, 10])),
         "fixed", {"bbox_outside": 1}, ("annotation id 100",)),
    Case("box_partly_outside", "bbox [60, 40, 10, 10] on 64x48", "coco", coco(lambda r, t, v: add_box(t, [60, 40, 10, 10])),
         "fixed", {"bbox_clipped": 1}, ("annotation id 100",)),
    Case("sub_pixel_box", "bbox 0.5 px wide", "coco", coco(lambda r, t, v: add_box(t, [5, 5, 0.5, 4])),
         "fixed", {"bbox_too_small": 1}),
    Case("unknown_category", "category_id 99", "coco", coco(lambda r, t, v: add_box(t, [5, 5, 10, 10], cat=99)),
         "fixed", {"unknown_category": 1}, ("category_id 99",)),
    Case("annotation_of_unknown_image", "annotation with image_id 77", "coco",
         coco(lambda r, t, v: add_box(t, [5, 5, 10, 10], image_id=77)),
         "fixed", {"annotation_unknown_image": 1}, ("image_id 77",)),
    Case("class_name_mismatch", "data.class_names [cat, bird], data has cat and dog", "coco",
         coco(lambda r, t, v: ["data.class_names=[cat,bird]"]),
         "fixed", {"class_not_in_config": 3, "class_without_boxes": 2}, ("dog",)),
    Case("empty_categories", "train.json with \"categories\": []", "coco",
         coco(lambda r, t, v: t.update(categories=[])),
         "error", r"train\.json' has an empty or invalid 'categories' list"),
    Case("duplicate_image_ids", "two images with id 1", "coco",
         coco(lambda r, t, v: t["images"].append({**t["images"][1], "id": 1})),
         "error", r"duplicate image id 1: 'a.jpg' and 'b.jpg'"),
    Case("non_integer_image_id", "image id \"x1\"", "coco", coco(lambda r, t, v: t["images"][0].update(id="x1")),
         "error", r"image id 'x1' .* is not an integer"),
    Case("empty_annotation_file", "train.json of 0 bytes", "coco", coco(lambda r, t, v: (r / "train.json").write_text("")),
         "error", r"train\.json' is not valid json"),
    Case("invalid_json", "train.json with a syntax error", "coco",
         coco(lambda r, t, v: (r / "train.json").write_text('{"images": [}')),
         "error", r"train\.json' is not valid json \(line 1, column"),
    Case("json_list", "train.json holding a list", "coco", coco(lambda r, t, v: (r / "train.json").write_text("[]")),
         "error", r"train\.json' must hold a json object"),
    Case("missing_images_key", "train.json without 'images'", "coco", coco(lambda r, t, v: t.pop("images")),
         "error", r"train\.json' has no 'images' list"),
    Case("duplicate_category_name", "two categories named cat", "coco",
         coco(lambda r, t, v: t["categories"].append({"id": 3, "name": "cat"})),
         "error", r"train\.json': category name 'cat' appears twice"),
    Case("category_without_name", "category {\"id\": 3}", "coco", coco(lambda r, t, v: t["categories"].append({"id": 3})),
         "error", r"train\.json': category entry .*needs 'id' and 'name'"),
    Case("annotation_file_missing", "data.train_ann=nope.json", "coco", coco(lambda r, t, v: ["data.train_ann=nope.json"]),
         "error", r"data\.train_ann='nope\.json' not found"),
    Case("all_images_missing", "no image file exists", "coco",
         coco(lambda r, t, v: [p.unlink() for p in (r / "images").glob("[abc].jpg")] and None),
         "error", r"train: none of the 3 images could be opened \(first: 'a\.jpg'"),
    Case("no_usable_boxes", "every train box has an unknown category", "coco",
         coco(lambda r, t, v: [a.update(category_id=9) for a in t["annotations"]] and None),
         "error", r"train: no usable boxes in 3 images"),
    Case("strict_mode", "a box to clip, with data.strict=true", "coco",
         coco(lambda r, t, v: add_box(t, [60, 40, 10, 10]) or ["data.strict=true"]),
         "error", r"data\.strict=true and the data has 1 warning.*bbox_clipped"),
    Case("prepared_for_other_classes", "training with data.class_names [cat, bird] on data prepared for cat, dog",
         "coco", coco(lambda r, t, v: ["data.class_names=[cat,bird]"]),
         "error", r"train\.json' has classes \['cat', 'dog'\] but data\.class_names is \['cat', 'bird'\]", stage="load"),
    # ------------------------------------------------------------------ YOLO
    Case("yolo_wrong_field_count", "label line '0 0.5 0.5 0.2' (4 fields)", "yolo",
         yolo(lambda r: append(r / "labels" / "train" / "a.txt", "0 0.5 0.5 0.2\n")),
         "fixed", {"yolo_fields": 1}, ("a.txt:2",)),
    Case("yolo_non_numeric", "label line '0 0.5 x 0.2 0.2'", "yolo",
         yolo(lambda r: append(r / "labels" / "train" / "a.txt", "0 0.5 x 0.2 0.2\n")),
         "fixed", {"yolo_not_number": 1}, ("a.txt:2",)),
    Case("yolo_class_out_of_range", "class index 5 with 2 names", "yolo",
         yolo(lambda r: append(r / "labels" / "train" / "a.txt", "5 0.5 0.5 0.2 0.2\n")),
         "fixed", {"yolo_class_range": 1}, ("a.txt:2",)),
    Case("yolo_pixel_coordinates", "label in pixels '0 32 24 10 10'", "yolo",
         yolo(lambda r: append(r / "labels" / "train" / "a.txt", "0 32 24 10 10\n")),
         "fixed", {"yolo_not_normalised": 1, "bbox_outside": 1}, ("a.txt:2",)),
    Case("yolo_orphan_label", "label file without an image", "yolo",
         yolo(lambda r: (r / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n") and None),
         "fixed", {"yolo_orphan_label": 1}, ("ghost.txt",)),
    Case("yolo_names_differ", "classes.txt 'dog, cat' vs data.class_names [cat, dog]", "yolo",
         yolo(lambda r: None, classes_txt="dog\ncat\n"), "fixed", {"yolo_names_differ": 1}, ("classes.txt",)),
    Case("yolo_non_utf8_file_name", "image and label named b'caf\\xe9' (not UTF-8)", "yolo",
         yolo(_non_utf8_pair),
         "ok"),
    Case("yolo_yaml_split_missing", "data.yaml with val: images/nope (no such folder)", "yolo",
         yolo(lambda r: (r / "data.yaml").write_text("train: images/train\nval: images/nope\nnames: [cat, dog]\n")
              and None),
         "error", r"data\.yaml' val: 'images/nope' not found \(looked at"),
    Case("yolo_without_class_names", "no classes.txt, data.yaml or data.class_names", "yolo",
         yolo(lambda r: None, classes_txt=None, class_names=""), "error", r"has no class names: set data\.class_names"),
    # ------------------------------------------------------------------ Pascal VOC
    Case("voc_xml_without_size", "annotation without <size>", "voc",
         voc(lambda r: voc_add(r, "x", voc_xml("x.jpg", [(1, [8, 8, 16, 16])], size=False))),
         "fixed", {"voc_no_size": 1}, ("x.xml",)),
    Case("voc_malformed_xml", "annotation that is not XML", "voc", voc(lambda r: voc_add(r, "x", "<annotation><oops>")),
         "fixed", {"voc_parse_error": 1}, ("x.xml",)),
    Case("voc_object_without_bndbox", "<object> without <bndbox>", "voc",
         voc(lambda r: voc_add(r, "x", "<annotation><filename>x.jpg</filename><size><width>64</width><height>48"
                                       "</height></size><object><name>cat</name></object>"
                                       "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax>"
                                       "<ymax>20</ymax></bndbox></object></annotation>")),
         "fixed", {"voc_object_malformed": 1}, ("x.xml object #0",)),
    Case("voc_imageset_lists_missing_xml", "ImageSets/Main/train.txt names an absent annotation", "voc",
         voc(lambda r: append(r / "ImageSets" / "Main" / "train.txt", "ghost\n")),
         "fixed", {"voc_imageset_missing": 1}, ("ghost",)),
    Case("voc_images_elsewhere", "VOC xml with images in a folder nothing guesses (pics/), data.img_dir unset",
         "voc", voc(lambda r: (r / "JPEGImages").rename(r / "pics") and None),
         "error", r"train: none of the 3 images could be opened \(first: 'a\.jpg', looked for .*Annotations/a\.jpg.*; set data\.img_dir"),
    # ------------------------------------------------------------------ data.source=auto
    Case("auto_nothing_found", "data.source=auto on a folder of photos only", "auto",
         coco(lambda r, t, v: image(r / "photos" / "p.jpg") and ["data.source=auto", f"data.root={r / 'photos'}"]),
         "error", r"data\.source=auto found no COCO, YOLO or VOC dataset in data\.root='.*photos': 0 \.xml, 0 \.json, "
                  r"0 \.txt, 0 \.yaml, 1 images .*set data\.source=coco"),
]
