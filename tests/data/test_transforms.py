"""Augmentation keeps boxes on the pixels; preprocess / boxes_to_original round trips; image reading."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import AugmentConfig
from pipeline.data.transforms import (
    TrainTransform,
    boxes_to_original,
    normalize,
    preprocess,
    read_image,
    resize_matrix,
    warp_boxes,
)
from pipeline.data.validate import DataError

MEAN, STD = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]


def _denorm(chw: np.ndarray) -> np.ndarray:
    return chw.transpose(1, 2, 0) * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)


def _tight_box(img: np.ndarray, thr: float = 100.0) -> np.ndarray | None:
    ys, xs = np.nonzero(img.max(axis=2) > thr)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def test_augmented_box_tightly_bounds_the_pixels():
    geometry_only = AugmentConfig(brightness=0.0, contrast=[1.0, 1.0], saturation=[1.0, 1.0])
    img = np.zeros((160, 200, 3), np.uint8)
    img[40:100, 50:120] = 200  # box [50, 40, 120, 100] in pixel-edge coordinates
    box = np.array([[50, 40, 120, 100]], np.float32)
    checked = flipped = 0
    for seed in range(60):
        tf = TrainTransform(geometry_only, (128, 96), False, MEAN, STD, seed=seed)
        chw, boxes, labels, M = tf(img, box, np.array([3]))
        assert chw.shape == (3, 96, 128) and chw.dtype == np.float32
        tight = _tight_box(_denorm(chw))
        if tight is None:  # moved out of view: the box must be gone too
            assert len(boxes) == 0
            continue
        assert len(boxes) == 1 and labels.tolist() == [3]
        assert np.abs(boxes[0] - tight).max() <= 2.0, (seed, boxes[0], tight)
        np.testing.assert_allclose(np.clip(warp_boxes(box, M), 0, [128, 96, 128, 96])[0], boxes[0], atol=1e-3)
        checked += 1
        flipped += M[0, 0] < 0
    assert checked >= 40 and 10 <= flipped <= checked - 10  # flips happen about half the time


def test_full_augmentation_keeps_boxes_in_the_canvas_and_varies_colour():
    img = np.full((64, 64, 3), 120, np.uint8)
    img[10:30, 10:50] = (30, 200, 90)
    tf = TrainTransform(AugmentConfig(), (64, 64), False, MEAN, STD, seed=0)
    means = []
    for _ in range(30):
        chw, boxes, _, _ = tf(img, np.array([[10, 10, 50, 30]]), np.array([0]))
        assert ((boxes >= 0) & (boxes <= 64)).all()
        means.append(float(_denorm(chw)[32, 32].mean()))
    assert np.std(means) > 1.0


def test_min_size_drops_tiny_boxes():
    aug = AugmentConfig(scale=[0.6, 0.6], stretch=[1.0, 1.0], translate=0.0, flip=0.0, min_size=4.0)
    tf = TrainTransform(aug, (100, 100), False, MEAN, STD, seed=0)
    img = np.zeros((100, 100, 3), np.uint8)
    _, _, labels, _ = tf(img, np.array([[10, 10, 15, 15], [20, 20, 60, 60]]), np.array([0, 1]))
    assert labels.tolist() == [1]  # the 5 px box became 3 px (< min_size 4) and was dropped


def test_reseed_gives_reproducible_streams():
    img = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    a = TrainTransform(AugmentConfig(), (32, 32), False, MEAN, STD, seed=1)
    b = TrainTransform(AugmentConfig(), (32, 32), False, MEAN, STD, seed=2)
    b.reseed(1)
    for _ in range(3):
        np.testing.assert_array_equal(a(img, np.zeros((0, 4)), np.zeros(0))[0], b(img, np.zeros((0, 4)), np.zeros(0))[0])


def test_official_warp_cases():
    """spec section 17 (official test_warp.py): 200x100 image, box [0, 0, 20, 20]."""
    box = np.array([[0, 0, 20, 20]], float)
    np.testing.assert_allclose(warp_boxes(box, resize_matrix((200, 100), (50, 50), False)), [[0, 0, 5, 10]])
    np.testing.assert_allclose(warp_boxes(box, resize_matrix((200, 100), (50, 50), True)), [[0, 12.5, 5, 17.5]])
    np.testing.assert_allclose(warp_boxes(box, resize_matrix((200, 100), (300, 300), True)), [[0, 75, 30, 105]])


@pytest.mark.parametrize("keep_ratio", [False, True])
def test_preprocess_and_boxes_to_original_round_trip(keep_ratio):
    img = np.zeros((90, 160, 3), np.uint8)
    img[20:60, 30:100] = 255
    chw, M = preprocess(img, (64, 48), keep_ratio, MEAN, STD)
    assert chw.shape == (3, 48, 64) and chw.dtype == np.float32
    orig = np.array([[30, 20, 100, 60], [0, 0, 160, 90]], np.float32)
    net = warp_boxes(orig, M)
    tight = _tight_box(_denorm(chw), thr=127)
    assert np.abs(net[0] - tight).max() <= 1.5  # the warped box matches the warped pixels
    back = boxes_to_original(net.astype(np.float32), M, (90, 160))
    np.testing.assert_allclose(back, orig, atol=1e-3)
    back_t = boxes_to_original(torch.from_numpy(net).float(), M, (90, 160))
    assert isinstance(back_t, torch.Tensor) and back_t.dtype == torch.float32
    np.testing.assert_allclose(back_t.numpy(), orig, atol=1e-3)
    if keep_ratio:  # letterbox: uniform scale, centred (bands top and bottom here)
        assert M[0, 0] == pytest.approx(M[1, 1]) and M[0, 2] == 0 and M[1, 2] == pytest.approx(6.0)


def test_boxes_to_original_clips_and_handles_empty():
    M = resize_matrix((100, 50), (50, 50), False)
    out = boxes_to_original(np.array([[-5, -5, 60, 60]], np.float32), M, (50, 100))
    np.testing.assert_allclose(out, [[0, 0, 100, 50]])
    assert boxes_to_original(np.zeros((0, 4), np.float32), M, (50, 100)).shape == (0, 4)
    assert boxes_to_original(torch.zeros(0, 4), M, (50, 100)).shape == (0, 4)


def test_normalize_matches_official_formula():
    img = np.full((2, 2, 3), 255, np.uint8)
    out = normalize(img, MEAN, STD)
    np.testing.assert_allclose(out[:, 0, 0], (255 - np.asarray(MEAN)) / np.asarray(STD), rtol=1e-6)


def test_read_image_gray_alpha_and_errors(tmp_path):
    gray = tmp_path / "g.png"
    cv2.imwrite(str(gray), np.full((5, 7), 77, np.uint8))
    rgba = tmp_path / "a.png"
    cv2.imwrite(str(rgba), np.full((5, 7, 4), 50, np.uint8))
    assert read_image(gray).shape == (5, 7, 3) and read_image(rgba).shape == (5, 7, 3)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        read_image(bad)
    with pytest.raises(DataError, match="missing.jpg.*does not exist"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        preprocess(np.zeros((4, 4), np.uint8), (8, 8), False, MEAN, STD)
