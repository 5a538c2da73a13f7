"""Losses of NanoDet-Plus (spec section 7): Quality Focal Loss, Distribution Focal Loss (GFL, Li et al. 2020)
and GIoU loss, with the official ``weight_reduce_loss`` semantics:

    element loss x weight (if given); reduction "mean" with ``avg_factor`` -> sum / avg_factor,
    without -> mean; "sum" -> sum; "none" -> unchanged; then x ``loss_weight``.

All functions are elementwise + one reduction, so they run without host syncs and accept tensor
``avg_factor`` values (the criterion's normalisers stay on the device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_REDUCTIONS = ("none", "mean", "sum")


def weight_reduce_loss(loss: Tensor, weight: Tensor | None = None, reduction: str = "mean",
                       avg_factor: float | Tensor | None = None) -> Tensor:
    """Apply an element-wise ``weight`` and reduce (official ``nanodet/model/loss/utils.py`` semantics)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        if reduction == "mean":
            return loss.mean()
        return loss.sum() if reduction == "sum" else loss
    if reduction == "mean":
        return loss.sum() / avg_factor
    if reduction == "sum":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", is_aligned: bool = False,
                  eps: float = 1e-6) -> Tensor:
    """IoU or GIoU of xyxy boxes, with optional leading batch dims.

    Pairwise: ``[..., M, 4]`` x ``[..., K, 4]`` -> ``[..., M, K]``; aligned: ``[..., M, 4]`` x ``[..., M, 4]``
    -> ``[..., M]``. Union and enclosing area are floored at ``eps`` (mmdet/nanodet convention).
    """
    if mode not in ("iou", "giou"):
        raise ValueError(f"bbox_overlaps mode must be 'iou' or 'giou', got {mode!r}")
    if is_aligned and boxes1.shape[-2] != boxes2.shape[-2]:
        raise ValueError(f"aligned bbox_overlaps needs equal box counts, got {boxes1.shape[-2]} and "
                         f"{boxes2.shape[-2]}")
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    if is_aligned:
        b1, b2 = boxes1, boxes2
    else:  # broadcast to [..., M, K, 4]
        b1, b2 = boxes1[..., :, None, :], boxes2[..., None, :, :]
        area1, area2 = area1[..., :, None], area2[..., None, :]
    lt = torch.max(b1[..., :2], b2[..., :2])
    rb = torch.min(b1[..., 2:], b2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    floor = overlap.new_tensor([eps])
    union = torch.max(area1 + area2 - overlap, floor)
    ious = overlap / union
    if mode == "iou":
        return ious
    enclose_wh = (torch.max(b1[..., 2:], b2[..., 2:]) - torch.min(b1[..., :2], b2[..., :2])).clamp(min=0)
    enclose_area = torch.max(enclose_wh[..., 0] * enclose_wh[..., 1], floor)
    return ious - (enclose_area - union) / enclose_area


def quality_focal_loss(pred: Tensor, labels: Tensor, scores: Tensor, weight: Tensor | None = None,
                       avg_factor: float | Tensor | None = None, reduction: str = "mean",
                       beta: float = 2.0, loss_weight: float = 1.0) -> Tensor:
    """QFL: ``pred [M, C]`` logits, ``labels [M]`` (C = background), ``scores [M]`` soft IoU targets.

    Every element: BCE(p, 0) * sigmoid(p)^beta; at (positive row, its label) instead
    BCE(p, q) * |q - sigmoid(p)|^beta. Summed over classes -> ``[M]``, then weighted and reduced.
    """
    num_classes = pred.shape[-1]
    sigma = pred.sigmoid()
    # BCE(p, 0) is softplus(p); no zeros tensor needed
    neg = F.softplus(pred) * sigma.pow(beta)  # [M, C]
    # one-hot of the positive label; background (label == C) or negative labels match no column
    is_target = labels[:, None] == torch.arange(num_classes, device=pred.device)
    # the positive term only where it is used: one column per row ([M]), not the whole [M, C] grid
    # (BCE's log-sigmoid is the costliest elementwise op of the step on CPU)
    column = labels.clamp(0, num_classes - 1)[:, None]
    q = scores.to(pred.dtype)
    pred_l, sigma_l = pred.gather(1, column).squeeze(1), sigma.gather(1, column).squeeze(1)
    pos = F.binary_cross_entropy_with_logits(pred_l, q, reduction="none") * (q - sigma_l).abs().pow(beta)
    is_pos = (labels >= 0) & (labels < num_classes)
    loss = neg.masked_fill(is_target, 0.0).sum(dim=1) + torch.where(is_pos, pos, 0.0)
    return loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)


def distribution_focal_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None,
                            avg_factor: float | Tensor | None = None, reduction: str = "mean",
                            loss_weight: float = 1.0) -> Tensor:
    """DFL: ``pred [M, R+1]`` bin logits, ``target [M]`` continuous distances in ``[0, R)`` (bins).

    CE(pred, floor(y)) * (floor(y) + 1 - y) + CE(pred, floor(y) + 1) * (y - floor(y)).
    The caller keeps targets below R (the target builder clamps them to R - 0.1).
    """
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    # one log-softmax for both neighbouring bins (cross_entropy twice would compute it twice)
    log_prob = F.log_softmax(pred, dim=-1)
    loss = -(log_prob.gather(1, left[:, None]).squeeze(1) * w_left
             + log_prob.gather(1, right[:, None]).squeeze(1) * w_right)
    return loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)


def giou_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None,
              avg_factor: float | Tensor | None = None, reduction: str = "mean",
              loss_weight: float = 1.0, eps: float = 1e-6) -> Tensor:
    """``1 - GIoU`` of aligned boxes ``pred [M, 4]`` and ``target [M, 4]``.

    As the official GIoULoss: when a weight is given and no weight is positive, returns the
    graph-connected zero ``(pred * weight).sum()`` (this check syncs with the host; the criterion uses
    :func:`giou_loss_masked` instead).
    """
    if weight is not None and not bool(torch.any(weight > 0)):
        return (pred * (weight if weight.dim() == pred.dim() else weight[..., None])).sum()
    if weight is not None and weight.dim() == pred.dim():  # per-coordinate weights: official averages them
        weight = weight.mean(-1)
    return giou_loss_masked(pred, target, weight, avg_factor, reduction, loss_weight, eps)


def giou_loss_masked(pred: Tensor, target: Tensor, weight: Tensor | None = None,
                     avg_factor: float | Tensor | None = None, reduction: str = "mean",
                     loss_weight: float = 1.0, eps: float = 1e-6) -> Tensor:
    """:func:`giou_loss` without the all-zero-weight shortcut (no host sync); supports leading dims."""
    loss = 1 - bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=eps)
    return loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)
