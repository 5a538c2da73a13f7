"""Priors, Integral and post-processing against the official tensors (golden ``priors``, ``integral``,
``post``, ``post_shifted``)."""
from __future__ import annotations

import pytest
import torch

from pipeline.model import decode
from pipeline.model.decode import (
    Detections,
    Integral,
    bbox2distance,
    decode_boxes,
    decode_for_export,
    distance2bbox,
    make_priors,
    postprocess,
)

STRIDES = [8, 16, 32, 64]
NUM_CLASSES, REG_MAX = 3, 7
FILES = ["m_1.0x_c3_h128_w128.pt", "m_1.0x_c3_h128_w192.pt", "emptygt_m_1.0x_c3_h128_w128.pt"]


@pytest.fixture(scope="module", params=FILES)
def blob(request, golden_dir):
    return torch.load(golden_dir / request.param, weights_only=True)


# A box coordinate is a prior centre minus/plus a distance, both up to the image size (here <= 192 px), so its
# float32 rounding is a few ulps of that size (1.5e-5 at 128-256 px) whatever the coordinate's own value; CPU
# kernels differ by such ulps (seen: 1.1e-5 and 1.5e-5 between an AVX2 machine and the AVX512 one that made the
# golden files). 4 ulps; a real decoding bug moves boxes by a good part of a pixel.
BOX_ATOL = 6e-5

def test_priors_equal_golden(blob):
    priors = make_priors(blob["meta"]["input_hw"], STRIDES)
    assert priors.dtype == torch.float32
    assert torch.equal(priors, blob["priors"])


@pytest.mark.parametrize("hw, strides, n", [((320, 320), STRIDES, 2125), ((416, 416), STRIDES, 3598),
                                            ((416, 416), [8, 16, 32], 3549), ((128, 192), STRIDES, 510),
                                            ((100, 60), STRIDES, 13 * 8 + 7 * 4 + 4 * 2 + 2 * 1)])
