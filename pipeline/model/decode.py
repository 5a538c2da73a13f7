"""Priors, distribution decoding and post-processing: THE one decoder of NanoDet-Plus (spec sections 5, 9).

Evaluation, prediction, the ONNX reference runner and the parity checks all call :func:`postprocess`;
the ONNX graph itself (when decoding in-graph) uses :func:`decode_for_export`.

Conventions (spec section 5, golden README):
* priors ``[N, 4]`` rows ``(x, y, s, s)`` with ``x = col * s``, ``y = row * s`` (no half-cell offset),
  level maps ``ceil(H/s) x ceil(W/s)``, row-major inside a level, levels in stride order;
* head output ``[B, N, C + 4(R+1)]``: class logits, then 4 sides (left, top, right, bottom) x (R+1) bins;
* boxes ``x1, y1, x2, y2`` in network-input pixels.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, nms

# The official batched_nms switches from the coordinate-offset trick to a per-class loop at this many
# candidates; both give the same kept set, the loop exists only to bound the cost of one big NMS.
_NMS_SPLIT_THR = 10000


def make_priors(input_hw: Sequence[int], strides: Sequence[int], device=None) -> Tensor:
    """Center priors of all levels: ``[N, 4]`` float32 rows ``(x, y, stride, stride)``.

    ``input_hw`` is ``(H, W)`` of the network input; each level has ``ceil(H/s) x ceil(W/s)`` points.
    """
    height, width = int(input_hw[0]), int(input_hw[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"make_priors: input_hw must be positive (H, W), got {tuple(input_hw)}")
    levels = []
    for stride in strides:
        h, w = math.ceil(height / stride), math.ceil(width / stride)
        xs = torch.arange(w, dtype=torch.float32, device=device) * stride
        ys = torch.arange(h, dtype=torch.float32, device=device) * stride
        y, x = torch.meshgrid(ys, xs, indexing="ij")  # row-major: index = row * w + col
        s = torch.full_like(x, float(stride))
        levels.append(torch.stack([x, y, s, s], dim=-1).reshape(-1, 4))
    return torch.cat(levels, dim=0)


def num_bins(reg_max: int) -> int:
    """Channels of the box branch: 4 sides x (reg_max + 1) distribution bins."""
    return 4 * (reg_max + 1)


def priors_for(input_hw: Sequence[int], strides: Sequence[int], device=None) -> Tensor:
    """THE priors cache: :func:`make_priors` computed once per (H, W), strides and device, then shared by
    training, validation, inference, export and bench. Read-only: never modify the returned tensor."""
    dev = str(torch.device(device)) if device is not None else "cpu"
    return _cached_priors((int(input_hw[0]), int(input_hw[1])), tuple(int(s) for s in strides), dev)


@functools.lru_cache(maxsize=64)
def _cached_priors(input_hw: tuple[int, int], strides: tuple[int, ...], device: str) -> Tensor:
    with torch.inference_mode(False):  # a normal tensor even when first asked for under inference_mode
        return make_priors(input_hw, strides, device=device)


def integral(reg_logits: Tensor, project: Tensor) -> Tensor:
    """Expected distance per side: ``[..., 4(R+1)] -> [..., 4]`` in bins (stride units).

    softmax over each side's R+1 bins, then the dot product with ``project = [0, 1, ..., R]``.
    """
    shape = reg_logits.shape
    probs = F.softmax(reg_logits.reshape(*shape[:-1], 4, project.numel()), dim=-1)
    # F.linear as in the official Integral, so the rounding of the dot product is the same.
    return F.linear(probs, project.to(probs)).reshape(*shape[:-1], 4)


class Integral(nn.Module):
    """General-distribution integral of GFL; buffer ``project`` = linspace(0, R, R+1) (official key name)."""

    def __init__(self, reg_max: int = 7):
        super().__init__()
        self.reg_max = reg_max
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, reg_logits: Tensor) -> Tensor:
        """``[..., 4(R+1)]`` logits -> ``[..., 4]`` distances in bins."""
        return integral(reg_logits, self.project)


def _project(reg_max: int, like: Tensor) -> Tensor:
    """The projection ``[0, 1, ..., R]`` on ``like``'s device, computed once per (R, device)."""
    return _cached_project(int(reg_max), str(like.device))


@functools.lru_cache(maxsize=16)
def _cached_project(reg_max: int, device: str) -> Tensor:
    with torch.inference_mode(False):
        return torch.linspace(0, reg_max, reg_max + 1, dtype=torch.float32, device=device)


def distance2bbox(points: Tensor, distance: Tensor, max_shape: Sequence[int] | None = None) -> Tensor:
    """``points [..., 2]`` (x, y) and ``distance [..., 4]`` (l, t, r, b) -> boxes ``[..., 4]`` xyxy.

    With ``max_shape = (H, W)`` x is clamped to [0, W] and y to [0, H].
    """
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    if max_shape is not None:
        x1 = x1.clamp(min=0, max=max_shape[1])
        y1 = y1.clamp(min=0, max=max_shape[0])
        x2 = x2.clamp(min=0, max=max_shape[1])
        y2 = y2.clamp(min=0, max=max_shape[0])
    return torch.stack([x1, y1, x2, y2], dim=-1)


def bbox2distance(points: Tensor, bbox: Tensor) -> Tensor:
    """Inverse of :func:`distance2bbox`: ``points [..., 2]``, boxes ``[..., 4]`` -> (l, t, r, b) ``[..., 4]``.

    No clamping here: a point outside its box gives negative distances (the target builder clamps).
    """
    left = points[..., 0] - bbox[..., 0]
    top = points[..., 1] - bbox[..., 1]
    right = bbox[..., 2] - points[..., 0]
    bottom = bbox[..., 3] - points[..., 1]
    return torch.stack([left, top, right, bottom], dim=-1)


