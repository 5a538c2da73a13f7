"""YOLO and Pascal VOC readers (COCO is covered in test_validate.py): layouts, class names, conversion
to pixel boxes, and each format-specific message naming the file and line."""
from __future__ import annotations

import pytest

from pipeline.data.formats import read_voc, read_yolo
from pipeline.data.validate import DataError, Issues, validate_split


def msgs(issues, code):
    return " | ".join(issues.examples[code])


# ------------------------------------------------------------------------------------------ YOLO
@pytest.fixture
def yolo_root(tmp_path, write_image):
    root = tmp_path / "yolo"
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            write_image(root / "images" / split / f"{split}{i}.jpg", 100, 50)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{split}{i}.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.1 0.1\n")
    (root / "classes.txt").write_text("cat\ndog\n")
    return root


def test_yolo_split_layout_and_pixel_boxes(yolo_root):
    issues = Issues()
    splits, names = read_yolo(str(yolo_root), [], issues)
    assert names == ["cat", "dog"] and set(splits) == {"train", "val"}
    assert len(splits["train"]["images"]) == 3 and len(splits["val"]["images"]) == 1
    coco = validate_split(splits["train"], names, "train", issues)
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    assert first[0]["category_id"] == 2 and first[0]["bbox"] == pytest.approx([40, 15, 20, 20])
    assert first[1]["category_id"] == 1 and first[1]["bbox"] == pytest.approx([5, 2.5, 10, 5])
    assert issues.num("warning") == 0


def test_yolo_flat_layout_with_data_yaml_dict_names(tmp_path, write_image):
    root = tmp_path / "flat"
    write_image(root / "images" / "a.png", 40, 40)
    write_image(root / "images" / "b.png", 40, 40)
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("names: {0: person, 1: car}\n")
    issues = Issues()
    splits, names = read_yolo(str(root), [], issues)
    assert names == ["person", "car"] and set(splits) == {"all"}
    assert issues.counts["yolo_no_label"] == 1 and "b.png" in msgs(issues, "yolo_no_label")


def test_yolo_bad_lines(yolo_root):
    lbl = yolo_root / "labels" / "train" / "train0.txt"
    lbl.write_text(
        "1 0.5 0.5 0.2 0.4\n"          # 1 fine
        "0 0.5 0.5 0.2 0.4 0.9\n"      # 2 six fields
        "0 0.5 abc 0.2 0.4\n"          # 3 not a number
        "5 0.5 0.5 0.2 0.4\n"          # 4 class index out of range
        "0 50 25 20 10\n"              # 5 pixel coordinates
        "0 0.1 0.1 0.3 0.1 0.3 0.4\n"  # 6 polygon -> box
        "1.5 0.5 0.5 0.2 0.2\n"        # 7 non-integer class
        "# a comment\n\n")
    (yolo_root / "labels" / "train" / "stray.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    issues = Issues()
    splits, names = read_yolo(str(yolo_root), [], issues)
    assert "train0.txt:2" in msgs(issues, "yolo_fields") and "got 6" in msgs(issues, "yolo_fields")
    assert "train0.txt:3" in msgs(issues, "yolo_not_number")
    assert "train0.txt:4" in msgs(issues, "yolo_class_range") and "train0.txt:7" in msgs(issues, "yolo_class_range")
    assert "train0.txt:5" in msgs(issues, "yolo_not_normalised") and "pixel" in msgs(issues, "yolo_not_normalised")
    assert "train0.txt:6" in msgs(issues, "yolo_polygon")
    assert "stray.txt" in msgs(issues, "yolo_orphan_label")
    coco = validate_split(splits["train"], names, "train", issues)
    boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == 1]
    assert boxes[1] == pytest.approx([10, 5, 20, 15])  # polygon (0.1..0.3, 0.1..0.4) on 100x50
    assert len(boxes) == 2  # line 1 and the polygon; the pixel-coordinate box lands outside the image
    assert issues.counts["bbox_outside"] == 1 and "train0.txt:5" in msgs(issues, "bbox_outside")


