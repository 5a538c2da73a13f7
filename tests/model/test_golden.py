"""Parity with the official implementation: the golden checker on every shipped file, and its failure modes."""
from __future__ import annotations

import copy

import pytest
import torch
from sharedkit import golden_params

from pipeline.model import build_model
from pipeline.model.official import load_official_weights
from pipeline.tools.golden import GoldenError, config_from_meta, main


@pytest.mark.parametrize("path", golden_params())  # under CI a missing golden folder fails the collection
def test_every_golden_file_passes(path, capsys):
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK (") == 1 and "FAIL" not in out, out


def test_eval_head_out_parity(golden, tmp_path):
    cfg, hw = config_from_meta(golden["meta"])
    model = build_model(cfg, with_aux=False)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": golden["state_dict"]}, path)  # the nanodet_model_best.pth layout
    report = load_official_weights(model, path)
    assert report.skipped_aux
    model.eval()
    with torch.no_grad():
        out = model(golden["images"])
    assert tuple(golden["images"].shape[-2:]) == hw
    torch.testing.assert_close(out, golden["head_out"], atol=1e-4, rtol=1e-4)


def test_checker_fails_on_a_wrong_model(golden_dir, tmp_path, capsys):
    blob = torch.load(golden_dir / "m_1.0x_c3_h128_w128.pt", weights_only=True)
    blob["state_dict"] = dict(blob["state_dict"])
    blob["state_dict"]["fpn.reduce_layers.1.bn.bias"] = blob["state_dict"]["fpn.reduce_layers.1.bn.bias"] + 0.05
    path = tmp_path / "tampered.pt"
    torch.save(blob, path)
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if "head_out (eval)" in row)
    assert "FAILED" in out and line.rstrip().endswith("FAIL")


def test_unsupported_or_broken_files_exit_2(golden_dir, tmp_path, capsys):
    blob = torch.load(golden_dir / "m_1.0x_c3_h128_w128.pt", weights_only=True)
    blob["meta"] = copy.deepcopy(blob["meta"])
    blob["meta"]["config"]["arch"]["fpn"]["use_depthwise"] = False
    unsupported = tmp_path / "dense_pan.pt"
    torch.save(blob, unsupported)
    junk = tmp_path / "junk.pt"
    junk.write_text("nope")
    assert main([str(unsupported), str(junk)]) == 2
    err = capsys.readouterr().err
    assert "fpn.use_depthwise=False" in err and "junk.pt: cannot be read" in err


def test_config_from_meta_follows_the_file(golden):
    meta = copy.deepcopy(golden["meta"])
    arch = meta["config"]["arch"]
    arch["backbone"]["model_size"] = "1.5x"
    arch["fpn"].update(in_channels=[176, 352, 704], out_channels=128, num_extra_level=0)
    arch["head"].update(input_channel=128, feat_channels=128, strides=[8, 16, 32], reg_max=10, num_classes=80)
    arch["aux_head"].update(input_channel=256, feat_channels=256, strides=[8, 16, 32], reg_max=10, num_classes=80,
                            norm_cfg={"type": "GN", "num_groups": 16})
    meta["input_hw"] = [96, 160]
    cfg, hw = config_from_meta(meta)
    assert (cfg.backbone.size, cfg.neck.out_channels, cfg.head.reg_max, cfg.num_classes) == ("1.5x", 128, 10, 80)
    assert list(cfg.head.strides) == [8, 16, 32] and cfg.aux_head.num_groups == 16 and hw == (96, 160)
    arch["aux_head"]["reg_max"] = 7
    with pytest.raises(GoldenError, match="aux_head.reg_max=7"):
        config_from_meta(meta)
