"""ShuffleNetV2 backbone: shapes per width, channel shuffle, official init, local ImageNet weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.model.shufflenetv2 import PretrainedWeightsError, ShuffleNetV2, ShuffleV2Block, channel_shuffle


@pytest.mark.parametrize("size, channels", [("0.5x", (48, 96, 192)), ("1.0x", (116, 232, 464)),
                                            ("1.5x", (176, 352, 704))])
def test_output_shapes_per_width(size, channels):
    net = ShuffleNetV2(size).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, channels[0], 8, 12), (1, channels[1], 4, 6), (1, channels[2], 2, 3)]
    assert net.out_channels == list(channels)


def test_out_stages_subset_and_bad_values():
    net = ShuffleNetV2("0.5x", out_stages=(3, 4)).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [96, 192]
    with pytest.raises(ValueError, match="out_stages"):
        ShuffleNetV2("1.0x", out_stages=(1, 2))
    with pytest.raises(ValueError, match="2.0x"):
        ShuffleNetV2("2.0x")


def test_channel_shuffle_interleaves_two_groups():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


def test_stride_one_block_passes_left_half_through():
    block = ShuffleV2Block(8, 8, stride=1).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        out = block(x)
    # after the shuffle the untouched left half sits on the even channels
    assert torch.equal(out[:, 0::2], x[:, :4])
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        ShuffleV2Block(8, 16, stride=1)


def test_official_init_and_activation():
    torch.manual_seed(0)
    net = ShuffleNetV2("1.0x")
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(bn.bias == 1e-4) and torch.all(bn.weight == 1) for bn in bns)
    depthwise = net.stage3[0].branch1[0].weight  # [116, 1, 3, 3] -> std 1 / shape[1] = 1
    pointwise = net.stage3[0].branch2[0].weight  # [116, 116, 1, 1] -> std 1/116
    assert 0.8 < depthwise.std().item() < 1.2
    assert 0.8 / 116 < pointwise.std().item() < 1.2 / 116
    acts = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.1 for a in acts)
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())


def _torchvision_layout(net: ShuffleNetV2) -> dict[str, torch.Tensor]:
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # old torchvision files
    state["conv5.0.weight"] = torch.randn(1024, 192, 1, 1)
    state["fc.weight"] = torch.randn(1000, 1024)
    return state


def test_load_local_pretrained_skips_conv5_and_fc(tmp_path):
    net = ShuffleNetV2("0.5x")
    state = _torchvision_layout(net)
    path = tmp_path / "shufflenetv2_x0.5.pth"
    torch.save(state, path)
    loaded = net.load_pretrained(path)
    assert loaded == len(state) - 2
    assert torch.equal(net.stage4[3].branch2[5].weight, state["stage4.3.branch2.5.weight"])


def test_pretrained_errors_name_the_problem(tmp_path):
    net = ShuffleNetV2("1.0x")
    with pytest.raises(PretrainedWeightsError, match="file not found"):
        net.load_pretrained(tmp_path / "absent.pth")
    other = tmp_path / "x0_5.pth"
    torch.save(_torchvision_layout(ShuffleNetV2("0.5x")), other)
    with pytest.raises(PretrainedWeightsError, match=r"shape mismatches .*1\.0x.*stage2\.0\.branch1"):
        net.load_pretrained(other)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsError, match="cannot be read"):
        net.load_pretrained(junk)
    partial = tmp_path / "partial.pth"
    torch.save({"conv1.0.weight": net.conv1[0].weight.detach().clone()}, partial)
    with pytest.raises(PretrainedWeightsError, match="keys missing"):
        net.load_pretrained(partial)
