"""Official checkpoint import: Lightning prefixes and EMA preference, aux filtering, clear refusals."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import AuxHeadConfig, BackboneConfig, HeadConfig, ModelConfig, NeckConfig
from pipeline.model import build_model
from pipeline.model.official import OfficialWeightsError, load_official_weights, main, select_state_dict


def small_cfg(num_classes=3, reg_max=7, size="0.5x") -> ModelConfig:
    return ModelConfig(
        num_classes=num_classes, backbone=BackboneConfig(size=size), neck=NeckConfig(out_channels=32, kernel_size=3),
        head=HeadConfig(feat_channels=24, stacked_convs=1, kernel_size=3, reg_max=reg_max),
        aux_head=AuxHeadConfig(feat_channels=32, stacked_convs=1, num_groups=8),
    )


class NotATensor:  # pickled by reference: weights_only loading must refuse it
    pass


def _randomised(model) -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}


def _lightning(tmp_path, cfg):
    trained, ema = _randomised(build_model(cfg)), _randomised(build_model(cfg))
    state = {f"model.{k}": v for k, v in trained.items()} | {f"avg_model.{k}": v for k, v in ema.items()}
    path = tmp_path / "model_last.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 30, "pytorch-lightning_version": "1.9.5"}, path)
    return path, trained, ema


def test_lightning_ckpt_prefers_ema_and_can_take_the_trained_weights(tmp_path):
    cfg = small_cfg()
    path, trained, ema = _lightning(tmp_path, cfg)
    model = build_model(cfg)
    report = load_official_weights(model, path)
    assert report.source == "avg_model" and report.loaded == len(ema)
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    report = load_official_weights(model, path, prefer_ema=False)
    assert report.source == "model"
    assert torch.equal(model.head.gfl_cls[0].weight, trained["head.gfl_cls.0.weight"])


def test_pth_plain_and_ddp_prefixed_files_and_inference_model(tmp_path):
    cfg = small_cfg()
    weights = _randomised(build_model(cfg))
    pth, plain = tmp_path / "nanodet_model_best.pth", tmp_path / "plain.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, pth)
    torch.save(weights, plain)
    infer = build_model(cfg, with_aux=False)
    report = load_official_weights(infer, pth)
    assert report.source == "state_dict" and report.skipped_aux and all(k.startswith("aux_") for k in report.skipped_aux)
    assert torch.equal(infer.backbone.conv1[0].weight, weights["backbone.conv1.0.weight"])
    assert load_official_weights(build_model(cfg), plain).source == "plain"


def test_num_classes_mismatch_names_the_key_and_the_fix(tmp_path):
    path, _, _ = _lightning(tmp_path, small_cfg(num_classes=80))
    with pytest.raises(OfficialWeightsError) as err:
        load_official_weights(build_model(small_cfg(num_classes=3)), path)
    msg = str(err.value)
    assert "head.gfl_cls.0.weight: checkpoint [112, 24, 1, 1] vs model [35, 24, 1, 1]" in msg
    assert "model.num_classes=80" in msg and "model.head.reg_max=7" in msg


def test_reg_max_mismatch_is_reported(tmp_path):
    path, _, _ = _lightning(tmp_path, small_cfg(reg_max=10))
    with pytest.raises(OfficialWeightsError, match=r"head\.distribution_project\.project: checkpoint \[11\] vs model \[8\]"):
        load_official_weights(build_model(small_cfg(reg_max=7)), path)


def test_missing_aux_keys_suggest_an_inference_model(tmp_path):
    cfg = small_cfg()
    path = tmp_path / "no_aux.pth"
    torch.save({"state_dict": build_model(cfg, with_aux=False).state_dict()}, path)
    with pytest.raises(OfficialWeightsError, match="with_aux=False"):
        load_official_weights(build_model(cfg), path)


def test_pickled_payload_missing_file_and_junk_are_refused(tmp_path):
    cfg = small_cfg()
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": build_model(cfg).state_dict(), "hyper_parameters": NotATensor()}, pickled)
    with pytest.raises(OfficialWeightsError, match="pickled Python objects"):
        load_official_weights(build_model(cfg), pickled)
    with pytest.raises(OfficialWeightsError, match="file not found"):
        load_official_weights(build_model(cfg), tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_text("hello")
    with pytest.raises(OfficialWeightsError, match="not a readable torch file"):
        load_official_weights(build_model(cfg), junk)
    with pytest.raises(OfficialWeightsError, match="no state dict"):
        select_state_dict({"epoch": 1})


def test_cli_writes_our_checkpoint_format(tmp_path, capsys):
    path, trained, ema = _lightning(tmp_path, small_cfg(num_classes=3, size="0.5x"))
    out = tmp_path / "imported.pt"
    overrides = ["model.num_classes=3", "model.backbone.size=0.5x", "model.neck.out_channels=32",
                 "model.neck.kernel_size=3", "model.head.feat_channels=24", "model.head.stacked_convs=1",
                 "model.head.kernel_size=3", "model.aux_head.feat_channels=32", "model.aux_head.stacked_convs=1",
                 "model.aux_head.num_groups=8", "model.head.strides=[8,16,32,64]", "data.class_names=[a,b,c]"]
    assert main(["--checkpoint", str(path), "--out", str(out), *overrides]) == 0
    saved = torch.load(out, weights_only=True)
    assert saved["config"]["model"]["num_classes"] == 3
    assert torch.equal(saved["ema"]["head.gfl_cls.0.weight"], ema["head.gfl_cls.0.weight"])
    assert torch.equal(saved["model"]["head.gfl_cls.0.weight"], trained["head.gfl_cls.0.weight"])
    assert main(["--checkpoint", str(path), "--out", str(out), "model.num_classes=5"]) == 2
    assert "weights do not fit the configured model" in capsys.readouterr().err
