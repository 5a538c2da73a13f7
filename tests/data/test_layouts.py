"""Datasets as they come (issue #16): data.source=auto, VOC in any folder layout (data.ann_dir / data.img_dir),
YOLO Ultralytics data.yaml, train/val/test splits from the data or drawn (data.test_fraction), eval.split, and
classes that are not in data.class_names. Every dataset here is a tiny synthetic tree written by the test."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.config import ConfigError, compose
from pipeline.data.formats import detect_source, read_coco, read_voc, read_yolo, yolo_label_path
from pipeline.data.validate import DataError, Issues
from pipeline.prepare import prepare

W, H = 64, 48


def voc_xml(filename: str, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return (f"<annotation verified=\"yes\"><folder>images</folder><filename>{filename}</filename>"
            f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>{objs}</annotation>")


def voc_tree(root: Path, write_image, n: int = 10, ann: str = "annots", img: str = "images",
             classes=("raccoon",)) -> Path:
    """``n`` images in ``root/img`` with one box each (class k % len(classes)), their XML in ``root/ann``."""
    (root / ann).mkdir(parents=True, exist_ok=True)
    for k in range(n):
        write_image(root / img / f"pic-{k}.jpg", W, H)
        (root / ann / f"pic-{k}.xml").write_text(voc_xml(f"pic-{k}.jpg", [(classes[k % len(classes)], (8, 8, 40, 30))]))
    return root


def report_codes(report: dict) -> dict[str, int]:
    return {i["code"]: i["count"] for i in report["issues"]}


def split_sizes(report: dict) -> dict[str, tuple[int, int]]:
    return {s: (st["num_images"], st["num_boxes"]) for s, st in report["splits"].items()}


# --------------------------------------------------------------------------------------------- VOC
def test_voc_annots_images_layout_prepares_with_auto_and_derived_names(tmp_path, make_cfg, write_image):
    """annots/ + images/ (no Annotations/ or JPEGImages/): found by data.source=auto, names derived and said."""
    root = voc_tree(tmp_path / "set", write_image, n=10)
    (root / "notes.xml").write_text("<catalog><item/></catalog>")  # an unrelated xml: counted, not used
    report = prepare(make_cfg(tmp_path / "p", "data.source=auto", f"data.root={root}", "model.num_classes=1"))
    assert report["format"] == "voc" and report["class_names"] == ["raccoon"]
    assert split_sizes(report) == {"train": (9, 9), "val": (1, 1)} and report["num_warnings"] == 0
    codes = report_codes(report)
    assert codes["source_detected"] == 1 and codes["class_names_derived"] == 1 and codes["voc_xml_ignored"] == 1
    assert report["split_origin"]["val"].startswith("drawn: data.val_fraction=0.1")
    train = json.loads((tmp_path / "p" / "train.json").read_text())
    assert all(Path(im["file_name"]).parent == root / "images" for im in train["images"])
    assert not (tmp_path / "p" / "test.json").exists()
    # the same data with data=voc and the names given: identical prepared files
    prepare(make_cfg(tmp_path / "q", "data=voc", f"data.root={root}", "data.class_names=[raccoon]", "model.num_classes=1"))
    for name in ("train.json", "val.json"):
        a, b = (json.loads((tmp_path / d / name).read_text()) for d in ("p", "q"))
        assert {**a, "info": None} == {**b, "info": None}


def test_voc_ann_dir_and_img_dir_keys(tmp_path, make_cfg, write_image):
    """Folders with names nothing guesses: data.ann_dir / data.img_dir point at them; without data.img_dir the
    images are not found and the error says where it looked."""
    root = voc_tree(tmp_path / "set", write_image, n=6, ann="xml_files", img="pics")
    over = ("data=voc", f"data.root={root}", "data.class_names=[raccoon]", "model.num_classes=1")
    with pytest.raises(DataError, match=r"train: none of the \d images could be opened .*looked for .*xml_files.*; "
                                        r"set data.img_dir to the folder of the images"):
        prepare(make_cfg(tmp_path / "p", *over))
    report = prepare(make_cfg(tmp_path / "p", *over, "data.ann_dir=xml_files", "data.img_dir=pics"))
    assert split_sizes(report) == {"train": (5, 5), "val": (1, 1)} and report["num_warnings"] == 0
    with pytest.raises(DataError, match=r"data.ann_dir='annotations' is not a folder .*folders: pics/, xml_files/"):
        prepare(make_cfg(tmp_path / "p", *over, "data.ann_dir=annotations"))


def test_voc_splits_from_imagesets_with_test(tmp_path, make_cfg, write_image):
    root = voc_tree(tmp_path / "VOC", write_image, n=8, ann="Annotations", img="JPEGImages", classes=("cat", "dog"))
    sets = root / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("pic-0\npic-1\npic-2\npic-3\n")
    (sets / "val.txt").write_text("pic-4\npic-5\n")
    (sets / "test.txt").write_text("pic-6\n")  # pic-7 is in no list: counted, not used
    over = ("data=voc", f"data.root={root}", "model.num_classes=2", "data.test_fraction=0.3")
    report = prepare(make_cfg(tmp_path / "p", *over))
    assert split_sizes(report) == {"train": (4, 4), "val": (2, 2), "test": (1, 1)}
    assert report["split_origin"] == {"train": "data", "val": "data", "test": "data"}  # test_fraction unused
    assert report_codes(report)["voc_not_in_imageset"] == 1
    test = json.loads((tmp_path / "p" / "test.json").read_text())
    assert [Path(im["file_name"]).name for im in test["images"]] == ["pic-6.jpg"]
    assert [c["name"] for c in test["categories"]] == ["cat", "dog"]


def test_voc_split_folders(tmp_path, write_image):
    """A Roboflow-style export: train/ and valid/ each holding xml + jpg."""
    voc_tree(tmp_path / "rf" / "train", write_image, n=3, ann=".", img=".")
    voc_tree(tmp_path / "rf" / "valid", write_image, n=2, ann=".", img=".")
    issues = Issues()
    splits, names = read_voc(str(tmp_path / "rf"), [], issues)
    assert {s: len(v["images"]) for s, v in splits.items()} == {"train": 3, "val": 2} and names == ["raccoon"]
    assert all(im["path"] and Path(im["path"]).parent.name == "valid" for im in splits["val"]["images"])


def test_test_fraction_holds_out_a_seeded_test_split_and_stale_test_json_goes(tmp_path, make_cfg, write_image):
    root = voc_tree(tmp_path / "set", write_image, n=20, ann="annotations")
    over = ("data=voc", f"data.root={root}", "model.num_classes=1", "data.val_fraction=0.2", "data.test_fraction=0.25")
    report = prepare(make_cfg(tmp_path / "p", *over))
    again = prepare(make_cfg(tmp_path / "q", *over))
    assert split_sizes(report) == split_sizes(again) == {"train": (11, 11), "val": (4, 4), "test": (5, 5)}
    files = {s: {im["file_name"] for im in json.loads((tmp_path / "p" / f"{s}.json").read_text())["images"]}
             for s in ("train", "val", "test")}
    assert not (files["train"] & files["val"]) and not (files["train"] & files["test"]) and not (files["val"] & files["test"])
    assert (tmp_path / "p" / "test.json").read_text() == (tmp_path / "q" / "test.json").read_text()
    codes = report_codes(report)
    assert codes["test_split_made"] == 1 and codes["val_split_made"] == 1
    # the val split does not move when a test split is added (same seed): test images come out of train
    no_test = prepare(make_cfg(tmp_path / "p", *over[:-1]))
    assert not (tmp_path / "p" / "test.json").exists()  # a stale test.json would be scored by eval.split=test
    val_again = {im["file_name"] for im in json.loads((tmp_path / "p" / "val.json").read_text())["images"]}
    assert val_again == files["val"] and split_sizes(no_test)["train"] == (16, 16)


# -------------------------------------------------------------------------------------------- YOLO
def test_yolo_label_path_rule():
    assert yolo_label_path(Path("/d/images/train/a.jpg")) == Path("/d/labels/train/a.txt")
    assert yolo_label_path(Path("/d/train/images/sub/a.png")) == Path("/d/train/labels/sub/a.txt")
    assert yolo_label_path(Path("/images/x/images/a.jpg")) == Path("/images/x/labels/a.txt")  # the last 'images'
    assert yolo_label_path(Path("/d/pics/a.jpg")) == Path("/d/pics/a.txt")


def _yolo_image(root: Path, rel: str, cls: int, write_image) -> None:
    write_image(root / rel, W, H)
    label = yolo_label_path(root / rel)
    label.parent.mkdir(parents=True, exist_ok=True)
    label.write_text(f"{cls} 0.5 0.5 0.5 0.5\n")


def test_yolo_data_yaml_folders_lists_and_names_dict(tmp_path, make_cfg, write_image):
    root = tmp_path / "yolo"
    for k in range(4):
        _yolo_image(root, f"data/images/train/t{k}.jpg", k % 2, write_image)
    for k in range(2):
        _yolo_image(root, f"data/images/val/v{k}.jpg", k, write_image)
    for k in range(3):
        _yolo_image(root, f"data/extra/images/x{k}.png", k % 2, write_image)
    (root / "data" / "val.txt").write_text("./images/val/v0.jpg\nimages/val/v1.jpg\n\n")  # Ultralytics list
    (root / "data.yaml").write_text("path: data\ntrain: images/train\nval: val.txt\ntest: [extra/images]\n"
                                    "names:\n  0: circle\n  1: square\n")
    report = prepare(make_cfg(tmp_path / "p", "data.source=auto", f"data.root={root}", "model.num_classes=2"))
    assert report["format"] == "yolo" and report["class_names"] == ["circle", "square"]
    assert split_sizes(report) == {"train": (4, 4), "val": (2, 2), "test": (3, 3)} and report["num_warnings"] == 0
    assert report["splits"]["test"]["boxes_per_class"] == {"circle": 2, "square": 1}
    assert (tmp_path / "p" / "test.json").is_file()
    # a data.yaml split that does not exist: one error naming the yaml, the key and the path
    (root / "data.yaml").write_text("path: data\ntrain: images/train\nval: images/nope\nnames: [a, b]\n")
    with pytest.raises(DataError, match=r"data.yaml' val: 'images/nope' not found \(looked at '.*data/images/nope'\)"):
        read_yolo(str(root), [], Issues())


def test_yolo_data_yaml_with_a_foreign_absolute_path(tmp_path, write_image):
    """A data.yaml written on another machine (path: /home/someone/ds): resolved from the yaml's folder."""
    root = tmp_path / "moved"
    _yolo_image(root, "images/train/a.jpg", 0, write_image)
    (root / "data.yaml").write_text("path: /no/such/home/ds\ntrain: images/train\nnames: [thing]\n")
    issues = Issues()
    splits, names = read_yolo(str(root), [], issues)
    assert names == ["thing"] and set(splits) == {"train"} and len(splits["train"]["annotations"]) == 1
    assert "/no/such/home/ds" in issues.examples["yolo_path_ignored"][0]


