"""pipeline.prepare end to end: builtin, COCO without a val split, YOLO; outputs, determinism, errors, CLI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.dataset import DetectionDataset
from pipeline.data.validate import DataError
from pipeline.prepare import prepare

REPO = Path(__file__).resolve().parents[2]


def test_builtin_outputs(tiny_prepared, make_cfg, tmp_path):
    for name in ("train.json", "val.json", "classes.json", "report.json", "report.png"):
        assert (tiny_prepared / name).stat().st_size > 0, name
    assert (tiny_prepared / "report.png").read_bytes()[:4] == b"\x89PNG"
    classes = json.loads((tiny_prepared / "classes.json").read_text())
    assert classes == {"class_names": ["circle", "triangle", "square", "star", "cross"],
                       "category_ids": [1, 2, 3, 4, 5]}
    train = json.loads((tiny_prepared / "train.json").read_text())
    assert len(train["images"]) == 20 and train["images"][0]["file_name"] == "images/train/000001.jpg"
    assert [c["id"] for c in train["categories"]] == [1, 2, 3, 4, 5]
    report = json.loads((tiny_prepared / "report.json").read_text())
    st = report["splits"]["train"]
    assert st["num_images"] == 20 and st["num_boxes"] == sum(st["boxes_per_class"].values()) == len(train["annotations"])
    assert st["images_without_boxes"] >= 1 and sum(st["box_size_hist"]["counts"]) == st["num_boxes"]
    assert report["num_warnings"] == 0 and report["splits"]["val"]["num_images"] == 8
    # relocatable: a copy elsewhere still loads (file_name relative to the json folder)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_prepared, moved)
    ds = DetectionDataset(moved / "train.json", make_cfg(moved), train=False)
    assert ds[0][3]["file"].startswith(str(moved))


def test_builtin_is_deterministic_and_cleans_stale_images(tmp_path, make_cfg):
    over = ("data.builtin.num_train=6", "data.builtin.num_val=3", "data.builtin.image_size=[64,48]")
    prepare(make_cfg(tmp_path / "a", *over))
    prepare(make_cfg(tmp_path / "b", "data.builtin.num_train=9", *over[1:]))
    prepare(make_cfg(tmp_path / "b", *over))  # smaller re-run: no leftover images
    for name in ("train.json", "val.json", "images/train/000006.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(list((tmp_path / "b" / "images" / "train").iterdir())) == 6


def _coco_dataset(root: Path, n: int, write_image) -> None:
    images, anns = [], []
    for i in range(1, n + 1):
        write_image(root / "images" / f"{i}.jpg", 60, 40)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 60, "height": 40})
        anns.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [5, 5, 20, 10]})
    anns.append({"id": 99, "image_id": 1, "category_id": 1, "bbox": [50, 30, 20, 20]})  # clipped
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))


def test_coco_without_val_gets_a_seeded_split(tmp_path, make_cfg, write_image):
    root = tmp_path / "coco"
    _coco_dataset(root, 20, write_image)
    over = ("data=coco", f"data.root={root}", "model.num_classes=2", "data.val_fraction=0.25")
    report = prepare(make_cfg(tmp_path / "p1", *over))
    prepare(make_cfg(tmp_path / "p2", *over))
    train, val = (json.loads((tmp_path / "p1" / f"{s}.json").read_text()) for s in ("train", "val"))
    assert len(val["images"]) == 5 and len(train["images"]) == 15
    assert not {im["id"] for im in train["images"]} & {im["id"] for im in val["images"]}
    assert Path(train["images"][0]["file_name"]).is_absolute()  # images outside prepared_dir
    assert (tmp_path / "p1" / "val.json").read_text() == (tmp_path / "p2" / "val.json").read_text()
    codes = {i["code"]: i["count"] for i in report["issues"]}
    assert codes["val_split_made"] == 1 and codes["bbox_clipped"] == 1
    ds = DetectionDataset(tmp_path / "p1" / "train.json", make_cfg(tmp_path / "p1", *over), train=True)
    assert ds[0][0].shape == (3, 64, 64)


def test_yolo_end_to_end(tmp_path, make_cfg, write_image):
    root = tmp_path / "yolo"
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            write_image(root / "images" / split / f"{i}.png", 50, 50)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{i}.txt").write_text(f"{i % 3} 0.5 0.5 0.4 0.4\n")
    (root / "data.yaml").write_text("names: [x, y, z]\n")
    report = prepare(make_cfg(tmp_path / "p", "data=yolo", f"data.root={root}", "model.num_classes=3"))
    assert report["class_names"] == ["x", "y", "z"]
    assert report["splits"]["train"]["num_boxes"] == 4 and report["splits"]["val"]["num_boxes"] == 2


def test_prepare_errors(tmp_path, make_cfg, write_image):
    with pytest.raises(DataError, match="at most 8 classes"):
        prepare(make_cfg(tmp_path / "b", "model.num_classes=9"))
    root = tmp_path / "coco"
    _coco_dataset(root, 6, write_image)
    with pytest.raises(DataError, match=r"the data has 2 classes \['a', 'b'\] but model.num_classes=5"):
        prepare(make_cfg(tmp_path / "a", "data=coco", f"data.root={root}"))
    with pytest.raises(DataError, match=r"(?s)data.strict=true.*bbox_clipped.*annotation id 99"):
        prepare(make_cfg(tmp_path / "c", "data=coco", f"data.root={root}", "model.num_classes=2", "data.strict=true"))
    assert not (tmp_path / "c" / "train.json").exists()  # nothing written when strict refuses


def _cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.prepare", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.slow
def test_cli(tmp_path):
    out = tmp_path / "prep"
    ok = _cli([f"data.prepared_dir={out}", "data.builtin.num_train=4", "data.builtin.num_val=2",
               "data.builtin.image_size=[48,48]"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "prepared builtin data" in ok.stdout and (out / "report.json").is_file()
    bad = _cli([f"data.prepared_dir={out}", "data=coco", "data.root=/no/such/dir"], tmp_path)
    assert bad.returncode == 2
    assert "error: data.root='/no/such/dir' is not a folder" in bad.stderr and "Traceback" not in bad.stderr