def decode_boxes(reg_logits: Tensor, priors: Tensor, reg_max: int) -> Tensor:
    """``reg_logits [B, N, 4(R+1)]``, ``priors [N, 4]`` -> boxes ``[B, N, 4]`` in pixels (unclamped)."""
    _check_bins(reg_logits.shape[-1], reg_max, "reg_logits")
    dist = integral(reg_logits, _project(reg_max, reg_logits)) * priors[..., 2, None]
    return distance2bbox(priors[..., :2], dist)


def _check_bins(width: int, reg_max: int, name: str) -> None:
    if width != num_bins(reg_max):
        raise ValueError(f"{name} has {width} channels but 4 * (reg_max + 1) = {num_bins(reg_max)} "
                         f"(reg_max={reg_max}); check model.head.reg_max")


def _split(head_out: Tensor, priors: Tensor, num_classes: int, reg_max: int) -> tuple[Tensor, Tensor]:
    width = num_classes + num_bins(reg_max)
    if head_out.dim() != 3 or head_out.shape[-1] != width:
        raise ValueError(f"head output has shape {tuple(head_out.shape)}; expected [B, N, {width}] for "
                         f"num_classes={num_classes}, reg_max={reg_max}")
    if head_out.shape[1] != priors.shape[0]:
        raise ValueError(f"head output has {head_out.shape[1]} points but there are {priors.shape[0]} "
                         "priors: input size or strides differ between model and decoder")
    return head_out.split([num_classes, num_bins(reg_max)], dim=-1)


class Detections(NamedTuple):
    """One image's detections, sorted by descending score."""

    boxes: Tensor  # [k, 4] xyxy, network-input pixels, clamped to the input
    scores: Tensor  # [k]
    labels: Tensor  # [k] int64, 0-based class index


def decode_for_export(head_out: Tensor, priors: Tensor, num_classes: int, reg_max: int,
                      input_hw: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Tensor-only decode usable inside an ONNX graph (no NMS, no data-dependent shapes).

    ``head_out [B, N, C + 4(R+1)]`` raw logits -> ``scores [B, N, C]`` (sigmoid) and
    ``boxes [B, N, 4]`` clamped to ``[0, W] x [0, H]`` with ``input_hw = (H, W)``.
    """
    cls_logits, reg_logits = _split(head_out.float(), priors, num_classes, reg_max)
    boxes = distance2bbox(priors[..., :2], integral(reg_logits, _project(reg_max, reg_logits))
                          * priors[..., 2, None], max_shape=input_hw)
    return cls_logits.sigmoid(), boxes


def multiclass_nms(boxes: Tensor, scores: Tensor, score_thr: float, iou_thr: float,
                   max_dets: int) -> Detections:
    """Multi-label NMS of one image: ``boxes [N, 4]``, class probabilities ``scores [N, C]``.

    Every (point, class) pair with score strictly above ``score_thr`` is a candidate (row-major order,
    as the official ``masked_select``); class-aware NMS at ``iou_thr``; the first ``max_dets`` kept.
    """
    valid = scores > score_thr
    point_idx, labels = valid.nonzero(as_tuple=True)
    cand_boxes, cand_scores = boxes[point_idx], scores[point_idx, labels]
    if cand_scores.numel() == 0:
        return Detections(boxes.new_zeros((0, 4)), scores.new_zeros((0,)), labels.new_zeros((0,)))
    if cand_scores.numel() < _NMS_SPLIT_THR:
        # The official coordinate-offset trick, spelled out so that the offset boxes (and hence the
        # IoUs near the threshold) round exactly as there; torchvision's batched_nms picks another
        # strategy above 1000 candidates on CPU.
        offsets = labels.to(cand_boxes) * (cand_boxes.max() + 1)
        keep = nms(cand_boxes + offsets[:, None], cand_scores, iou_thr)
    else:
        keep = batched_nms(cand_boxes, cand_scores, labels, iou_thr)
        keep = keep[cand_scores[keep].argsort(descending=True)]
    if max_dets > 0:
        keep = keep[:max_dets]
    return Detections(cand_boxes[keep], cand_scores[keep], labels[keep])


def postprocess(head_out: Tensor, priors: Tensor, num_classes: int, reg_max: int, input_hw: Sequence[int],
                score_thr: float = 0.05, iou_thr: float = 0.6, max_dets: int = 100,
                scores_are_logits: bool = True) -> list[Detections]:
    """Decode and NMS a batch: ``head_out [B, N, C + 4(R+1)]`` -> one :class:`Detections` per image.

    ``scores_are_logits=False`` for outputs whose class part is already a probability (the ONNX model's
    raw output: sigmoid applied in-graph, box logits untouched). Boxes are in network-input pixels,
    clamped to ``[0, W] x [0, H]`` with ``input_hw = (H, W)``.
    """
    with torch.autocast(head_out.device.type, enabled=False):
        cls_part, reg_logits = _split(head_out.float(), priors.float(), num_classes, reg_max)
        dist = integral(reg_logits, _project(reg_max, reg_logits)) * priors[..., 2, None]
        boxes = distance2bbox(priors[..., :2], dist, max_shape=input_hw)
        scores = cls_part.sigmoid() if scores_are_logits else cls_part
        return [multiclass_nms(boxes[i], scores[i], score_thr, iou_thr, max_dets)
                for i in range(head_out.shape[0])]
