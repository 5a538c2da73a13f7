"""Every validation message, each from its own broken COCO fixture: the message names the file / id and
the fix; recoverable problems are counted, fatal ones raise DataError."""
from __future__ import annotations

import json
import math

import pytest

from pipeline.data.formats import read_coco
from pipeline.data.validate import DataError, Issues, check_splits, validate_split

CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


@pytest.fixture
def run_coco(write_image):
    """run_coco(dir, images, annotations, ...) -> (clean coco, issues)."""
    def run(tmp_path, images, anns, cats=CATS, class_names=(), strict=False):
        return _run_coco(write_image, tmp_path, images, anns, cats, class_names, strict)
    return run


def _run_coco(write_image, tmp_path, images, anns, cats, class_names, strict):
    """Write root/ann.json (+ images under root/images) and read + validate it as the train split."""
    root = tmp_path / "coco"
    for im in images:
        if im.get("_write", True):
            write_image(root / "images" / im["file_name"], im.get("_real", (im.get("width", 64),))[0],
                        im.get("_real", (0, im.get("height", 48)))[1])
    clean = [{k: v for k, v in im.items() if not k.startswith("_")} for im in images]
    root.mkdir(parents=True, exist_ok=True)
    (root / "ann.json").write_text(json.dumps({"images": clean, "annotations": anns, "categories": cats}))
    issues = Issues(strict=strict)
    splits, names = read_coco(str(root), "ann.json", None, list(class_names), issues)
    coco = validate_split(splits["train"], names, "train", issues)
    return coco, issues


def img(i, name=None, w=64, h=48, **kw):
    return {"id": i, "file_name": name or f"im{i}.jpg", "width": w, "height": h, **kw}


def ann(i, image_id, bbox, cat=3, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, **kw}


def msgs(issues, code):
    return " | ".join(issues.examples[code])


def test_clean_coco_maps_categories_by_name_in_config_order(tmp_path, run_coco):
    coco, issues = run_coco(tmp_path, [img(1), img(2)],
                            [ann(1, 1, [1, 2, 10, 12], cat=7), ann(2, 1, [5, 5, 5, 5], cat=3, iscrowd=1),
                             ann(3, 1, [6, 6, 5, 5], cat=3)], class_names=["dog", "cat"])
    assert [c["name"] for c in coco["categories"]] == ["dog", "cat"]
    assert [c["id"] for c in coco["categories"]] == [1, 2]
    assert [(a["category_id"], a["iscrowd"]) for a in coco["annotations"]] == [(1, 0), (2, 1), (2, 0)]
    assert coco["annotations"][0]["bbox"] == [1, 2, 10, 12]
    assert issues.num("warning") == 0
    assert issues.counts["images_without_boxes"] == 1 and issues.counts["crowd_boxes"] == 1


def test_default_class_order_is_sorted_category_id(tmp_path, run_coco):
    coco, _ = run_coco(tmp_path, [img(1)], [ann(1, 1, [1, 1, 5, 5], cat=7), ann(2, 1, [1, 1, 5, 5], cat=3)],
                       cats=[{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}])
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]


def test_missing_image(tmp_path, run_coco):
    _, issues = run_coco(tmp_path, [img(1), img(2, "gone.jpg", _write=False)],
                         [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5]), ann(3, 2, [2, 2, 5, 5])])
    assert issues.counts["image_missing"] == 1
    m = msgs(issues, "image_missing")
    assert "image id 2" in m and "gone.jpg" in m and "2 box(es)" in m and "data.root" in m


def test_unreadable_image(tmp_path, run_coco):
    (tmp_path / "coco" / "images").mkdir(parents=True)
    (tmp_path / "coco" / "images" / "bad.jpg").write_bytes(b"\x00garbage")
    _, issues = run_coco(tmp_path, [img(1), img(2, "bad.jpg", _write=False)], [ann(1, 1, [1, 1, 5, 5])])
    assert issues.counts["image_unreadable"] == 1
    assert "bad.jpg" in msgs(issues, "image_unreadable") and "image id 2" in msgs(issues, "image_unreadable")


def test_size_mismatch_uses_real_size(tmp_path, run_coco):
    coco, issues = run_coco(tmp_path, [img(1, w=50, h=40, _real=(64, 48)), img(2, w=48, h=64, _real=(64, 48))],
                            [ann(1, 1, [40, 30, 30, 30])])
    assert issues.counts["size_mismatch"] == 2
    m = msgs(issues, "size_mismatch")
    assert "50x40" in m and "64x48" in m and "im1.jpg" in m and "EXIF" in m  # 48x64 vs 64x48: swapped
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (64, 48)
    assert coco["annotations"][0]["bbox"] == [40, 30, 24, 18]  # clipped to the real size


