"""Size/cost summary against the analytic counts of spec appendix A (NanoDet-Plus-m 1.0x @320)."""
from __future__ import annotations

import torch

from pipeline.config import ModelConfig
from pipeline.model import build_model
from pipeline.model.summary import count_macs, format_summary, summarize


def test_nanodet_plus_m_320_matches_the_spec_counts():
    model = build_model(ModelConfig(num_classes=80))
    report = summarize(model, (320, 320))
    assert report["params_inference_conv"] == 1_174_768  # the README's "1.17M"
    assert report["params_inference"] == 1_197_924  # with BN affine parameters
    assert report["params_by_part"] == {"backbone": 776_420, "fpn": 282_048, "head": 139_456,
                                        "aux_fpn": 282_048, "aux_head": 2_850_932}
    assert round(report["macs_inference"] / 1e9, 3) == 0.451
    assert report["flops_inference"] == 2 * report["macs_inference"]  # README "0.9G FLOPs"
    assert report["macs_by_part"] == {"backbone": 246_127_200, "fpn": 132_369_600, "head": 72_216_000}
    assert report["feature_maps"] == {8: [40, 40], 16: [20, 20], 32: [10, 10], 64: [5, 5]}
    assert report["num_priors"] == 2125
    assert report["macs_training"] > report["macs_inference"]
    assert "1,174,768" in format_summary(report)


def test_non_square_input_and_inference_model():
    model = build_model(ModelConfig(num_classes=3), with_aux=False)
    report = summarize(model, (128, 192))
    assert report["feature_maps"][64] == [2, 3] and report["num_priors"] == 510
    assert "macs_training" not in report and "aux_head" not in report["params_by_part"]
    assert report["params_training"] == report["params_inference"]


def test_macs_scale_with_pixels_and_leave_bn_stats_alone():
    model = build_model(ModelConfig(num_classes=80), with_aux=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, large = count_macs(model, (160, 160)), count_macs(model, (320, 320))
    assert 3.9 < sum(large.values()) / sum(small.values()) < 4.1
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
