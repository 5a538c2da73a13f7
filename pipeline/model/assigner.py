"""Dynamic Soft Label Assigner of NanoDet-Plus (spec section 8), batched over images, and target building.

The official assigner runs once per image; here one call handles the whole padded batch (``gt_valid``
masks the padding) with no Python loop over images or GT boxes, and gives the per-image result in every
case. :func:`assign_reference_single` is the per-image algorithm written out directly (tests, benchmark).

Per image, with P priors and G boxes:
  * a prior is *valid* when its point lies strictly inside at least one GT box;
  * on valid priors: IoU(pred box, GT) (union floored at 1e-6), and the cost
    ``sum_c BCE(logit_c, soft_c) * |soft_c - sigmoid(logit_c)|^2 + 3 * -ln(IoU + 1e-7)``
    with ``soft = one_hot(gt_label) * IoU`` (summed over ALL classes);
  * dynamic k per GT: ``max(1, int(sum of its min(13, V) largest IoUs over the V valid priors))``; each GT
    picks its k cheapest valid priors; a prior picked by several GTs keeps the cheapest GT over all GTs;
  * no GT or no valid prior: everything background, ``max_overlaps`` 0, labels -1 (official early return);
    otherwise ``max_overlaps`` is -1e8 on non-foreground priors.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.model.decode import bbox2distance, priors_for
from pipeline.model.losses import bbox_overlaps

_INF = 100000000.0  # official "max_overlaps" fill of non-foreground priors is -INF
_IOU_EPS = 1e-6
_LOG_EPS = 1e-7


class AssignResult(NamedTuple):
    assigned_gt_inds: Tensor  # [B, N] int64: 1-based index into the padded GT axis, 0 = background
    max_overlaps: Tensor  # [B, N] IoU of the predicted box with its GT on positives (see module doc)
    labels: Tensor  # [B, N] int64 class of the matched GT, -1 elsewhere


class Targets(NamedTuple):
    labels: Tensor  # [B, N] int64, num_classes = background
    label_scores: Tensor  # [B, N] soft QFL target: IoU of the assigning box with its GT on positives
    label_weights: Tensor  # [B, N] 1 for positives and negatives
    bbox_targets: Tensor  # [B, N, 4] matched GT box (pixels) on positives, 0 elsewhere
    dist_targets: Tensor  # [B, N, 4] (l, t, r, b) in stride units, clamped to [0, R - 0.1], 0 elsewhere
    num_pos: Tensor  # [B] int64


def _inside_gt(priors: Tensor, gt_boxes: Tensor) -> Tensor:
    """``priors [N, 4]``, ``gt_boxes [..., G, 4]`` -> ``[..., N, G]`` bool: point strictly inside the box."""
    xy = priors[:, None, :2]  # [N, 1, 2]
    lt = xy - gt_boxes[..., None, :, :2]
    rb = gt_boxes[..., None, :, 2:] - xy
    return torch.cat([lt, rb], dim=-1).min(dim=-1).values > 0


class DynamicSoftLabelAssigner:
    """Batched DSLA. ``topk`` candidates for the dynamic k, ``iou_factor`` weight of the IoU cost."""

    def __init__(self, topk: int = 13, iou_factor: float = 3.0):
        if topk < 1:
            raise ValueError(f"model.assigner.topk must be >= 1, got {topk}")
        self.topk = topk
        self.iou_factor = iou_factor

    @torch.no_grad()
    def assign(self, cls_logits: Tensor, priors: Tensor, decoded: Tensor, gt_boxes: Tensor,
               gt_labels: Tensor, gt_valid: Tensor) -> AssignResult:
        """``cls_logits [B, N, C]``, ``priors [N, 4]``, ``decoded [B, N, 4]`` (pixels, unclamped),
        ``gt_boxes [B, G, 4]``, ``gt_labels [B, G]``, ``gt_valid [B, G]`` bool -> :class:`AssignResult`."""
        batch, num_priors, num_classes = cls_logits.shape
        device = cls_logits.device
        if gt_boxes.shape[1] == 0 or num_priors == 0:
            return _background(batch, num_priors, device, fill=0.0)
        cls_logits, decoded, gt_boxes = cls_logits.float(), decoded.float(), gt_boxes.float()
        labels_safe = torch.where(gt_valid, gt_labels, 0).clamp(0, num_classes - 1)
        # pair [b, n, g] takes part when prior n is valid in image b (inside some real GT) and g is real
        valid = (_inside_gt(priors, gt_boxes) & gt_valid[:, None, :]).any(dim=-1)  # [B, N]
        pair = valid[:, :, None] & gt_valid[:, None, :]  # [B, N, G]
        ious = bbox_overlaps(decoded, gt_boxes, eps=_IOU_EPS)  # [B, N, G]
        cost = self._cost(cls_logits, ious, labels_safe).masked_fill(~pair, float("inf"))

        # dynamic k: non-valid priors count as IoU 0, which leaves the top-min(topk, V) sum unchanged
        k_cand = min(self.topk, num_priors)
        top_ious = ious.masked_fill(~pair, 0.0).topk(k_cand, dim=1).values  # [B, k_cand, G]
        dynamic_k = top_ious.sum(dim=1).int().clamp(min=1)  # [B, G]; <= min(topk, V) as IoU <= 1
        # each GT takes its k cheapest valid priors (k <= k_cand, and never reaches an inf entry)
        pick = _smallest_k_lowest_index(cost, k_cand)  # [B, k_cand, G]
        take = torch.arange(k_cand, device=device)[None, :, None] < dynamic_k[:, None, :]
        matching = torch.zeros_like(pair).scatter_(1, pick, take.expand_as(pick)) & pair  # [B, N, G]

        # a prior picked by several GTs keeps the GT of minimum cost over all GTs (official torch.min)
        num_matched = matching.sum(dim=-1)
        cheapest = cost.min(dim=-1).indices  # [B, N]
        first = matching.to(torch.uint8).argmax(dim=-1)
        matched_gt = torch.where(num_matched > 1, cheapest, first)
        fg = num_matched > 0

        matched_iou = ious.gather(2, matched_gt[..., None]).squeeze(-1)
        has_valid = valid.any(dim=1, keepdim=True)  # [B, 1]; False -> the official early return
        background_fill = torch.where(has_valid, -_INF, 0.0)
        return AssignResult(
            assigned_gt_inds=torch.where(fg, matched_gt + 1, 0),
            max_overlaps=torch.where(fg, matched_iou, background_fill),
            labels=torch.where(fg, gt_labels.gather(1, matched_gt), -1),
        )

    def _cost(self, cls_logits: Tensor, ious: Tensor, gt_labels: Tensor) -> Tensor:
        """Soft-label cost ``[B, N, G]`` without the ``[B, N, G, C]`` tensor of the literal formula.

        Off the GT's class the soft target is 0, so those C-1 terms do not depend on g: the class sum is
        ``sum_c neg_c + (pos_label(IoU) - neg_label)`` with ``neg_c = BCE(logit_c, 0) * sigmoid^2``
        (equal to the literal sum up to the float rounding of the summation order).
        """
        sigma = cls_logits.sigmoid()
        neg = F.binary_cross_entropy_with_logits(cls_logits, torch.zeros_like(cls_logits),
                                                 reduction="none") * sigma.abs().pow(2.0)  # [B, N, C]
        index = gt_labels[:, None, :].expand(-1, cls_logits.shape[1], -1)  # [B, N, G]
        logit_l = cls_logits.gather(2, index)
        neg_l = neg.gather(2, index)
        pos_l = F.binary_cross_entropy_with_logits(logit_l, ious, reduction="none") \
            * (ious - logit_l.sigmoid()).abs().pow(2.0)
        # (pos_l - neg_l) is exactly 0 where IoU == 0, so such pairs get exactly the class sum of the
        # literal formula: that keeps the equal-cost groups (and their tie-breaking) of the official one.
        cls_cost = neg.sum(dim=-1, keepdim=True) + (pos_l - neg_l)
        return cls_cost + self.iou_factor * -torch.log(ious + _LOG_EPS)


def _smallest_k_lowest_index(cost: Tensor, k: int) -> Tensor:
    """Indices ``[B, k, G]`` of the k smallest costs along dim 1, equal costs ordered by lower index.

    The official per-GT ``torch.topk(largest=False)`` breaks exact ties in an implementation-defined way
    (std::nth_element or partial_sort on CPU, radix select on CUDA, depending on slice length), which no
    batched call can reproduce. Exact ties do happen: a GT that overlaps no predicted box gets k = 1 and
    every candidate costs the same ``sum_c neg_c + 3 * -ln(1e-7)`` once the class term vanishes in
    float32 rounding. Here the lowest prior index wins, on every device. The key is the order-preserving
    integer image of the float32 cost in the high 32 bits and the prior index in the low 32 bits.
    """
    bits = cost.float().contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # monotone in the float value
    index = torch.arange(cost.shape[1], device=cost.device, dtype=torch.int64)[None, :, None]
    return (ordered * (1 << 32) + index).topk(k, dim=1, largest=False).indices


def _background(batch: int, num_priors: int, device, fill: float) -> AssignResult:
    return AssignResult(
        assigned_gt_inds=torch.zeros(batch, num_priors, dtype=torch.long, device=device),
        max_overlaps=torch.full((batch, num_priors), fill, device=device),
        labels=torch.full((batch, num_priors), -1, dtype=torch.long, device=device),
    )


@torch.no_grad()
def assign_reference_single(cls_logits: Tensor, priors: Tensor, decoded: Tensor, gt_boxes: Tensor,
                            gt_labels: Tensor, topk: int = 13, iou_factor: float = 3.0) -> AssignResult:
    """One image, the algorithm as written in spec section 8 (loops over GTs, ``[V, G, C]`` soft labels).

    The one deliberate choice beyond the spec: equal costs are picked in prior-index order (see
    :func:`_smallest_k_lowest_index`); the official topk leaves that order implementation-defined.

    ``cls_logits [N, C]``, ``priors [N, 4]``, ``decoded [N, 4]``, ``gt_boxes [G, 4]``, ``gt_labels [G]``
    -> :class:`AssignResult` with ``[N]`` tensors. Used by the tests and by :func:`bench_assign`.
    """
    num_priors, num_gt = decoded.shape[0], gt_boxes.shape[0]
    assigned = torch.zeros(num_priors, dtype=torch.long, device=decoded.device)
    valid = _inside_gt(priors, gt_boxes).any(dim=1) if num_gt else torch.zeros_like(assigned, dtype=torch.bool)
    num_valid = int(valid.sum())
    if num_gt == 0 or num_priors == 0 or num_valid == 0:
        return AssignResult(assigned, decoded.new_zeros(num_priors), torch.full_like(assigned, -1))
    scores = cls_logits[valid]
    ious = bbox_overlaps(decoded[valid], gt_boxes, eps=_IOU_EPS)  # [V, G]
    iou_cost = -torch.log(ious + _LOG_EPS)
    one_hot = F.one_hot(gt_labels.long(), scores.shape[-1]).float()[None].repeat(num_valid, 1, 1)
    scores_vgc = scores[:, None, :].repeat(1, num_gt, 1)
    soft = one_hot * ious[..., None]
    cls_cost = (F.binary_cross_entropy_with_logits(scores_vgc, soft, reduction="none")
                * (soft - scores_vgc.sigmoid()).abs().pow(2.0)).sum(dim=-1)
    cost = cls_cost + iou_cost * iou_factor

    matching = torch.zeros_like(cost)
    top_ious = ious.topk(min(topk, num_valid), dim=0).values
    dynamic_k = top_ious.sum(dim=0).int().clamp(min=1)
    for g in range(num_gt):
        # stable sort: among equal costs the lower prior index first (the batched assigner's tie rule)
        picked = cost[:, g].sort(stable=True).indices[: int(dynamic_k[g])]
        matching[picked, g] = 1.0
    conflict = matching.sum(dim=1) > 1
    if conflict.any():
        cheapest = cost[conflict].min(dim=1).indices
        matching[conflict] = 0.0
        matching[conflict.nonzero().squeeze(1), cheapest] = 1.0
    fg_valid = matching.sum(dim=1) > 0
    matched_gt = matching[fg_valid].argmax(dim=1)
    fg = valid.clone()
    fg[valid] = fg_valid
    assigned[fg] = matched_gt + 1
    labels = torch.full_like(assigned, -1)
    labels[fg] = gt_labels[matched_gt].long()
    max_overlaps = torch.full((num_priors,), -_INF, device=decoded.device)
    max_overlaps[fg] = (matching * ious).sum(dim=1)[fg_valid]
    return AssignResult(assigned, max_overlaps, labels)


def build_targets(assign_result: AssignResult, priors: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                  num_classes: int, reg_max: int) -> Targets:
    """Training targets from a batched assignment (official ``target_assign_single_img`` + ``sample``).

    ``priors [N, 4]``, ``gt_boxes [B, G, 4]``, ``gt_labels [B, G]`` -> :class:`Targets`.
    """
    pos = assign_result.assigned_gt_inds > 0  # [B, N]
    gt_index = (assign_result.assigned_gt_inds - 1).clamp(min=0)
    if gt_boxes.shape[1] == 0:  # nothing to gather from; every prior is background
        matched_boxes = gt_boxes.new_zeros(pos.shape + (4,))
        matched_labels = torch.zeros_like(gt_index)
    else:
        matched_boxes = gt_boxes.float().gather(1, gt_index[..., None].expand(-1, -1, 4))
        matched_labels = gt_labels.gather(1, gt_index)
    dist = bbox2distance(priors[:, :2], matched_boxes) / priors[:, None, 2]
    dist = dist.clamp(min=0, max=reg_max - 0.1)
    pos4 = pos[..., None]
    return Targets(
        labels=torch.where(pos, matched_labels, num_classes),
        label_scores=torch.where(pos, assign_result.max_overlaps, 0.0),
        # weight 0 would mark "ignored" priors (assigned -1), which this assigner never produces
        label_weights=(assign_result.assigned_gt_inds >= 0).float(),
        bbox_targets=torch.where(pos4, matched_boxes, 0.0),
        dist_targets=torch.where(pos4, dist, 0.0),
        num_pos=pos.sum(dim=1),
    )


def bench_assign(batch: int = 16, num_gt: int = 10, input_hw: tuple[int, int] = (320, 320),
                 strides: tuple[int, ...] = (8, 16, 32, 64), num_classes: int = 80, repeats: int = 5,
                 device: str = "cpu", seed: int = 0) -> dict:
    """Time the batched assigner against a per-image loop of :func:`assign_reference_single`.

    Random logits, random predicted boxes around the priors, ``num_gt`` random GT boxes per image.
    Returns milliseconds per batch (median of ``repeats``) and whether both gave the same assignment.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    priors = priors_for(input_hw, strides, device=dev)
    num_priors = priors.shape[0]
    height, width = input_hw
    logits = (torch.randn(batch, num_priors, num_classes, generator=gen) * 2 - 3).to(dev)
    half = (torch.rand(batch, num_priors, 4, generator=gen) * 3 + 0.5).to(dev) * priors[:, None, 2]
    decoded = torch.cat([priors[:, :2] - half[..., :2], priors[:, :2] + half[..., 2:]], dim=-1)
    xy = torch.rand(batch, num_gt, 2, generator=gen) * torch.tensor([width, height])
    wh = torch.rand(batch, num_gt, 2, generator=gen) * torch.tensor([width, height]) * 0.5 + 4
    gt_boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=-1).to(dev)
    gt_labels = torch.randint(0, num_classes, (batch, num_gt), generator=gen).to(dev)
    gt_valid = torch.ones(batch, num_gt, dtype=torch.bool, device=dev)
    assigner = DynamicSoftLabelAssigner()

    def batched():
        return assigner.assign(logits, priors, decoded, gt_boxes, gt_labels, gt_valid)

    def loop():
        return [assign_reference_single(logits[i], priors, decoded[i], gt_boxes[i], gt_labels[i])
                for i in range(batch)]

    timings = {}
    for name, fn in (("batched", batched), ("loop", loop)):
        fn()  # warm-up
        runs = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            runs.append((time.perf_counter() - start) * 1e3)
        timings[name] = (sorted(runs)[len(runs) // 2], out)
    ref = torch.stack([r.assigned_gt_inds for r in timings["loop"][1]])
    return {"batch": batch, "num_gt": num_gt, "num_priors": num_priors, "num_classes": num_classes,
            "device": str(dev), "batched_ms": timings["batched"][0], "loop_ms": timings["loop"][0],
            "speedup": timings["loop"][0] / max(timings["batched"][0], 1e-9),
            "same_assignment": bool(torch.equal(ref, timings["batched"][1].assigned_gt_inds))}
