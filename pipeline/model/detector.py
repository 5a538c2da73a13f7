"""NanoDetPlus detector and its factory (spec sections 2 and 6).

Inference: backbone -> GhostPAN -> NanoDetPlusHead. Training adds the Assign Guidance Module: an
``aux_fpn`` (a deep copy of the neck at construction) and a ``SimpleConvHead`` fed per level with
``concat(fpn_feat, aux_fpn_feat)``. From ``detach_epoch`` on, the aux branch still trains on its own
loss but no longer sends gradients into the backbone or the main neck.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from pipeline.config import BACKBONE_CHANNELS, ModelConfig
from pipeline.model.ghost_pan import GhostPAN
from pipeline.model.heads import NanoDetPlusHead, SimpleConvHead
from pipeline.model.shufflenetv2 import ShuffleNetV2

BACKBONE_STRIDES = (8, 16, 32)  # strides of ShuffleNetV2 stages 2, 3, 4


class NanoDetPlus(nn.Module):
    """Detector; attributes in the official registration order: backbone, fpn, head, aux_fpn, aux_head.

    ``aux_head=None`` builds the inference-only model (no aux parameters at all).
    """

    def __init__(self, backbone: ShuffleNetV2, fpn: GhostPAN, head: NanoDetPlusHead,
                 aux_head: SimpleConvHead | None = None, detach_epoch: int = 10):
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        if aux_head is not None:
            self.aux_fpn = copy.deepcopy(fpn)  # same initial weights, separate parameters
            self.aux_head = aux_head
        self.detach_epoch = detach_epoch
        self.strides = head.strides
        self.reg_max = head.reg_max
        self.num_classes = head.num_classes

    @property
    def with_aux(self) -> bool:
        return hasattr(self, "aux_head")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised images -> head_out [B, N, C + 4(R+1)] raw logits (aux parts never run)."""
        return self.head(self.fpn(self.backbone(images)))

    def forward_train(self, images: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> (head_out, aux_out), both [B, N, C + 4(R+1)].

        For ``epoch >= detach_epoch`` the aux neck sees detached backbone maps and the main-neck half
        of the aux input is detached, so the aux loss stops shaping the shared features.
        """
        if not self.with_aux:
            raise RuntimeError("forward_train needs the aux branch: build the model with "
                               "build_model(cfg, with_aux=True)")
        feats = self.backbone(images)
        fpn_feats = self.fpn(feats)
        detach = epoch >= self.detach_epoch
        if detach:
            aux_fpn_feats = self.aux_fpn([f.detach() for f in feats])
            dual = [torch.cat([f.detach(), a], dim=1) for f, a in zip(fpn_feats, aux_fpn_feats)]
        else:
            aux_fpn_feats = self.aux_fpn(feats)
            dual = [torch.cat([f, a], dim=1) for f, a in zip(fpn_feats, aux_fpn_feats)]
        return self.head(fpn_feats), self.aux_head(dual)


def build_model(cfg_model: ModelConfig, with_aux: bool = True, load_pretrained: bool = True) -> NanoDetPlus:
    """Build NanoDet-Plus from ``cfg.model`` (explicit constructor calls, official construction order).

    ``with_aux=False`` gives the inference/export model. The GhostPAN gets ``len(head.strides) - 3``
    extra levels; ``backbone.pretrained`` (``imagenet`` or a local torchvision file) is loaded after the
    official init unless ``load_pretrained=False`` (callers that overwrite every weight right after: a
    checkpoint, the official import, FLOP counts - so evaluating a model trained from ImageNet weights
    neither downloads them nor needs them in the cache).
    """
    strides = tuple(int(s) for s in cfg_model.head.strides)
    doubling = all(b == 2 * a for a, b in itertools.pairwise(strides))
    if len(strides) < 3 or strides[:3] != BACKBONE_STRIDES or not doubling:
        raise ValueError(f"model.head.strides={list(strides)}: must start with 8, 16, 32 and double per "
                         "extra level")
    size = cfg_model.backbone.size
    if size not in BACKBONE_CHANNELS:
        raise ValueError(f"model.backbone.size={size!r} is not one of {list(BACKBONE_CHANNELS)}")
    neck_channels = int(cfg_model.neck.out_channels)
    backbone = ShuffleNetV2(size, tuple(cfg_model.backbone.out_stages))
    fpn = GhostPAN(backbone.out_channels, neck_channels, int(cfg_model.neck.kernel_size),
                   num_extra_level=len(strides) - 3)
    head = NanoDetPlusHead(
        num_classes=int(cfg_model.num_classes), in_channels=neck_channels,
        feat_channels=int(cfg_model.head.feat_channels), stacked_convs=int(cfg_model.head.stacked_convs),
        kernel_size=int(cfg_model.head.kernel_size), strides=strides, reg_max=int(cfg_model.head.reg_max),
    )
    aux_head = None
    if with_aux:
        # (aux_fpn is a deep copy made inside NanoDetPlus; copying draws no random numbers)
        aux_head = SimpleConvHead(
            num_classes=int(cfg_model.num_classes), in_channels=2 * neck_channels,
            feat_channels=int(cfg_model.aux_head.feat_channels),
            stacked_convs=int(cfg_model.aux_head.stacked_convs),
            strides=strides, reg_max=int(cfg_model.head.reg_max), num_groups=int(cfg_model.aux_head.num_groups),
        )
    model = NanoDetPlus(backbone, fpn, head, aux_head, detach_epoch=int(cfg_model.detach_epoch))
    if load_pretrained and cfg_model.backbone.pretrained:
        model.backbone.load_pretrained(cfg_model.backbone.pretrained)
    return model
