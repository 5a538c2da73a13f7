"""NanoDetPlus wiring: shapes for several configurations, aux branch, detach_epoch, official keys/init."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import AuxHeadConfig, BackboneConfig, HeadConfig, ModelConfig, NeckConfig
from pipeline.model import NanoDetPlus, build_model


def small_cfg(num_classes=3, reg_max=7, strides=(8, 16, 32, 64), neck=32, feat=24, aux=32, groups=8,
              size="0.5x", detach_epoch=10) -> ModelConfig:
    return ModelConfig(
        num_classes=num_classes, detach_epoch=detach_epoch, backbone=BackboneConfig(size=size),
        neck=NeckConfig(out_channels=neck, kernel_size=3),
        head=HeadConfig(feat_channels=feat, stacked_convs=1, kernel_size=3, strides=list(strides), reg_max=reg_max),
        aux_head=AuxHeadConfig(feat_channels=aux, stacked_convs=1, num_groups=groups),
    )


def _num_priors(h, w, strides):
    return sum(-(-h // s) * -(-w // s) for s in strides)


@pytest.mark.parametrize("reg_max, strides, hw", [
    (10, (8, 16, 32), (64, 96)),
    (16, (8, 16, 32, 64, 128), (128, 256)),
    (7, (8, 16, 32, 64), (192, 64)),
])
def test_forward_and_forward_train_shapes(reg_max, strides, hw):
    model = build_model(small_cfg(num_classes=4, reg_max=reg_max, strides=strides))
    images = torch.randn(2, 3, *hw)
    expected = (2, _num_priors(*hw, strides), 4 + 4 * (reg_max + 1))
    model.eval()
    with torch.no_grad():
        assert model(images).shape == expected
    model.train()
    head_out, aux_out = model.forward_train(images, epoch=0)
    assert head_out.shape == expected and aux_out.shape == expected
    assert model.strides == tuple(strides) and model.reg_max == reg_max and model.num_classes == 4


def test_inference_model_has_no_aux_parts():
    cfg = small_cfg()
    infer, train = build_model(cfg, with_aux=False), build_model(cfg, with_aux=True)
    keys = list(infer.state_dict())
    assert not any(k.startswith(("aux_fpn", "aux_head")) for k in keys)
    assert keys == [k for k in train.state_dict() if not k.startswith(("aux_fpn", "aux_head"))]
    assert not infer.with_aux and train.with_aux
    with pytest.raises(RuntimeError, match="with_aux=True"):
        infer.forward_train(torch.randn(1, 3, 64, 64), epoch=0)


def test_forward_never_runs_the_aux_branch():
    model = build_model(small_cfg()).eval()
    calls = []
    model.aux_fpn.register_forward_hook(lambda *a: calls.append("aux_fpn"))
    model.aux_head.register_forward_hook(lambda *a: calls.append("aux_head"))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        head_out, _ = model.forward_train(images, epoch=0)
    assert calls == ["aux_fpn", "aux_head"]  # only from forward_train
    assert torch.equal(out, head_out)


def test_aux_fpn_starts_as_a_copy_of_fpn():
    model = build_model(small_cfg())
    fpn, aux = model.fpn.state_dict(), model.aux_fpn.state_dict()
    assert all(torch.equal(fpn[k], aux[k]) for k in fpn)
    assert model.fpn.reduce_layers[0].conv.weight.data_ptr() != model.aux_fpn.reduce_layers[0].conv.weight.data_ptr()


@pytest.mark.parametrize("epoch, reaches_shared", [(0, True), (2, False), (5, False)])
def test_detach_epoch_stops_aux_gradients_into_backbone_and_fpn(epoch, reaches_shared):
    model = build_model(small_cfg(detach_epoch=2)).train()
    _, aux_out = model.forward_train(torch.randn(2, 3, 64, 64), epoch=epoch)
    aux_out.square().mean().backward()
    shared = [p.grad for p in list(model.backbone.parameters()) + list(model.fpn.parameters())]
    touched = any(g is not None and g.abs().sum() > 0 for g in shared)
    assert touched == reaches_shared
    assert model.aux_fpn.reduce_layers[0].conv.weight.grad.abs().sum() > 0  # the aux branch always trains
    assert model.aux_head.gfl_cls.weight.grad.abs().sum() > 0


def test_default_keys_match_the_official_state_dict(golden):
    cfg = ModelConfig(num_classes=3)
    model = build_model(cfg)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == [[k, list(s)] for k, s in golden["state_dict_keys"]]


def test_seeded_build_reproduces_the_official_initial_conv_weights(golden):
    """The golden state dict is the official seeded build with only norms and final convs perturbed."""
    torch.manual_seed(golden["meta"]["seed"])
    model = build_model(ModelConfig(num_classes=3))
    ours = model.state_dict()
    untouched = [k for k, v in golden["state_dict"].items()
                 if v.dim() >= 2 and "gfl_" not in k]  # conv weights; gfl_* were perturbed
    assert len(untouched) > 140
    different = [k for k in untouched if not torch.equal(ours[k], golden["state_dict"][k])]
    assert different == []


def test_build_model_rejects_bad_strides():
    cfg = small_cfg(strides=(8, 16, 32, 48))
    with pytest.raises(ValueError, match="model.head.strides"):
        build_model(cfg)
    assert isinstance(build_model(small_cfg(), with_aux=False), NanoDetPlus)