# -------------------------------------------------------------------------------------------- COCO
def _coco_json(path: Path, names: list[str], n: int, first_id: int, write_image, categories=True) -> None:
    images, anns = [], []
    for k in range(n):
        iid = first_id + k
        write_image(path.parent / "images" / f"{iid}.jpg", W, H)
        images.append({"id": iid, "file_name": f"{iid}.jpg", "width": W, "height": H})
        anns.append({"id": iid, "image_id": iid, "category_id": 1 + k % len(names), "bbox": [4, 4, 20, 20]})
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(names)] if categories else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_coco_test_ann_and_empty_categories(tmp_path, make_cfg, write_image):
    root = tmp_path / "coco"
    _coco_json(root / "train.json", ["a", "b"], 6, 1, write_image)
    _coco_json(root / "val.json", ["a", "b"], 2, 100, write_image)
    _coco_json(root / "holdout.json", ["a", "b"], 3, 200, write_image)
    report = prepare(make_cfg(tmp_path / "p", "data.source=auto", f"data.root={root}", "model.num_classes=2",
                              "data.test_ann=holdout.json"))
    assert report["format"] == "coco" and split_sizes(report) == {"train": (6, 6), "val": (2, 2), "test": (3, 3)}
    _coco_json(root / "holdout.json", ["a", "b"], 3, 200, write_image, categories=False)
    with pytest.raises(DataError, match=r"holdout.json' has an empty or invalid 'categories' list"):
        read_coco(str(root), None, None, [], Issues(), test_ann="holdout.json")