def test_size_filled_when_absent(tmp_path, write_image, run_coco):
    im = {"id": 1, "file_name": "im1.jpg"}
    write_image(tmp_path / "coco" / "images" / "im1.jpg", 30, 20)
    coco, issues = run_coco(tmp_path, [{**im, "_write": False}], [ann(1, 1, [1, 1, 5, 5])])
    assert issues.counts["size_filled"] == 1 and coco["images"][0]["width"] == 30


@pytest.mark.parametrize("bbox, code, kept", [
    ([60, 40, 10, 10], "bbox_clipped", [60, 40, 4, 8]),
    ([-3, -2, 10, 10], "bbox_clipped", [0, 0, 7, 8]),
    ([70, 10, 5, 5], "bbox_outside", None),
    ([5, 5, 0, 4], "bbox_nonpositive", None),
    ([5, 5, -3, 4], "bbox_nonpositive", None),
    ([5, math.nan, 3, 4], "bbox_nonfinite", None),
    ([5, 5, 3], "bbox_malformed", None),
    ([5, 5, "x", 3], "bbox_malformed", None),
    ("oops", "bbox_malformed", None),
    ([5, 5, 0.5, 4], "bbox_too_small", None),
    ([63.5, 5, 4, 4], "bbox_too_small", None),  # 0.5 px wide after clipping
])
def test_box_problems(tmp_path, bbox, code, kept, run_coco):
    anns = [ann(1, 1, [1, 1, 5, 5]), ann(42, 1, bbox)]
    coco, issues = run_coco(tmp_path, [img(1)], anns)
    assert issues.counts[code] == 1, dict(issues.counts)
    m = msgs(issues, code)
    assert "annotation id 42" in m and "ann.json" in m
    boxes = [a["bbox"] for a in coco["annotations"]]
    assert boxes == [[1, 1, 5, 5]] + ([kept] if kept else [])


def test_unknown_category_and_unknown_image(tmp_path, run_coco):
    _, issues = run_coco(tmp_path, [img(1)], [ann(1, 1, [1, 1, 5, 5]), ann(9, 1, [1, 1, 5, 5], cat=99),
                                              ann(10, 77, [1, 1, 5, 5])])
    assert issues.counts["unknown_category"] == 1 and issues.counts["annotation_unknown_image"] == 1
    assert "category_id 99" in msgs(issues, "unknown_category") and "annotation id 9" in msgs(issues, "unknown_category")
    assert "image_id 77" in msgs(issues, "annotation_unknown_image")


def test_duplicate_image_id_is_fatal(tmp_path, run_coco):
    with pytest.raises(DataError, match=r"duplicate image id 1: 'a.jpg' and 'b.jpg'"):
        run_coco(tmp_path, [img(1, "a.jpg"), img(1, "b.jpg")], [ann(1, 1, [1, 1, 5, 5])])


def test_non_integer_image_id_is_fatal(tmp_path, run_coco):
    with pytest.raises(DataError, match="image id 'x1'.*not an integer"):
        run_coco(tmp_path, [img("x1")], [])


def test_duplicate_file_is_warned(tmp_path, run_coco):
    _, issues = run_coco(tmp_path, [img(1, "a.jpg"), img(2, "a.jpg")], [ann(1, 1, [1, 1, 5, 5])])
    assert issues.counts["duplicate_file"] == 1 and "image ids 1 and 2" in msgs(issues, "duplicate_file")


def test_classes_config_vs_data(tmp_path, run_coco):
    coco, issues = run_coco(tmp_path, [img(1)], [ann(1, 1, [1, 1, 5, 5], cat=3), ann(2, 1, [1, 1, 5, 5], cat=7),
                                                 ann(3, 1, [2, 2, 5, 5], cat=7)], class_names=["cat", "bird"])
    assert issues.counts["class_not_in_config"] == 2  # two 'dog' boxes dropped, counted
    assert "'dog'" in msgs(issues, "class_not_in_config") and "data.class_names" in msgs(issues, "class_not_in_config")
    assert issues.counts["class_without_boxes"] == 1 and "'bird'" in msgs(issues, "class_without_boxes")
    assert len(coco["annotations"]) == 1


