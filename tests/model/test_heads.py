"""NanoDetPlusHead and SimpleConvHead: layout, init, per-level scale, flattening order."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.model.heads import PRIOR_PROB_BIAS, NanoDetPlusHead, SimpleConvHead, flatten_levels


def _feats(channels: int, sizes, batch=2):
    return [torch.randn(batch, channels, h, w) for h, w in sizes]


@pytest.mark.parametrize("reg_max", [7, 10, 16])
def test_main_head_shape_and_init(reg_max):
    head = NanoDetPlusHead(num_classes=5, in_channels=32, feat_channels=24, stacked_convs=1, kernel_size=3,
                           strides=(8, 16, 32), reg_max=reg_max).eval()
    with torch.no_grad():
        out = head(_feats(32, [(8, 6), (4, 3), (2, 2)]))
    assert out.shape == (2, 48 + 12 + 4, 5 + 4 * (reg_max + 1))
    for conv in head.gfl_cls:
        assert torch.all(conv.bias == PRIOR_PROB_BIAS)  # box bins too: uniform softmax at init
        assert conv.kernel_size == (1, 1)
    assert torch.equal(head.distribution_project.project, torch.arange(reg_max + 1, dtype=torch.float32))
    assert next(iter(head.state_dict())) == "distribution_project.project"


def test_main_head_towers_are_not_shared():
    head = NanoDetPlusHead(3, 16, 16, stacked_convs=2, strides=(8, 16, 32, 64))
    assert len(head.cls_convs) == 4 and len(head.cls_convs[0]) == 2
    assert head.cls_convs[0][0].depthwise.weight.data_ptr() != head.cls_convs[1][0].depthwise.weight.data_ptr()
    assert head.cls_convs[0][0].depthwise.kernel_size == (5, 5)
    assert 0.005 < head.cls_convs[2][1].pointwise.weight.std().item() < 0.015  # N(0, 0.01)


def test_flatten_levels_is_level_major_then_row_major():
    a = torch.arange(6.0).view(1, 1, 2, 3)
    b = torch.arange(100.0, 102.0).view(1, 1, 1, 2)
    out = flatten_levels([a, b])
    assert out.shape == (1, 8, 1)
    assert out[0, :, 0].tolist() == [0, 1, 2, 3, 4, 5, 100, 101]


def test_aux_head_layout_groups_and_scales():
    head = SimpleConvHead(num_classes=4, in_channels=64, feat_channels=48, stacked_convs=2, strides=(8, 16, 32),
                          reg_max=5, num_groups=16).eval()
    assert isinstance(head.cls_convs[0].gn, nn.GroupNorm) and head.cls_convs[0].gn.num_groups == 16
    assert head.cls_convs[0].conv.bias is None and head.gfl_reg.kernel_size == (3, 3)
    assert torch.all(head.gfl_cls.bias == PRIOR_PROB_BIAS) and torch.all(head.gfl_reg.bias == 0)
    feats = _feats(64, [(4, 4), (2, 2), (1, 1)])
    with torch.no_grad():
        out = head(feats)
        head.scales[1].scale.fill_(0.0)  # the level-1 scale multiplies that level's box logits only
        scaled = head(feats)
    assert out.shape == (2, 21, 4 + 4 * 6)
    level1 = slice(16, 20)
    assert torch.equal(scaled[:, level1, :4], out[:, level1, :4])
    assert torch.all(scaled[:, level1, 4:] == 0) and torch.equal(scaled[:, :16], out[:, :16])
    assert [k for k in head.state_dict() if k.startswith("scales")] == ["scales.0.scale", "scales.1.scale", "scales.2.scale"]


def test_heads_reject_wrong_level_count_and_groups():
    head = NanoDetPlusHead(3, 16, 16, strides=(8, 16, 32))
    with pytest.raises(ValueError, match="2 maps for 3 strides"):
        head(_feats(16, [(4, 4), (2, 2)]))
    with pytest.raises(ValueError, match="divisible by num_groups"):
        SimpleConvHead(3, 32, feat_channels=40, num_groups=32)
