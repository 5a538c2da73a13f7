"""Every training-speed optimisation gives the plain path's results (within a tolerance):
channels_last vs NCHW, the bf16 autocast step vs float32, the cheaper QFL/DFL forms vs the literal
formulas, and torch.compile (its eager fallback, and the compiled path on a tiny module)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import AuxHeadConfig, BackboneConfig, HeadConfig, ModelConfig, NeckConfig
from pipeline.model import build_model
from pipeline.model.criterion import NanoDetPlusLoss
from pipeline.model.decode import make_priors
from pipeline.model.layers import DepthwiseConv2d
from pipeline.model.losses import distribution_focal_loss, quality_focal_loss
from pipeline.model.shufflenetv2 import channel_shuffle
from pipeline.perf import CompileFallback, apply_memory_format, compile_with_fallback, run_with_fallback

HW = (64, 64)
CPU = torch.device("cpu")


def small_cfg() -> ModelConfig:
    return ModelConfig(
        num_classes=3, backbone=BackboneConfig(size="0.5x"), neck=NeckConfig(out_channels=32, kernel_size=5),
        head=HeadConfig(feat_channels=32, stacked_convs=2, kernel_size=5, strides=[8, 16, 32, 64], reg_max=7),
        aux_head=AuxHeadConfig(feat_channels=64, stacked_convs=2, num_groups=8),
    )


def batch(seed: int = 0, b: int = 2):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, *HW, generator=gen)
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 30.0], [20.0, 22.0, 60.0, 62.0]]]).repeat(b, 1, 1)
    labels = torch.tensor([[0, 2]]).repeat(b, 1)
    return images, boxes, labels, torch.ones(b, 2, dtype=torch.bool)


def step(model: nn.Module, images, boxes, labels, valid, amp: torch.dtype | None = None):
    """One training forward + loss + backward; returns (outputs, loss, {param name: grad})."""
    cfg = small_cfg()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        head_out, aux_out = model.forward_train(images, epoch=0)
    loss, _, _ = NanoDetPlusLoss(cfg)(head_out, aux_out, boxes, labels, valid, make_priors(HW, model.strides))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return (head_out.detach().float(), aux_out.detach().float()), loss.detach(), grads


def twin_models(transform):
    torch.manual_seed(0)
    plain = build_model(small_cfg(), with_aux=True).train()
    other = transform(copy.deepcopy(plain))
    return plain, other


# ------------------------------------------------------------------------------------ channels_last
def test_channel_shuffle_keeps_channels_last_and_values():
    x = torch.randn(2, 8, 5, 6)
    ref = channel_shuffle(x, 2)
    out = channel_shuffle(x.contiguous(memory_format=torch.channels_last), 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)
    assert ref.is_contiguous()  # NCHW stays NCHW (export path)


def smooth(model: nn.Module) -> nn.Module:
    """LeakyReLU slope 1 and average instead of max pooling: without kinks a 1e-7 forward difference
    cannot flip an activation (which, through train-mode BatchNorm, moves float32 gradients by ~1e-2
    and hides what is compared here: that both layouts compute the same function and gradient)."""
    for module in model.modules():
        if isinstance(module, nn.LeakyReLU):
            module.negative_slope = 1.0
    model.backbone.maxpool = nn.AvgPool2d(3, 2, 1)
    return model


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.mark.parametrize("amp_policy", [None, torch.bfloat16])
def test_channels_last_forward_backward_matches_nchw(amp_policy):
    """fp32 maths in both; ``amp_policy`` only picks the layout policy (bf16: aux head kept NCHW)."""
    plain, cl = twin_models(lambda m: apply_memory_format(m, True, amp_policy, CPU))
    assert next(cl.backbone.parameters()).is_contiguous(memory_format=torch.channels_last)
    assert cl.aux_head.gfl_reg.weight.is_contiguous() == (amp_policy is not None)
    images, *gt = batch()
    images_cl = images.contiguous(memory_format=torch.channels_last)
    (h0, a0), loss0, g0 = step(smooth(copy.deepcopy(plain)), images, *gt)
    (h1, a1), loss1, g1 = step(smooth(copy.deepcopy(cl)), images_cl, *gt)
    torch.testing.assert_close(h1, h0, rtol=1e-4, atol=1e-5 * h0.abs().max().item())
    torch.testing.assert_close(a1, a0, rtol=1e-4, atol=1e-5 * a0.abs().max().item())
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 50
    # absolute floor from the largest gradient: biases right before a BatchNorm have a zero gradient up to
    # rounding noise, which no relative tolerance can compare
    floor = 1e-5 * flat(g0).abs().max().item()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-3, atol=floor, msg=name)

    # the real model (kinks kept): same outputs and loss; the gradient agrees up to activation flips
    (h0, a0), loss0, g0 = step(plain, images, *gt)
    (h1, a1), loss1, g1 = step(cl, images_cl, *gt)
    torch.testing.assert_close(h1, h0, rtol=1e-3, atol=1e-4 * h0.abs().max().item())
    torch.testing.assert_close(a1, a0, rtol=1e-3, atol=1e-4 * a0.abs().max().item())
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    assert F.cosine_similarity(flat(g1), flat(g0), dim=0) > 0.99


# ----------------------------------------------------------------------------------------- bf16
def test_bf16_autocast_step_close_to_fp32_and_grads_finite():
    plain, twin = twin_models(lambda m: apply_memory_format(m, True, torch.bfloat16, CPU))
    images, *gt = batch(seed=1)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    _, loss32, g32 = step(plain, images, *gt)
    (h16, a16), loss16, g16 = step(twin, images_cl, *gt, amp=torch.bfloat16)
    assert torch.isfinite(h16).all() and torch.isfinite(a16).all()
    torch.testing.assert_close(loss16, loss32, rtol=3e-2, atol=0)
    assert g16.keys() == g32.keys()
    for name, grad in g16.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
    # gradient direction: on the kink-free twin (with kinks, bf16's ~1e-2 forward error flips activations
    # and train-mode BatchNorm on 2 tiny images spreads that through the backbone's gradient)
    _, _, g32 = step(smooth(plain), images, *gt)
    _, _, g16 = step(smooth(twin), images_cl, *gt, amp=torch.bfloat16)
    assert F.cosine_similarity(flat(g16), flat(g32), dim=0) > 0.98


def test_depthwise_convs_stay_float32_under_cpu_autocast():
    dw = DepthwiseConv2d(8, 3, padding=1)
    dense = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dw(x).dtype == torch.float32
        assert dw(x.bfloat16()).dtype == torch.float32
        assert dense(x).dtype == torch.bfloat16
    plain = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    plain.load_state_dict(dw.state_dict())  # same keys as nn.Conv2d
    assert torch.equal(dw(x), plain(x))  # outside autocast: exactly nn.Conv2d


# --------------------------------------------------------------------------------------- losses
def qfl_literal(pred, labels, scores, beta=2.0):
    """The full-grid formula: BCE against the soft one-hot target on every element."""
    sigma = pred.sigmoid()
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none") * sigma.pow(beta)
    is_target = labels[:, None] == torch.arange(pred.shape[1])
    q = scores[:, None].expand_as(pred)
    pos = F.binary_cross_entropy_with_logits(pred, q, reduction="none") * (q - sigma).abs().pow(beta)
    return torch.where(is_target, pos, neg).sum(dim=1)


def test_qfl_and_dfl_match_literal_formulas():
    gen = torch.Generator().manual_seed(0)
    pred = (torch.randn(300, 5, generator=gen) * 4).requires_grad_()
    labels = torch.randint(-1, 6, (300,), generator=gen)  # -1 ignored, 5 background, 0..4 positives
    scores = torch.rand(300, generator=gen)
    fast = quality_focal_loss(pred, labels, scores, reduction="none")
    literal = qfl_literal(pred, labels, scores)
    torch.testing.assert_close(fast, literal, rtol=1e-5, atol=1e-6)
    g_fast, = torch.autograd.grad(fast.sum(), pred)
    g_lit, = torch.autograd.grad(literal.sum(), pred)
    torch.testing.assert_close(g_fast, g_lit, rtol=1e-5, atol=1e-6)

    bins = torch.randn(400, 8, generator=gen, requires_grad=True)
    target = torch.rand(400, generator=gen) * 6.9
    left = target.long()
    literal = (F.cross_entropy(bins, left, reduction="none") * (left + 1 - target)
               + F.cross_entropy(bins, left + 1, reduction="none") * (target - left))
    fast = distribution_focal_loss(bins, target, reduction="none")
    torch.testing.assert_close(fast, literal, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(fast.sum(), bins)[0],
                               torch.autograd.grad(literal.sum(), bins)[0], rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------- compile
def _failing_backend(gm, example_inputs):
    raise RuntimeError("simulated compiler failure")


def test_compile_failure_falls_back_to_eager_with_warning(caplog):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.1))
    wrapped = CompileFallback(eager, backend=_failing_backend)
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING):
        out = wrapped(x)
    assert wrapped.failed
    assert any("torch.compile failed" in r.getMessage() and "eager" in r.getMessage() for r in caplog.records)
    assert torch.equal(out, eager(x))
    assert wrapped._orig_mod is eager and list(wrapped.state_dict()) == [f"_orig_mod.{k}" for k in eager.state_dict()]


def test_run_with_fallback_retries_a_failed_first_step_eagerly(caplog):
    wrapped = CompileFallback(nn.Linear(2, 2), backend=_failing_backend)
    calls = []

    def flaky_step():
        calls.append(wrapped.failed)
        if len(calls) == 1:
            raise RuntimeError("backward compile failed")  # e.g. the lazily compiled backward graph
        return "ok"

    with caplog.at_level(logging.WARNING):
        assert run_with_fallback(wrapped, flaky_step) == "ok"
    assert calls == [False, True] and wrapped.failed
    # a plain module is never retried: its errors surface at once
    with pytest.raises(RuntimeError, match="boom"):
        run_with_fallback(nn.Linear(2, 2), lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert compile_with_fallback(wrapped, enabled=False) is wrapped


def test_compiled_module_matches_eager_forward_and_backward():
    """The compiled path itself (``aot_eager``: dynamo + AOTAutograd graphs, no C++ build, seconds)."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.LeakyReLU(0.1),
                          DepthwiseConv2d(8, 3, padding=1), nn.BatchNorm2d(8))
    twin = copy.deepcopy(eager)
    compiled = CompileFallback(twin, backend="aot_eager")
    x = torch.randn(2, 3, 10, 10)
    y0, y1 = eager(x), run_with_fallback(compiled, lambda: compiled(x))
    assert not compiled.failed
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    y0.square().sum().backward()
    y1.square().sum().backward()
    for (name, p0), p1 in zip(eager.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-6, msg=name)
