"""Built-in dataset generator: determinism and content (its speed is not a test: a wall-clock floor flakes on
a loaded machine)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.data.generate import DEFAULT_CLASSES, SHAPES, generate_dataset, render_image, shapes_for
from pipeline.data.validate import DataError


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_bytes_and_other_seed_differs(tmp_path):
    a = generate_dataset(tmp_path / "a", 6, (64, 48), seed=3, split_name="train")
    generate_dataset(tmp_path / "b", 6, (64, 48), seed=3, split_name="train")
    generate_dataset(tmp_path / "c", 6, (64, 48), seed=4, split_name="train")
    generate_dataset(tmp_path / "d", 6, (64, 48), seed=3, split_name="val")
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb
    assert set(fa) == set(fc)
    assert all(fa[k] != fc[k] for k in fa if k.endswith(".jpg"))
    val_imgs = [v for k, v in _files(tmp_path / "d").items() if k.endswith(".jpg")]
    assert not set(val_imgs) & {v for k, v in fa.items() if k.endswith(".jpg")}  # splits are different images
    assert a == tmp_path / "a" / "train.json"


def test_json_content_and_boxes(tmp_path):
    path = generate_dataset(tmp_path, 40, (128, 96), seed=0, max_objects=6, empty_fraction=0.25)
    coco = json.loads(path.read_text())
    assert [c["name"] for c in coco["categories"]] == list(DEFAULT_CLASSES)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
    per_image = {im["id"]: 0 for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 96 and w >= 3 and h >= 3
        assert 1 <= a["category_id"] <= 5
        per_image[a["image_id"]] += 1
    assert sum(1 for n in per_image.values() if n == 0) >= 10  # 25% empty images (plus maybe none rejected)
    assert max(per_image.values()) <= 6
    im = coco["images"][0]
    img = cv2.imread(str(tmp_path / im["file_name"]))
    assert img.shape == (96, 128, 3) and (im["width"], im["height"]) == (128, 96)


def test_boxes_bound_the_drawn_object(monkeypatch):
    """On a black background without clutter, each box is the tight bound of the object's pixels."""
    import pipeline.data.generate as gen

    monkeypatch.setattr(gen, "_background", lambda rng, w, h: np.zeros((h, w, 3), np.uint8))
    monkeypatch.setattr(gen, "_clutter", lambda img, rng: None)
    n = 0
    for seed in range(30):
        img, objects = render_image(np.random.default_rng(seed), 96, 80, list(SHAPES), max_objects=1, empty=False)
        assert img.shape == (80, 96, 3) and len(objects) <= 1
        for cls, box in objects:
            level = img.max(axis=2).astype(float)
            ys, xs = np.nonzero(level > 0.5 * level.max())  # half intensity: the anti-aliased edge
            tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert 0 <= cls < len(SHAPES)
            assert np.abs(np.array(box) - tight).max() <= 1, (seed, box, tight)
            n += 1
    assert n >= 25


def test_sizes_span_small_to_large(tmp_path):
    coco = json.loads(generate_dataset(tmp_path, 60, (320, 320), seed=1).read_text())
    side = np.sqrt([a["bbox"][2] * a["bbox"][3] for a in coco["annotations"]])
    assert side.min() <= 12 and side.max() >= 80  # ~8-12 px objects and large ones at 320 px


def test_class_name_mapping():
    assert shapes_for(["square", "circle"]) == ["square", "circle"]
    assert shapes_for(["rectangle", "car"]) == ["square", "circle"]
    assert sorted(shapes_for([f"c{i}" for i in range(8)])) == sorted(SHAPES)
    with pytest.raises(DataError, match="at most 8"):
        shapes_for([f"c{i}" for i in range(9)])


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="too small"):
        generate_dataset(tmp_path, 2, (8, 8), 0)
    with pytest.raises(DataError, match="num_images"):
        generate_dataset(tmp_path, 0, (64, 64), 0)
