"""Small building blocks shared by the neck and the heads (spec sections 4-6).

Module and attribute names follow the official code so that state-dict keys match it
(``conv``/``bn``/``gn`` in :class:`ConvModule`; ``depthwise``/``pointwise``/``dwnorm``/``pwnorm``
in :class:`DepthwiseConvModule`; ``scale`` in :class:`Scale`). Construction order (and hence the
order in which the global RNG is consumed) also follows the official code, so a model built after
``torch.manual_seed(s)`` gets the same initial conv weights as the official one.
"""
from __future__ import annotations

import torch
from torch import nn

LEAKY_SLOPE = 0.1  # NanoDet's "LeakyReLU" is slope 0.1, not PyTorch's 0.01 (spec section 3)


def activation() -> nn.Module:
    """The one activation of NanoDet-Plus: LeakyReLU(0.1), in place like the official modules."""
    return nn.LeakyReLU(negative_slope=LEAKY_SLOPE, inplace=True)


def kaiming_init(conv: nn.Conv2d) -> None:
    """MSRA init of the official conv wrappers: normal, fan_out, leaky_relu gain with a=0 (= sqrt 2)."""
    nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_out", nonlinearity="leaky_relu")
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0.0)


def normal_init(conv: nn.Conv2d, std: float, bias: float = 0.0) -> None:
    """N(0, std) weights and a constant bias (head init; -4.595 = -ln(0.99/0.01) for prior prob 0.01)."""
    nn.init.normal_(conv.weight, 0.0, std)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, bias)


def norm_layer(kind: str, channels: int, num_groups: int = 32) -> nn.Module:
    """``"bn"``: BatchNorm2d (eps 1e-5, momentum 0.1); ``"gn"``: GroupNorm(num_groups)."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        if channels % num_groups:
            raise ValueError(f"GroupNorm needs channels ({channels}) divisible by num_groups ({num_groups})")
        return nn.GroupNorm(num_groups, channels)
    raise ValueError(f"unknown norm kind {kind!r}; expected 'bn' or 'gn'")


def cpu_autocast_enabled() -> bool:
    """True inside ``torch.autocast("cpu", ...)`` (the CPU mixed-precision training mode)."""
    return torch.is_autocast_enabled("cpu")


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (``groups == in_channels``, ``out_channels`` a multiple of it, no bias)
    that stays float32 under CPU autocast.

    Measured on AVX512-BF16 CPUs (README "Performance"): oneDNN's bfloat16 depthwise backward is 2-5x
    slower than float32, while dense convs gain ~2x in bfloat16. Outside CPU autocast (float32 training,
    inference, export, CUDA) this is exactly ``nn.Conv2d``; the state-dict keys are the same.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 out_channels: int | None = None):
        super().__init__(channels, out_channels or channels, kernel_size, stride=stride, padding=padding,
                         groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and cpu_autocast_enabled():
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class ConvModule(nn.Module):
    """conv -> norm -> LeakyReLU; the conv has a bias only when there is no norm.

    ``norm`` is ``"bn"``, ``"gn"`` or ``None``; the norm attribute is named after it (``bn``/``gn``)
    because that is how the official keys read (``fpn.reduce_layers.0.bn.weight``,
    ``aux_head.cls_convs.0.gn.weight``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, norm: str | None = "bn", num_groups: int = 32, act: bool = True):
        super().__init__()
        self.norm_name = norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              bias=norm is None)
        if norm is not None:
            self.add_module(norm, norm_layer(norm, out_channels, num_groups))
        self.act = activation() if act else None
        kaiming_init(self.conv)
        if norm is not None:
            nn.init.constant_(self.norm.weight, 1.0)
            nn.init.constant_(self.norm.bias, 0.0)

    @property
    def norm(self) -> nn.Module | None:
        return getattr(self, self.norm_name) if self.norm_name else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Cin, H, W] -> [B, Cout, H', W']"""
        x = self.conv(x)
        if self.norm_name is not None:
            x = self.norm(x)
        return self.act(x) if self.act is not None else x


class DepthwiseConvModule(nn.Module):
    """Depthwise k x k -> BN -> act -> pointwise 1x1 -> BN -> act (both convs bias-free)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.depthwise = DepthwiseConv2d(in_channels, kernel_size, stride=stride, padding=padding)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.dwnorm = nn.BatchNorm2d(in_channels)
        self.pwnorm = nn.BatchNorm2d(out_channels)
        self.act = activation()
        kaiming_init(self.depthwise)
        kaiming_init(self.pointwise)
        for bn in (self.dwnorm, self.pwnorm):
            nn.init.constant_(bn.weight, 1.0)
            nn.init.constant_(bn.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Cin, H, W] -> [B, Cout, ceil(H/stride), ceil(W/stride)] (with padding = k // 2)"""
        x = self.act(self.dwnorm(self.depthwise(x)))
        return self.act(self.pwnorm(self.pointwise(x)))


class Scale(nn.Module):
    """A learnable scalar multiplier (one per level in the aux head's regression branch)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale
