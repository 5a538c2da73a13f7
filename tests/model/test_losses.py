"""QFL, DFL, GIoU and bbox_overlaps against the official values (golden ``losses_unit``)."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.losses import (
    bbox_overlaps,
    distribution_focal_loss,
    giou_loss,
    giou_loss_masked,
    quality_focal_loss,
    weight_reduce_loss,
)


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected, dtype=torch.float32),
                               rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def unit(golden):
    return golden["losses_unit"]


def test_settings(unit):
    assert unit["settings"]["qfl_beta"] == 2.0 and unit["settings"]["giou_eps"] == 1e-6


def test_quality_focal_loss(unit):
    q = unit["qfl"]
    beta, weight = unit["settings"]["qfl_beta"], unit["settings"]["qfl_loss_weight"]
    args = (q["pred"], q["labels"], q["scores"])
    close(quality_focal_loss(*args, q["weight"], q["avg_factor"], beta=beta, loss_weight=weight), q["loss"])
    close(quality_focal_loss(*args, q["weight"], q["avg_factor"], "none", beta, weight), q["loss_none"])
    close(quality_focal_loss(*args, beta=beta, loss_weight=weight), q["loss_mean_noweight"])
    close(quality_focal_loss(q["pred"], q["zero_pos_labels"], q["zero_pos_scores"], torch.ones(16), 1.0,
                             beta=beta, loss_weight=weight), q["zero_pos_loss"])


def test_distribution_focal_loss(unit):
    d = unit["dfl"]
    lw = unit["settings"]["dfl_loss_weight"]
    close(distribution_focal_loss(d["pred"], d["target"], d["weight"], d["avg_factor"], loss_weight=lw), d["loss"])
    close(distribution_focal_loss(d["pred"], d["target"], d["weight"], d["avg_factor"], "none", lw),
          d["loss_none"])
    close(distribution_focal_loss(d["pred"], d["target"], loss_weight=lw), d["loss_mean_noweight"])
    empty = distribution_focal_loss(d["pred"][:0], d["target"][:0], d["weight"][:0], d["avg_factor"],
                                    loss_weight=lw)
    close(empty, d["zero_pos_loss"])


def test_giou_loss_and_overlaps(unit):
    g = unit["giou"]
    lw, eps = unit["settings"]["giou_loss_weight"], unit["settings"]["giou_eps"]
    pred, target = g["pred"], g["target"]
    close(giou_loss(pred, target, g["weight"], g["avg_factor"], loss_weight=lw, eps=eps), g["loss"])
    close(giou_loss(pred, target, g["weight"], g["avg_factor"], "none", lw, eps), g["loss_none"])
    close(giou_loss(pred, target, loss_weight=lw, eps=eps), g["loss_mean_noweight"])
    close(bbox_overlaps(pred, target, "giou", is_aligned=True, eps=eps), g["giou_aligned"])
    close(bbox_overlaps(pred, target, eps=unit["settings"]["iou_eps"]), g["iou_pairwise_pred_vs_target"])
    close(giou_loss_masked(pred, target, g["weight"], g["avg_factor"], loss_weight=lw, eps=eps), g["loss"])


def test_zero_weight_giou_is_graph_connected_zero(unit):
    g = unit["giou"]
    pred = g["pred"].clone().requires_grad_()
    loss = giou_loss(pred, g["target"], torch.zeros(10), loss_weight=2.0)
    close(loss, g["zero_weight_loss"])
    loss.backward()
    assert pred.grad is not None and torch.count_nonzero(pred.grad) == 0
    # the masked variant gives the same zero without the host-side check
    assert giou_loss_masked(g["pred"], g["target"], torch.zeros(10), avg_factor=1.0).item() == 0.0


def test_bbox_overlaps_batched_matches_single():
    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(3, 6, 2, generator=gen) * 20
    boxes1 = torch.cat([xy, xy + torch.rand(3, 6, 2, generator=gen) * 10], dim=-1)
    xy = torch.rand(3, 4, 2, generator=gen) * 20
    boxes2 = torch.cat([xy, xy + torch.rand(3, 4, 2, generator=gen) * 10], dim=-1)
    batched = bbox_overlaps(boxes1, boxes2, mode="giou")
    for b in range(3):
        assert torch.equal(batched[b], bbox_overlaps(boxes1[b], boxes2[b], mode="giou"))
    assert bbox_overlaps(boxes1[0], boxes2[0][:0]).shape == (6, 0)
    with pytest.raises(ValueError, match="equal box counts"):
        bbox_overlaps(boxes1[0], boxes2[0], is_aligned=True)
    with pytest.raises(ValueError, match="mode"):
        bbox_overlaps(boxes1[0], boxes2[0], mode="iof")


def test_weight_reduce_loss_semantics():
    loss = torch.tensor([1.0, 2.0, 3.0])
    weight = torch.tensor([1.0, 0.0, 2.0])
    assert weight_reduce_loss(loss, weight, "mean", avg_factor=2.0).item() == 3.5
    assert weight_reduce_loss(loss, weight, "sum").item() == 7.0
    assert weight_reduce_loss(loss, None, "mean").item() == 2.0
    assert torch.equal(weight_reduce_loss(loss, weight, "none", avg_factor=5.0), loss * weight)
    with pytest.raises(ValueError, match="avg_factor"):
        weight_reduce_loss(loss, weight, "sum", avg_factor=2.0)
    with pytest.raises(ValueError, match="reduction"):
        weight_reduce_loss(loss, weight, "avg")
