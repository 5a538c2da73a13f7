"""NanoDet-Plus training loss (spec section 7 "Assembly"): one assignment, two heads.

The Assign Guidance Module's (aux head's) detached outputs drive the Dynamic Soft Label Assigner; the
same targets then train both the main head and the aux head with QFL + GIoU + DFL. Everything is
masked arithmetic over the padded ``[B, N]`` grid (no boolean indexing, no ``.item()``), so the step
never waits for the host, and the maths runs in float32 even under autocast.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.config import ModelConfig
from pipeline.dist import reduce_mean
from pipeline.model.assigner import DynamicSoftLabelAssigner, Targets, build_targets
from pipeline.model.decode import decode_boxes, num_bins, priors_for
from pipeline.model.losses import distribution_focal_loss, giou_loss_masked, quality_focal_loss

LOSS_KEYS = ("loss_qfl", "loss_bbox", "loss_dfl", "aux_loss_qfl", "aux_loss_bbox", "aux_loss_dfl")


class NanoDetPlusLoss:
    """``loss(head_out, aux_out, gt_boxes, gt_labels, gt_valid, priors) -> (total, terms, targets)``."""

    def __init__(self, cfg_model: ModelConfig):
        # reg_max is not read here: the head owns it, and every output carries it (width C + 4(R+1))
        self.num_classes = cfg_model.num_classes
        self.strides = list(cfg_model.head.strides)
        self.qfl_beta = cfg_model.loss.qfl_beta
        self.qfl_weight = cfg_model.loss.qfl_weight
        self.dfl_weight = cfg_model.loss.dfl_weight
        self.giou_weight = cfg_model.loss.giou_weight
        self.assigner = DynamicSoftLabelAssigner(topk=cfg_model.assigner.topk,
                                                 iou_factor=cfg_model.assigner.iou_factor)

    def __call__(self, head_out: Tensor, aux_out: Tensor | None, gt_boxes: Tensor, gt_labels: Tensor,
                 gt_valid: Tensor, priors: Tensor) -> tuple[Tensor, dict[str, Tensor], Targets]:
        """``head_out``/``aux_out [B, N, C + 4(R+1)]`` raw outputs (``aux_out`` None: the main head assigns),
        padded GT ``gt_boxes [B, G, 4]`` / ``gt_labels [B, G]`` / ``gt_valid [B, G]``, ``priors [N, 4]``.

        Returns the total loss (main + aux), detached 0-dim terms (``LOSS_KEYS`` plus ``num_pos``, the
        local positive count) and the targets.
        """
        reg_max = self._check(head_out, aux_out, gt_boxes, gt_labels, gt_valid, priors)
        # device-side check (no host sync on CUDA): a label outside [0, C) would silently become background
        in_range = (gt_labels >= 0) & (gt_labels < self.num_classes)
        torch._assert_async((in_range | ~gt_valid).all(),
                            f"gt_labels outside [0, {self.num_classes}) for a valid box: the data's class ids "
                            f"do not match model.num_classes={self.num_classes}")
        with torch.autocast(head_out.device.type, enabled=False):
            priors = priors.float()
            head = self._split(head_out.float(), priors, reg_max)
            aux = self._split(aux_out.float(), priors, reg_max) if aux_out is not None else None
            guide = aux if aux is not None else head
            with torch.no_grad():
                assigned = self.assigner.assign(guide[0].detach(), priors, guide[2].detach(), gt_boxes.float(),
                                                gt_labels, gt_valid)
                targets = build_targets(assigned, priors, gt_boxes.float(), gt_labels, self.num_classes, reg_max)
                # avg factor of QFL: positives over the local batch, cross-rank mean (see reduce_mean)
                num_pos = targets.num_pos.sum()
                num_total = reduce_mean(num_pos.float()).clamp(min=1.0)
            terms = dict(zip(LOSS_KEYS[:3], self._head_loss(*head, targets, num_total)))
            if aux is not None:
                terms.update(zip(LOSS_KEYS[3:], self._head_loss(*aux, targets, num_total)))
            total = sum(terms.values())
        terms = {k: v.detach() for k, v in terms.items()}
        terms["num_pos"] = num_pos
        return total, terms, targets

    def priors(self, input_hw: tuple[int, int], device=None) -> Tensor:
        """Center priors ``[N, 4]`` of an ``(H, W)`` network input for this model's strides."""
        return priors_for(input_hw, self.strides, device=device)

    def _split(self, out: Tensor, priors: Tensor, reg_max: int) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, N, D]`` -> class logits ``[B, N, C]``, bin logits ``[B, N, 4(R+1)]``, boxes ``[B, N, 4]``."""
        cls_logits, reg_logits = out.split([self.num_classes, num_bins(reg_max)], dim=-1)
        return cls_logits, reg_logits, decode_boxes(reg_logits, priors, reg_max)

    def _head_loss(self, cls_logits: Tensor, reg_logits: Tensor, boxes: Tensor, targets: Targets,
                   num_total: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """QFL, GIoU and DFL of one head against the shared targets (official ``_get_loss_from_assign``)."""
        bins_per_side = reg_logits.shape[-1] // 4  # R + 1
        loss_qfl = quality_focal_loss(cls_logits.reshape(-1, self.num_classes), targets.labels.reshape(-1),
                                      targets.label_scores.reshape(-1), targets.label_weights.reshape(-1),
                                      avg_factor=num_total, beta=self.qfl_beta, loss_weight=self.qfl_weight)
        pos = targets.labels < self.num_classes  # [B, N]
        # quality weight of each positive: its highest class probability (detached); 0 on the rest, which
        # removes them from the sums below exactly, so no positive anywhere gives a graph-connected 0
        weight = torch.where(pos, cls_logits.detach().sigmoid().max(dim=-1).values, 0.0)
        # the official code takes the local value here (its reduce_mean returns the un-reduced clone);
        # pipeline.dist.reduce_mean returns the cross-rank mean, so DDP normalises like one big batch
        bbox_avg = reduce_mean(weight.sum()).clamp(min=1.0)
        # negatives get their own box as a stand-in target: well-conditioned GIoU, weight 0 anyway
        box_target = torch.where(pos[..., None], targets.bbox_targets, boxes.detach())
        loss_bbox = giou_loss_masked(boxes.reshape(-1, 4), box_target.reshape(-1, 4), weight.reshape(-1),
                                     avg_factor=bbox_avg, loss_weight=self.giou_weight)
        # negatives have dist target 0 (finite CE) and weight 0
        loss_dfl = distribution_focal_loss(reg_logits.reshape(-1, bins_per_side), targets.dist_targets.reshape(-1),
                                           weight[..., None].expand(-1, -1, 4).reshape(-1),
                                           avg_factor=4.0 * bbox_avg, loss_weight=self.dfl_weight)
        return loss_qfl, loss_bbox, loss_dfl

    def _check(self, head_out, aux_out, gt_boxes, gt_labels, gt_valid, priors) -> int:
        """Shapes of the outputs and the ground truth; returns the heads' reg_max (from the output width)."""
        bins = head_out.shape[-1] - self.num_classes
        reg_max = bins // 4 - 1
        width = self.num_classes + num_bins(max(reg_max, 1))
        for name, out in (("head_out", head_out), ("aux_out", aux_out)):
            if out is not None and (out.dim() != 3 or bins % 4 or reg_max < 1 or out.shape[-1] != width
                                    or out.shape[1] != priors.shape[0]):
                raise ValueError(f"{name} has shape {tuple(out.shape)}; expected [B, {priors.shape[0]}, "
                                 f"{self.num_classes} + 4 * (reg_max + 1)] (priors, "
                                 f"model.num_classes={self.num_classes}, the head's reg_max)")
        batch, num_gt = gt_valid.shape if gt_valid.dim() == 2 else (-1, -1)
        if (gt_boxes.shape != (batch, num_gt, 4) or gt_labels.shape != (batch, num_gt)
                or batch != head_out.shape[0] or gt_valid.dtype != torch.bool):
            raise ValueError(f"ground truth must be gt_boxes [B, G, 4], gt_labels [B, G], gt_valid [B, G] bool "
                             f"with B = {head_out.shape[0]}; got {tuple(gt_boxes.shape)}, "
                             f"{tuple(gt_labels.shape)}, {tuple(gt_valid.shape)} {gt_valid.dtype}")
        return reg_max
