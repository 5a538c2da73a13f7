"""GhostPAN neck of NanoDet-Plus (spec section 4) and its Ghost primitives (Han et al., GhostNet 2020).

Reduce (1x1) -> top-down path (bilinear x2 up, concat, GhostBlocks) -> bottom-up path (depthwise s2
down-sampling, concat, GhostBlocks) -> extra coarser levels (sum of two depthwise s2 branches).
Ghost layers keep PyTorch's default init, exactly like the official code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.layers import ConvModule, DepthwiseConv2d, DepthwiseConvModule, activation


class GhostModule(nn.Module):
    """Ghost convolution: a 1x1 "primary" conv makes ceil(out/2) maps, a cheap depthwise 3x3 derives the rest.

    ``act=False`` leaves the activation slot empty (second ghost module of a bottleneck).
    """

    def __init__(self, in_channels: int, out_channels: int, act: bool = True, ratio: int = 2, dw_size: int = 3):
        super().__init__()
        self.out_channels = out_channels
        init_channels = math.ceil(out_channels / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_channels, init_channels, 1, bias=False),
            nn.BatchNorm2d(init_channels),
            activation() if act else nn.Sequential(),
        )
        self.cheap_operation = nn.Sequential(
            DepthwiseConv2d(init_channels, dw_size, padding=dw_size // 2, out_channels=new_channels),
            nn.BatchNorm2d(new_channels),
            activation() if act else nn.Sequential(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Cin, H, W] -> [B, out_channels, H, W]"""
        primary = self.primary_conv(x)
        out = torch.cat([primary, self.cheap_operation(primary)], dim=1)
        return out[:, : self.out_channels] if out.shape[1] != self.out_channels else out


class GhostBottleneck(nn.Module):
    """Stride-1 Ghost bottleneck without SE: ghost2(ghost1(x)) + shortcut(x), no activation after the add.

    The shortcut is a depthwise k x k conv + BN + 1x1 conv + BN when the channel count changes
    (always the case in GhostPAN, where the input is a 2*C concat), identity otherwise.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, dw_kernel_size: int = 3):
        super().__init__()
        self.ghost1 = GhostModule(in_channels, mid_channels, act=True)
        self.ghost2 = GhostModule(mid_channels, out_channels, act=False)
        if in_channels == out_channels:
            self.shortcut = nn.Sequential()
        else:
            self.shortcut = nn.Sequential(
                DepthwiseConv2d(in_channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Cin, H, W] -> [B, Cout, H, W]"""
        return self.ghost2(self.ghost1(x)) + self.shortcut(x)


class GhostBlocks(nn.Module):
    """The CSP-free stack used by GhostPAN: one GhostBottleneck(in, mid=out, out) (expand 1, no residual)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5, num_blocks: int = 1):
        super().__init__()
        self.blocks = nn.Sequential(*[
            GhostBottleneck(in_channels if i == 0 else out_channels, out_channels, out_channels, kernel_size)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class GhostPAN(nn.Module):
    """Path aggregation neck: 3 backbone maps -> 3 + ``num_extra_level`` maps of ``out_channels`` each.

    Extra level k sums ``extra_lvl_in_conv[k]`` applied to the previous "in" map (the reduced top
    input r5 for k = 0, as in the official code) and ``extra_lvl_out_conv[k]`` applied to the previous
    output. Chaining the "in" branch keeps both summands at the same size when there are two extra
    levels; the official code only ever uses one.
    """

    def __init__(self, in_channels: list[int], out_channels: int, kernel_size: int = 5, num_extra_level: int = 1):
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"GhostPAN expects 3 input maps (strides 8/16/32), got in_channels={in_channels}")
        if num_extra_level < 0:
            raise ValueError(f"num_extra_level must be >= 0, got {num_extra_level}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        pad = kernel_size // 2
        # Construction order (interleaved below) mirrors the official code so the RNG is consumed alike.
        self.reduce_layers = nn.ModuleList([ConvModule(c, out_channels, 1) for c in in_channels])
        self.top_down_blocks = nn.ModuleList(
            [GhostBlocks(2 * out_channels, out_channels, kernel_size) for _ in range(len(in_channels) - 1)])
        self.downsamples = nn.ModuleList()
        self.bottom_up_blocks = nn.ModuleList()
        for _ in range(len(in_channels) - 1):
            self.downsamples.append(DepthwiseConvModule(out_channels, out_channels, kernel_size, 2, pad))
            self.bottom_up_blocks.append(GhostBlocks(2 * out_channels, out_channels, kernel_size))
        self.extra_lvl_in_conv = nn.ModuleList()
        self.extra_lvl_out_conv = nn.ModuleList()
        for _ in range(num_extra_level):
            self.extra_lvl_in_conv.append(DepthwiseConvModule(out_channels, out_channels, kernel_size, 2, pad))
            self.extra_lvl_out_conv.append(DepthwiseConvModule(out_channels, out_channels, kernel_size, 2, pad))

    @staticmethod
    def upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Bilinear (align_corners False) up-sampling to ``like``'s size; equals scale_factor 2 when it is 2x."""
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, inputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(c3 [B,C3,H/8,W/8], c4 [B,C4,H/16,..], c5 [B,C5,H/32,..]) -> (o3, o4, o5, o6...), each [B, out, ., .]"""
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"GhostPAN got {len(inputs)} maps, expected {len(self.in_channels)}")
        reduced = [layer(x) for layer, x in zip(self.reduce_layers, inputs)]
        # top-down: inner[i] is the fused map at level i; start from the coarsest reduced map.
        inner = [reduced[-1]]
        for idx in range(len(reduced) - 1, 0, -1):
            coarse, lateral = inner[0], reduced[idx - 1]
            block = self.top_down_blocks[len(reduced) - 1 - idx]
            inner.insert(0, block(torch.cat([self.upsample(coarse, lateral), lateral], 1)))
        # bottom-up
        outs = [inner[0]]
        for idx in range(len(reduced) - 1):
            down = self.downsamples[idx](outs[-1])
            outs.append(self.bottom_up_blocks[idx](torch.cat([down, inner[idx + 1]], 1)))
        # extra coarser levels: no activation after the sum
        extra_in = reduced[-1]
        for in_conv, out_conv in zip(self.extra_lvl_in_conv, self.extra_lvl_out_conv):
            extra_in = in_conv(extra_in)
            outs.append(extra_in + out_conv(outs[-1]))
        return tuple(outs)
