"""GhostPAN and its Ghost primitives: sizes per extra level, wiring of the extra level, upsampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.ghost_pan import GhostBlocks, GhostBottleneck, GhostModule, GhostPAN


def _inputs(h: int, w: int, channels=(48, 96, 192)) -> list[torch.Tensor]:
    return [torch.randn(2, c, h // s, w // s) for c, s in zip(channels, (8, 16, 32))]


@pytest.mark.parametrize("extra, sizes", [(0, [(16, 8), (8, 4), (4, 2)]),
                                          (1, [(16, 8), (8, 4), (4, 2), (2, 1)]),
                                          (2, [(16, 8), (8, 4), (4, 2), (2, 1), (1, 1)])])
def test_output_levels_and_sizes(extra, sizes):
    pan = GhostPAN([48, 96, 192], 32, kernel_size=5, num_extra_level=extra).eval()
    with torch.no_grad():
        outs = pan(_inputs(128, 64))
    assert [tuple(o.shape[-2:]) for o in outs] == sizes
    assert all(o.shape[:2] == (2, 32) for o in outs)


def test_extra_level_sums_reduced_top_input_and_last_output():
    pan = GhostPAN([48, 96, 192], 32, num_extra_level=1).eval()
    seen = {}
    pan.extra_lvl_in_conv[0].register_forward_hook(lambda m, i, o: seen.update(in_in=i[0], in_out=o))
    pan.extra_lvl_out_conv[0].register_forward_hook(lambda m, i, o: seen.update(out_in=i[0], out_out=o))
    pan.reduce_layers[2].register_forward_hook(lambda m, i, o: seen.update(r5=o))
    with torch.no_grad():
        outs = pan(_inputs(64, 64))
    assert torch.equal(seen["in_in"], seen["r5"])  # the reduced map, not the raw backbone tensor
    assert torch.equal(seen["out_in"], outs[2])
    assert torch.equal(outs[3], seen["in_out"] + seen["out_out"])


def test_downsampling_is_depthwise_and_kernel_size_is_used():
    pan = GhostPAN([48, 96, 192], 32, kernel_size=3, num_extra_level=1)
    assert pan.downsamples[0].depthwise.groups == 32
    assert pan.downsamples[0].depthwise.kernel_size == (3, 3)
    assert pan.top_down_blocks[0].blocks[0].shortcut[0].kernel_size == (3, 3)
    # the ghost cheap operation keeps its fixed 3x3 kernel whatever kernel_size says
    assert GhostPAN([48, 96, 192], 32, kernel_size=7).bottom_up_blocks[0].blocks[0].ghost1.cheap_operation[0].kernel_size == (3, 3)


def test_size_based_bilinear_upsampling_equals_scale_factor_two():
    x = torch.randn(1, 4, 5, 7)
    ref = nn.Upsample(scale_factor=2, mode="bilinear")(x)
    assert torch.equal(GhostPAN.upsample(x, torch.empty(1, 4, 10, 14)), ref)
    assert not torch.equal(ref, F.interpolate(x, scale_factor=2, mode="nearest"))


def test_ghost_module_and_bottleneck_channels():
    gm = GhostModule(16, 10)
    assert gm.primary_conv[0].out_channels == 5 and gm.cheap_operation[0].groups == 5
    assert gm(torch.randn(1, 16, 4, 4)).shape == (1, 10, 4, 4)
    assert GhostModule(16, 9)(torch.randn(1, 16, 4, 4)).shape == (1, 9, 4, 4)  # odd width sliced back
    assert isinstance(GhostModule(8, 8, act=False).primary_conv[2], nn.Sequential)  # empty act slot
    same = GhostBottleneck(8, 8, 8)
    assert len(same.shortcut) == 0  # identity shortcut when the width does not change
    block = GhostBlocks(64, 32, kernel_size=5)
    assert block(torch.randn(1, 64, 6, 6)).shape == (1, 32, 6, 6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="3 input maps"):
        GhostPAN([48, 96], 32)
    with pytest.raises(ValueError, match="num_extra_level"):
        GhostPAN([48, 96, 192], 32, num_extra_level=-1)
    with pytest.raises(ValueError, match="got 2 maps"):
        GhostPAN([48, 96, 192], 32)(_inputs(64, 64)[:2])