# --------------------------------------------------------------------------------------- detection
def test_auto_detection_and_its_errors(tmp_path, write_image):
    coco = tmp_path / "c"
    _coco_json(coco / "annotations" / "instances_train.json", ["a"], 2, 1, write_image)
    assert detect_source(str(coco), Issues()) == "coco"
    yolo = tmp_path / "y"
    _yolo_image(yolo, "images/a.jpg", 0, write_image)
    assert detect_source(str(yolo), Issues()) == "yolo"
    voc = voc_tree(tmp_path / "v", write_image, n=2)
    assert detect_source(str(voc), Issues()) == "voc"
    nothing = tmp_path / "n"
    write_image(nothing / "photos" / "a.jpg", W, H)
    (nothing / "meta.json").write_text('{"images": []}')  # json without 'categories': not COCO
    (nothing / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match=r"data.source=auto found no COCO, YOLO or VOC dataset in data.root='.*n': "
                                        r"0 .xml, 1 .json, 1 .txt, 0 .yaml, 1 images .*folders: photos/\).*"
                                        r"set data.source=coco .*data.ann_dir, data.img_dir"):
        detect_source(str(nothing), Issues())
    _coco_json(voc / "coco.json", ["a"], 1, 1, write_image)
    with pytest.raises(DataError, match=r"fits several formats: coco: .*coco.json.*voc: 2 .xml.*Set data.source to "
                                        r"one of \['coco', 'voc'\]"):
        detect_source(str(voc), Issues())