def test_yolo_class_names(tmp_path, yolo_root, write_image):
    issues = Issues()
    _, names = read_yolo(str(yolo_root), ["a", "b"], issues)
    assert names == ["a", "b"] and "classes.txt" in msgs(issues, "yolo_names_differ")
    (yolo_root / "classes.txt").unlink()
    with pytest.raises(DataError, match="no class names.*classes.txt"):
        read_yolo(str(yolo_root), [], Issues())
    (yolo_root / "data.yaml").write_text("nc: 2\n")
    with pytest.raises(DataError, match="data.yaml' has no 'names' list"):
        read_yolo(str(yolo_root), [], Issues())
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DataError, match="no YOLO layout found"):
        read_yolo(str(empty), ["a"], Issues())


# ------------------------------------------------------------------------------------------- VOC
def _xml(name, objects, size=(100, 80), filename=None):
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return f"<annotation><filename>{filename or name}</filename>{size_xml}{objs}</annotation>"


@pytest.fixture
def voc_root(tmp_path, write_image):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    for stem in ("a", "b", "c"):
        write_image(root / "JPEGImages" / f"{stem}.jpg", 100, 80)
        (root / "Annotations" / f"{stem}.xml").write_text(
            _xml(f"{stem}.jpg", [("dog", (10.5, 20, 50, 60), 0), ("cat", (1, 1, 30, 30), int(stem == "a"))]))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\n")
    return root


def test_voc_splits_float_coords_and_difficult(voc_root):
    issues = Issues()
    splits, names = read_voc(str(voc_root), ["cat", "dog"], issues)
    assert set(splits) == {"train", "val"} and len(splits["train"]["images"]) == 2
    coco = validate_split(splits["train"], names, "train", issues)
    a = coco["annotations"]
    assert a[0]["category_id"] == 2 and a[0]["bbox"] == pytest.approx([10.5, 20, 39.5, 40]) and a[0]["iscrowd"] == 0
    assert a[1]["category_id"] == 1 and a[1]["iscrowd"] == 1  # difficult -> crowd
    assert issues.num("warning") == 0


def test_voc_derives_sorted_class_names(voc_root):
    issues = Issues()
    _, names = read_voc(str(voc_root), [], issues)
    assert names == ["cat", "dog"] and issues.counts["class_names_derived"] == 1


def test_voc_broken_files(voc_root, write_image):
    ann = voc_root / "Annotations"
    (ann / "b.xml").write_text(_xml("b.jpg", [("dog", (1, 1, 20, 20), 0)], size=None))
    (ann / "c.xml").write_text("<annotation><filename>c.jpg</filename")
    write_image(voc_root / "JPEGImages" / "d.png", 100, 80)
    (ann / "d.xml").write_text("<annotation><filename>renamed.jpg</filename><size><width>100</width><height>80"
                               "</height></size><object><name>dog</name></object>"
                               "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>x</ymin><xmax>9</xmax>"
                               "<ymax>9</ymax></bndbox></object></annotation>")
    (voc_root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nd\nzzz\n")
    issues = Issues()
    splits, names = read_voc(str(voc_root), ["cat", "dog"], issues)
    assert "b.xml" in msgs(issues, "voc_no_size")
    assert "c.xml" in msgs(issues, "voc_parse_error")
    assert issues.counts["voc_object_malformed"] == 2 and "d.xml object #0" in msgs(issues, "voc_object_malformed")
    assert "train.txt:4" in msgs(issues, "voc_imageset_missing") and "zzz" in msgs(issues, "voc_imageset_missing")
    assert "d.png" in msgs(issues, "voc_filename_fallback")
    assert splits["val"]["images"] == []
    coco = validate_split(splits["train"], names, "train", issues)
    b = next(im for im in coco["images"] if im["file_name"].endswith("b.jpg"))
    assert (b["width"], b["height"]) == (100, 80)  # taken from the file
    with pytest.raises(DataError, match="val: the split has no images"):
        validate_split(splits["val"], names, "val", issues)


def test_voc_missing_folders(tmp_path):
    (tmp_path / "v" / "Annotations").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no VOC annotation .xml files \(Annotations/\).*0 .xml.*folders: "
                                        r"Annotations/.*Set data.ann_dir"):
        read_voc(str(tmp_path / "v"), ["a"], Issues())
    with pytest.raises(DataError, match=r"data.img_dir='pics' is not a folder .*relative to data.root"):
        read_voc(str(tmp_path / "v"), ["a"], Issues(), img_dir="pics")