def test_empty_and_unusable_splits_are_fatal(tmp_path, run_coco):
    with pytest.raises(DataError, match="no images"):
        run_coco(tmp_path / "a", [], [])
    with pytest.raises(DataError, match="none of the 2 images could be opened.*data.root"):
        run_coco(tmp_path / "b", [img(1, _write=False), img(2, _write=False)], [])
    with pytest.raises(DataError, match="train: no usable boxes in 1 images"):
        run_coco(tmp_path / "c", [img(1)], [ann(1, 1, [5, 5, 0, 0])])


def test_val_split_without_boxes_is_a_warning(tmp_path, write_image):
    root = tmp_path / "coco"
    write_image(root / "images" / "im1.jpg", 64, 48)
    issues = Issues()
    raw = {"source": "x", "images": [{"id": 1, "file_name": "im1.jpg", "path": str(root / "images" / "im1.jpg"),
                                      "width": 64, "height": 48, "where": "x"}], "annotations": []}
    validate_split(raw, ["cat"], "val", issues)
    assert issues.counts["split_without_boxes"] == 1


def test_strict_turns_warnings_into_one_error(tmp_path, run_coco):
    _, issues = run_coco(tmp_path, [img(1)], [ann(1, 1, [1, 1, 5, 5]), ann(2, 1, [60, 40, 10, 10])], strict=True)
    with pytest.raises(DataError, match=r"(?s)data.strict=true.*\[bbox_clipped\] x1.*annotation id 2"):
        issues.raise_if_strict()
    Issues(strict=True).raise_if_strict()  # no warnings: fine


def test_coco_file_problems_are_fatal(tmp_path):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "ann.json").write_text('{"images": [}')
    with pytest.raises(DataError, match=r"ann.json' is not valid json \(line 1"):
        read_coco(str(root), "ann.json", None, [], Issues())
    (root / "ann.json").write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(DataError, match="ann.json' has no 'images' list"):
        read_coco(str(root), "ann.json", None, [], Issues())
    (root / "ann.json").write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "a"},
                                                                           {"id": 2, "name": "a"}]}))
    with pytest.raises(DataError, match="category name 'a' appears twice"):
        read_coco(str(root), "ann.json", None, [], Issues())
    with pytest.raises(DataError, match="data.train_ann='nope.json' not found"):
        read_coco(str(root), "nope.json", None, [], Issues())
    with pytest.raises(DataError, match="data.root='/no/such/dir' is not a folder"):
        read_coco("/no/such/dir", None, None, [], Issues())
    (root / "ann.json").unlink()
    with pytest.raises(DataError, match="no training annotation json found"):
        read_coco(str(root), None, None, [], Issues())


def test_coco_without_annotations_key_and_malformed_image_entry(tmp_path, write_image):
    root = tmp_path / "coco"
    write_image(root / "images" / "a.jpg", 32, 32)
    (root / "ann.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2}],
                                               "categories": [{"id": 1, "name": "a"}]}))
    issues = Issues()
    splits, _ = read_coco(str(root), "ann.json", None, [], issues)
    assert issues.counts["coco_no_annotations"] == 1
    assert issues.counts["image_malformed"] == 1 and "images[1]" in msgs(issues, "image_malformed")
    assert len(splits["train"]["images"]) == 1


def test_split_overlap():
    a = {"images": [{"file_name": "/d/x.jpg"}, {"file_name": "/d/y.jpg"}]}
    b = {"images": [{"file_name": "/d/y.jpg"}]}
    issues = Issues()
    check_splits({"train": a, "val": b}, issues)
    assert issues.counts["split_overlap"] == 1 and "/d/y.jpg" in msgs(issues, "split_overlap")


def test_val_json_with_other_categories_is_warned(tmp_path, write_image):
    root = tmp_path / "coco"
    write_image(root / "images" / "a.jpg", 32, 32)
    for split, cats in (("train", [{"id": 1, "name": "a"}]), ("val", [{"id": 1, "name": "b"}])):
        (root / f"{split}.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                        "annotations": [], "categories": cats}))
    issues = Issues()
    splits, names = read_coco(str(root), None, None, [], issues)  # finds train.json / val.json by name
    assert set(splits) == {"train", "val"} and names == ["a"]
    assert "val.json" in msgs(issues, "category_sets_differ") and "['b']" in msgs(issues, "category_sets_differ")
