"""NanoDet-Plus heads (spec sections 5 and 6).

Both heads return ``[B, N, C + 4(R+1)]``: C class logits, then 4 sides (left, top, right, bottom)
x (R+1) distance-bin logits. N runs over the levels in stride order, row-major inside a level.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pipeline.model.decode import Integral, num_bins
from pipeline.model.layers import ConvModule, DepthwiseConvModule, Scale, normal_init

PRIOR_PROB_BIAS = -4.595  # ~ -ln((1 - 0.01) / 0.01): sigmoid = 0.01 at init (focal-loss prior)


def flatten_levels(maps: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per-level maps [B, D, H_l, W_l] -> [B, sum_l H_l*W_l, D] (levels concatenated in order)."""
    return torch.cat([m.flatten(start_dim=2) for m in maps], dim=2).permute(0, 2, 1)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


class NanoDetPlusHead(nn.Module):
    """Main head: one unshared depthwise-separable tower per level and a single 1x1 output conv.

    Classification and box regression share the tower and the output conv. ``distribution_project``
    (the Integral with buffer ``project`` = [0..R]) is registered first so keys match the official ones.
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 96, stacked_convs: int = 2,
                 kernel_size: int = 5, strides: tuple[int, ...] = (8, 16, 32, 64), reg_max: int = 7):
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        self.distribution_project = Integral(reg_max)
        self.cls_convs = nn.ModuleList([
            nn.ModuleList([
                DepthwiseConvModule(in_channels if i == 0 else feat_channels, feat_channels, kernel_size,
                                    stride=1, padding=kernel_size // 2)
                for i in range(stacked_convs)
            ])
            for _ in self.strides
        ])
        out_channels = num_classes + num_bins(reg_max)
        self.gfl_cls = nn.ModuleList([nn.Conv2d(feat_channels, out_channels, 1) for _ in self.strides])
        self._init_weights()

    def _init_weights(self) -> None:
        """Towers N(0, 0.01); output convs N(0, 0.01) with bias -4.595 on every channel (box bins included)."""
        for module in self.cls_convs.modules():
            if isinstance(module, nn.Conv2d):
                normal_init(module, std=0.01)
        for conv in self.gfl_cls:
            normal_init(conv, std=0.01, bias=PRIOR_PROB_BIAS)

    def forward(self, feats: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """Neck maps (one per stride, [B, Cin, H_l, W_l]) -> [B, N, C + 4(R+1)] raw logits."""
        if len(feats) != len(self.strides):
            raise ValueError(f"NanoDetPlusHead got {len(feats)} maps for {len(self.strides)} strides "
                             f"{self.strides}")
        outputs = []
        for feat, tower, out_conv in zip(feats, self.cls_convs, self.gfl_cls):
            for conv in tower:
                feat = conv(feat)
            outputs.append(out_conv(feat))
        return flatten_levels(outputs)


class SimpleConvHead(nn.Module):
    """Aux head of the Assign Guidance Module: GN conv towers shared by all levels, per-level Scale.

    Separate classification and regression towers of ``stacked_convs`` 3x3 ConvModules (GN, LeakyReLU),
    a 3x3 class conv (bias -4.595) and a 3x3 box conv whose output is multiplied by the level's Scale.
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 192, stacked_convs: int = 4,
                 strides: tuple[int, ...] = (8, 16, 32, 64), reg_max: int = 7, num_groups: int = 32):
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        for i in range(stacked_convs):  # interleaved like the official code (RNG order)
            chn = in_channels if i == 0 else feat_channels
            self.cls_convs.append(ConvModule(chn, feat_channels, 3, padding=1, norm="gn", num_groups=num_groups))
            self.reg_convs.append(ConvModule(chn, feat_channels, 3, padding=1, norm="gn", num_groups=num_groups))
        self.gfl_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(feat_channels, num_bins(reg_max), 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self._init_weights()

    def _init_weights(self) -> None:
        for module in list(self.cls_convs) + list(self.reg_convs):
            normal_init(module.conv, std=0.01)
        normal_init(self.gfl_cls, std=0.01, bias=PRIOR_PROB_BIAS)
        normal_init(self.gfl_reg, std=0.01)

    def forward(self, feats: Iterable[torch.Tensor]) -> torch.Tensor:
        """Per-level inputs [B, Cin, H_l, W_l] -> [B, N, C + 4(R+1)] raw logits."""
        feats = list(feats)
        if len(feats) != len(self.strides):
            raise ValueError(f"SimpleConvHead got {len(feats)} maps for {len(self.strides)} strides {self.strides}")
        # compute in the memory format of this head's own weights: CPU bf16 training keeps them NCHW inside
        # an otherwise channels_last model (oneDNN's bf16 3x3 conv and GroupNorm backward are faster so)
        layout = torch.channels_last if _is_channels_last(self.gfl_reg.weight) else torch.contiguous_format
        outputs = []
        for x, scale in zip(feats, self.scales):
            x = x.contiguous(memory_format=layout)
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            box = scale(self.gfl_reg(reg_feat)).float()
            outputs.append(torch.cat([self.gfl_cls(cls_feat), box], dim=1))
        return flatten_levels(outputs)