# ------------------------------------------------------------------------------------------ classes
class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_classes_not_in_config_are_named_counted_and_refused_under_strict(tmp_path, make_cfg, write_image):
    root = voc_tree(tmp_path / "set", write_image, n=12, classes=("cat", "dog", "dog"))
    sets = root / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("".join(f"pic-{k}\n" for k in range(9)))
    (sets / "val.txt").write_text("".join(f"pic-{k}\n" for k in range(9, 12)))
    over = ("data=voc", f"data.root={root}", "data.class_names=[cat]", "model.num_classes=1")
    handler = _Collect()
    logging.getLogger("pipeline").addHandler(handler)
    try:
        report = prepare(make_cfg(tmp_path / "p", *over))
    finally:
        logging.getLogger("pipeline").removeHandler(handler)
    assert report["classes_not_in_config"] == {"dog": {"train": 6, "val": 2, "total": 8}}
    assert report_codes(report)["class_not_in_config"] == 8
    assert "dog: 8 boxes dropped (not in data.class_names; train 6, val 2)" in handler.lines
    assert split_sizes(report) == {"train": (9, 3), "val": (3, 1)}
    with pytest.raises(DataError, match=r"(?s)data.strict=true.*\[class_not_in_config\] x8: train: 'dog': 6 box"):
        prepare(make_cfg(tmp_path / "s", *over, "data.strict=true"))
    assert not (tmp_path / "s" / "train.json").exists()


def test_derived_class_names_must_match_num_classes(tmp_path, make_cfg, write_image):
    root = voc_tree(tmp_path / "set", write_image, n=4, classes=("zebra", "ant"))
    with pytest.raises(DataError, match=r"the data has 2 classes \['ant', 'zebra'\] but model.num_classes=5 "
                                        r"\(data.class_names is unset: the classes come from the voc data\); set "
                                        r"model.num_classes=2 \(and data.class_names=\[ant,zebra\]"):
        prepare(make_cfg(tmp_path / "p", "data=voc", f"data.root={root}"))


# ------------------------------------------------------------------------------------------- config
def test_new_keys_are_validated():
    with pytest.raises(ConfigError, match=r"eval.split: 'tset' is not one of \['train', 'val', 'test'\]. Did you mean"):
        compose(["eval.split=tset"])
    with pytest.raises(ConfigError, match=r"data.test_fraction: must be in \[0, 1\) with data.val_fraction"):
        compose(["data.test_fraction=0.9", "data.val_fraction=0.2"])
    with pytest.raises(ConfigError, match=r"data.root='/data/raccoon' is set but data.source=builtin .*add data=auto"):
        compose(["data.root=/data/raccoon"])  # forgetting data=...: not a silent run on the built-in shapes
    cfg = compose(["data=auto", "data.root=/x", "data.ann_dir=a", "data.img_dir=b", "data.test_ann=t.json"])
    assert (cfg.data.source, cfg.data.ann_dir, cfg.eval.split, cfg.data.test_fraction) == ("auto", "a", "val", 0.0)


# --------------------------------------------------------------------------------------- eval.split
def test_evaluate_scores_the_split_named_by_eval_split(tmp_path, make_cfg, write_image):
    import torch

    from pipeline.config import to_dict
    from pipeline.evaluate import evaluate_model
    from pipeline.infer.runtime import InferenceError
    from pipeline.model import build_model
    from pipeline.model.checkpoint import save_checkpoint

    root = voc_tree(tmp_path / "set", write_image, n=12, ann="annotations")
    over = ["data=voc", f"data.root={root}", "model.num_classes=1", "data.val_fraction=0.25", "train.device=cpu",
            f"eval.checkpoint={tmp_path / 'best.pt'}", f"eval.out_dir={tmp_path / 'ev'}", "eval.num_vis_images=2"]
    prepare(make_cfg(tmp_path / "p", *over, "data.test_fraction=0.4"))
    cfg = make_cfg(tmp_path / "p", *over, "eval.split=test")
    torch.manual_seed(0)
    state = build_model(cfg.model, with_aux=False).state_dict()
    save_checkpoint(tmp_path / "best.pt", {"model": state, "ema": state, "config": to_dict(cfg), "epoch": 1, "step": 1})
    sizes = {s: len(json.loads((tmp_path / "p" / f"{s}.json").read_text())["images"]) for s in ("val", "test")}
    assert sizes == {"val": 3, "test": 5}
    assert evaluate_model(cfg)["num_images"] == 5
    assert evaluate_model(make_cfg(tmp_path / "p", *over))["num_images"] == 3  # eval.split defaults to val
    prepare(make_cfg(tmp_path / "p", *over))  # no test split this time: test.json is removed
    with pytest.raises(InferenceError, match=r"test.json does not exist: prepare found no test split in the data "
                                             r"\(eval.split=test\).*data.test_fraction=0.1"):
        evaluate_model(cfg)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InferenceError, match=r"prepare found no test split"):  # checked before loading a model
        evaluate_model(cfg, checkpoint=junk)
