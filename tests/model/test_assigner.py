"""Batched Dynamic Soft Label Assigner and target building against the official tensors (golden
``assigner_unit`` and ``train.*.assign*``) and against the per-image reference on random cases."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.assigner import (
    AssignResult,
    DynamicSoftLabelAssigner,
    assign_reference_single,
    bench_assign,
    build_targets,
)
from pipeline.model.decode import make_priors
from pipeline.model.losses import bbox_overlaps

NUM_CLASSES, REG_MAX = 3, 7
ASSIGNER = DynamicSoftLabelAssigner(topk=13, iou_factor=3.0)


def pad(boxes: list[torch.Tensor], labels: list[torch.Tensor]):
    """Per-image GT lists -> padded ``gt_boxes [B, G, 4]``, ``gt_labels [B, G]``, ``gt_valid [B, G]``."""
    num_gt = max([len(b) for b in boxes] + [0])
    gt_boxes = torch.zeros(len(boxes), num_gt, 4)
    gt_labels = torch.zeros(len(boxes), num_gt, dtype=torch.long)
    gt_valid = torch.zeros(len(boxes), num_gt, dtype=torch.bool)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        gt_boxes[i, :len(b)], gt_labels[i, :len(b)], gt_valid[i, :len(b)] = b, lab, True
    return gt_boxes, gt_labels, gt_valid


def check_assign(result: AssignResult, i: int, ref: dict) -> None:
    assert torch.equal(result.assigned_gt_inds[i], ref["assigned_gt_inds"])
    assert torch.equal(result.labels[i], ref["labels"])
    torch.testing.assert_close(result.max_overlaps[i], ref["max_overlaps"], rtol=0, atol=1e-5)


def check_targets(targets, i: int, ref: dict) -> None:
    assert torch.equal(targets.labels[i], ref["labels"])
    assert int(targets.num_pos[i]) == ref["num_pos"]
    assert torch.equal(targets.label_weights[i], ref["label_weights"])
    for key in ("label_scores", "bbox_targets", "dist_targets"):
        torch.testing.assert_close(getattr(targets, key)[i], ref[key], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def unit(golden):
    return golden["assigner_unit"]


@pytest.mark.parametrize("name", ["main", "empty_gt", "no_valid_prior", "degenerate_gt", "clamp_and_outside"])
def test_assigner_unit_calls(unit, name):
    call, priors = unit["calls"][name], unit["priors"]
    assert unit["topk"] == ASSIGNER.topk and unit["iou_factor"] == ASSIGNER.iou_factor
    gt_boxes, gt_labels, gt_valid = pad([call["gt_bboxes"]], [call["gt_labels"]])
    result = ASSIGNER.assign(call["scores"][None], priors, call["decoded_bboxes"][None], gt_boxes, gt_labels,
                             gt_valid)
    check_assign(result, 0, call["assign"])
    check_targets(build_targets(result, priors, gt_boxes, gt_labels, NUM_CLASSES, REG_MAX), 0, call["targets"])
    ref = assign_reference_single(call["scores"], priors, call["decoded_bboxes"], call["gt_bboxes"],
                                  call["gt_labels"])
    check_assign(AssignResult(*(t[None] for t in ref)), 0, call["assign"])
    if "cost_matrix" in call:  # the matching internals on the valid priors
        valid = call["valid_mask"]
        ious = bbox_overlaps(call["decoded_bboxes"], call["gt_bboxes"])[valid]
        torch.testing.assert_close(ious, call["pairwise_ious"], rtol=0, atol=1e-6)
        cost = ASSIGNER._cost(call["scores"][valid][None], ious[None], call["gt_labels"][None])[0]
        torch.testing.assert_close(cost, call["cost_matrix"], rtol=1e-5, atol=1e-5)


def test_assigner_unit_calls_in_one_batch(unit):
    """All five hand-made cases (empty, no valid prior, degenerate, conflicts, clamps) batched together."""
    calls = list(unit["calls"].values())
    gt_boxes, gt_labels, gt_valid = pad([c["gt_bboxes"] for c in calls], [c["gt_labels"] for c in calls])
    gt_boxes[~gt_valid] = torch.tensor([1.0, 1.0, 60.0, 60.0])  # padding must not matter
    gt_labels[~gt_valid] = -1
    result = ASSIGNER.assign(torch.stack([c["scores"] for c in calls]), unit["priors"],
                             torch.stack([c["decoded_bboxes"] for c in calls]), gt_boxes, gt_labels, gt_valid)
    targets = build_targets(result, unit["priors"], gt_boxes, gt_labels, NUM_CLASSES, REG_MAX)
    for i, call in enumerate(calls):
        check_assign(result, i, call["assign"])
        check_targets(targets, i, call["targets"])


@pytest.mark.parametrize("epoch", ["epoch_0", "epoch_10"])
def test_training_assignment_per_image_and_batched(golden, epoch):
    train = golden["train"][epoch]
    inputs = train["assign_inputs"]
    priors = make_priors(golden["meta"]["input_hw"], [8, 16, 32, 64])
    for i, inp in enumerate(inputs):
        assert torch.equal(inp["center_priors"], priors)
        gt = pad([inp["gt_bboxes"]], [inp["gt_labels"]])
        result = ASSIGNER.assign(inp["cls_preds"][None], priors, inp["decoded_bboxes"][None], *gt)
        check_assign(result, 0, train["assigner_result"][i])
        check_targets(build_targets(result, priors, gt[0], gt[1], NUM_CLASSES, REG_MAX), 0, train["assign"][i])
    gt_boxes, gt_labels, gt_valid = pad([x["gt_bboxes"] for x in inputs], [x["gt_labels"] for x in inputs])
    result = ASSIGNER.assign(torch.stack([x["cls_preds"] for x in inputs]), priors,
                             torch.stack([x["decoded_bboxes"] for x in inputs]), gt_boxes, gt_labels, gt_valid)
    targets = build_targets(result, priors, gt_boxes, gt_labels, NUM_CLASSES, REG_MAX)
    for i in range(len(inputs)):
        check_assign(result, i, train["assigner_result"][i])
        check_targets(targets, i, train["assign"][i])


def random_case(seed: int):
    """A batch with varied size, G (incl. 0), classes, boxes partly outside the image, zero-area and
    near-duplicate boxes (conflicts), padding in the middle of the GT axis, and sometimes very low scores
    (the cost of zero-IoU pairs then rounds to equal values: exercises the tie rule)."""
    gen = torch.Generator().manual_seed(seed)
    height, width = [(64, 64), (64, 96), (96, 64), (32, 32)][seed % 4]
    priors = make_priors((height, width), [8, 16, 32, 64])
    num_priors = priors.shape[0]
    batch = int(torch.randint(1, 5, (1,), generator=gen))
    num_classes = 80 if seed % 3 == 0 else int(torch.randint(1, 12, (1,), generator=gen))
    num_gt = int(torch.randint(0, 9 if seed % 2 else 30, (1,), generator=gen))
    low = seed % 7 == 0
    logits = torch.randn(batch, num_priors, num_classes, generator=gen) * (0.3 if low else 2) - (9 if low else 2)
    half = (torch.rand(batch, num_priors, 4, generator=gen) * 4 + 0.1) * priors[:, None, 2] * 0.7
    decoded = torch.cat([priors[:, :2] - half[..., :2], priors[:, :2] + half[..., 2:]], dim=-1)
    size = torch.tensor([width, height], dtype=torch.float32)
    center = torch.rand(batch, num_gt, 2, generator=gen) * size * 1.4 - size * 0.2
    wh = torch.rand(batch, num_gt, 2, generator=gen) * size * 0.6
    gt_boxes = torch.cat([center - wh / 2, center + wh / 2], dim=-1)
    degenerate = torch.rand(batch, num_gt, generator=gen) < 0.1
    gt_boxes[degenerate] = gt_boxes[degenerate][:, [0, 1, 0, 1]]
    if num_gt >= 2 and seed % 5 == 0:  # near-duplicates -> priors picked by several GTs
        gt_boxes[:, 1] = gt_boxes[:, 0] + torch.rand(batch, 4, generator=gen) * 2
    gt_labels = torch.randint(0, num_classes, (batch, num_gt), generator=gen)
    gt_valid = torch.rand(batch, num_gt, generator=gen) < 0.8
    return priors, logits, decoded, gt_boxes, gt_labels, gt_valid


def test_batched_equals_reference_on_random_cases():
    conflicts = ties = 0
    for seed in range(400):
        priors, logits, decoded, gt_boxes, gt_labels, gt_valid = random_case(seed)
        result = ASSIGNER.assign(logits, priors, decoded, gt_boxes, gt_labels, gt_valid)
        for b in range(logits.shape[0]):
            keep = gt_valid[b].nonzero().squeeze(1)
            ref = assign_reference_single(logits[b], priors, decoded[b], gt_boxes[b, keep], gt_labels[b, keep])
            ref_inds = torch.where(ref.assigned_gt_inds > 0,
                                   keep[(ref.assigned_gt_inds - 1).clamp(min=0)] + 1 if len(keep) else 0, 0)
            msg = f"seed {seed} image {b}"
            assert torch.equal(result.assigned_gt_inds[b], ref_inds), msg
            assert torch.equal(result.labels[b], ref.labels), msg
            assert torch.equal(result.max_overlaps[b], ref.max_overlaps), msg
            pos = ref_inds > 0
            if pos.any():
                ious = bbox_overlaps(decoded[b][pos], gt_boxes[b][gt_valid[b]])
                conflicts += int(((ious > 0).sum(1) > 1).sum())
                ties += int((ref.max_overlaps[pos] == 0).sum())
    assert conflicts > 100 and ties > 20  # the cases really exercise conflicts and zero-IoU picks


def test_ties_pick_lowest_prior_index():
    priors = make_priors((32, 32), [8])
    logits = torch.full((1, priors.shape[0], 2), -20.0)  # every zero-IoU candidate costs the same
    decoded = torch.cat([priors[:, :2] + 100, priors[:, :2] + 101], dim=-1)[None]  # overlaps nothing
    gt_boxes = torch.tensor([[[1.0, 1.0, 30.0, 30.0], [5.0, 5.0, 5.0, 5.0]]])
    gt_valid = torch.tensor([[True, True]])
    result = ASSIGNER.assign(logits, priors, decoded, gt_boxes, torch.tensor([[0, 1]]), gt_valid)
    first_inside = 4 + 1  # (8, 8): the first prior strictly inside the box
    assert result.assigned_gt_inds[0].nonzero().squeeze(1).tolist() == [first_inside]
    ref = assign_reference_single(logits[0], priors, decoded[0], gt_boxes[0], torch.tensor([0, 1]))
    assert torch.equal(ref.assigned_gt_inds, result.assigned_gt_inds[0])


def test_no_gt_axis_and_targets_shapes():
    priors = make_priors((64, 64), [8, 16])
    logits = torch.randn(3, priors.shape[0], 4)
    decoded = torch.cat([priors[:, :2] - 4, priors[:, :2] + 4], dim=-1).expand(3, -1, -1)
    empty = (torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0, dtype=torch.bool))
    result = ASSIGNER.assign(logits, priors, decoded, *empty)
    assert result.assigned_gt_inds.abs().sum() == 0 and result.max_overlaps.abs().sum() == 0
    assert torch.all(result.labels == -1)
    targets = build_targets(result, priors, empty[0], empty[1], 4, REG_MAX)
    assert torch.all(targets.labels == 4) and targets.num_pos.tolist() == [0, 0, 0]
    assert targets.dist_targets.shape == (3, priors.shape[0], 4) and targets.num_pos.dtype == torch.int64


def test_bench_assign_runs_and_agrees():
    out = bench_assign(batch=2, num_gt=5, input_hw=(64, 64), num_classes=4, repeats=1)
    assert out["same_assignment"] and out["batched_ms"] > 0 and out["loop_ms"] > 0
    assert (out["batch"], out["num_gt"], out["num_classes"]) == (2, 5, 4)
    assert out["num_priors"] == make_priors((64, 64), [8, 16, 32, 64]).shape[0] == 64 + 16 + 4 + 1
    assert out["speedup"] == pytest.approx(out["loop_ms"] / out["batched_ms"], rel=1e-9)