def test_prior_counts_and_layout(hw, strides, n):
    priors = make_priors(hw, strides)
    assert priors.shape == (n, 4)
    width0 = -(-hw[1] // strides[0])
    # row-major, corner convention: second point is one stride to the right, row 1 starts at y = stride
    assert priors[1].tolist() == [strides[0], 0, strides[0], strides[0]]
    assert priors[width0].tolist() == [0, strides[0], strides[0], strides[0]]
    assert priors[-1, 2] == strides[-1]


def test_make_priors_rejects_bad_size():
    with pytest.raises(ValueError, match="input_hw"):
        make_priors((0, 320), STRIDES)


def test_integral_equals_golden(golden):
    ref = golden["integral"]
    module = Integral(ref["reg_max"])
    assert torch.equal(module.project, ref["project"])
    assert "project" in module.state_dict()
    torch.testing.assert_close(module(ref["input"]), ref["output"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module(ref["input_batched"]), ref["output_batched"], rtol=1e-6, atol=1e-6)


def test_distance_bbox_roundtrip():
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(7, 2, generator=gen) * 50
    dist = torch.rand(7, 4, generator=gen) * 20
    boxes = distance2bbox(points, dist)
    torch.testing.assert_close(bbox2distance(points, boxes), dist, rtol=0, atol=1e-5)
    clamped = distance2bbox(points, dist * 10, max_shape=(30, 40))
    assert clamped[:, [0, 2]].min() >= 0 and clamped[:, [0, 2]].max() <= 40
    assert clamped[:, [1, 3]].max() <= 30


def _check_post(dets: list[Detections], post: dict) -> None:
    for det, ref in zip(dets, post["per_image"]):
        assert torch.equal(det.labels, ref["labels"]), "labels or order differ from the official NMS"
        torch.testing.assert_close(det.boxes, ref["dets"][:, :4], rtol=0, atol=BOX_ATOL)
        torch.testing.assert_close(det.scores, ref["dets"][:, 4], rtol=0, atol=1e-5)
        assert det.labels.dtype == torch.int64
        assert torch.all(det.scores[:-1] >= det.scores[1:])


@pytest.mark.parametrize("key", ["post", "post_shifted"])
def test_postprocess_equals_golden(blob, key):
    post = blob[key]
    head_out = blob["head_out"].clone()
    head_out[..., :NUM_CLASSES] += post["cls_logit_shift"]
    hw = blob["meta"]["input_hw"]
    priors = make_priors(hw, STRIDES)
    dets = postprocess(head_out, priors, NUM_CLASSES, REG_MAX, hw, score_thr=post["score_thr"],
                       iou_thr=post["iou_threshold"], max_dets=post["max_num"])
    _check_post(dets, post)
    if key == "post_shifted":
        assert all(len(d.labels) == 100 for d in dets)  # max_dets actually truncates here
    # the NMS inputs: decoded clamped boxes and sigmoid scores
    scores, boxes = decode_for_export(head_out, priors, NUM_CLASSES, REG_MAX, hw)
    for i, ref in enumerate(post["per_image"]):
        torch.testing.assert_close(boxes[i], ref["nms_in_bboxes"], rtol=0, atol=BOX_ATOL)
        torch.testing.assert_close(scores[i], ref["nms_in_scores"][:, :NUM_CLASSES], rtol=0, atol=1e-6)
        assert int((scores[i] > post["score_thr"]).sum()) == ref["num_candidates"]


def test_postprocess_probabilities_and_split_path(golden, monkeypatch):
    """ONNX-style input (sigmoid already applied) and the per-class NMS path give the same result."""
    post = golden["post_shifted"]
    head_out = golden["head_out"].clone()
    head_out[..., :NUM_CLASSES] += post["cls_logit_shift"]
    probs = head_out.clone()
    probs[..., :NUM_CLASSES] = probs[..., :NUM_CLASSES].sigmoid()
    priors = make_priors((128, 128), STRIDES)
    _check_post(postprocess(probs, priors, NUM_CLASSES, REG_MAX, (128, 128), scores_are_logits=False), post)
    monkeypatch.setattr(decode, "_NMS_SPLIT_THR", 0)
    _check_post(postprocess(head_out, priors, NUM_CLASSES, REG_MAX, (128, 128)), post)


def test_postprocess_thresholds_and_empty(golden):
    priors = make_priors((128, 128), STRIDES)
    few = postprocess(golden["head_out"], priors, NUM_CLASSES, REG_MAX, (128, 128), max_dets=5)
    ref = golden["post"]["per_image"][0]
    assert torch.equal(few[0].labels, ref["labels"][:5])
    none = postprocess(golden["head_out"], priors, NUM_CLASSES, REG_MAX, (128, 128), score_thr=1.0)
    assert [len(d.scores) for d in none] == [0, 0]
    assert none[0].boxes.shape == (0, 4) and none[0].labels.dtype == torch.int64


def test_postprocess_under_autocast(golden):
    priors = make_priors((128, 128), STRIDES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dets = postprocess(golden["head_out"], priors, NUM_CLASSES, REG_MAX, (128, 128))
    _check_post(dets, golden["post"])


def test_decode_boxes_unclamped_and_errors(golden):
    priors = make_priors((128, 128), STRIDES)
    reg = golden["head_out"][..., NUM_CLASSES:]
    boxes = decode_boxes(reg, priors, REG_MAX)
    assert boxes.shape == (2, priors.shape[0], 4)
    assert boxes.min() < 0  # stride-64 boxes reach far outside a 128 px image before clamping
    with pytest.raises(ValueError, match="reg_max"):
        decode_boxes(reg, priors, 8)
    with pytest.raises(ValueError, match="priors"):
        postprocess(golden["head_out"], make_priors((64, 64), STRIDES), NUM_CLASSES, REG_MAX, (64, 64))
    with pytest.raises(ValueError, match="num_classes=4"):
        postprocess(golden["head_out"], priors, 4, REG_MAX, (128, 128))
