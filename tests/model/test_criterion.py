"""NanoDetPlusLoss against the official training step (golden ``train.*``): the six losses, the shared
targets and the gradients reaching the head outputs."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model.assigner import DynamicSoftLabelAssigner
from pipeline.model.criterion import LOSS_KEYS, NanoDetPlusLoss
from pipeline.model.decode import decode_boxes, make_priors
from pipeline.model.losses import quality_focal_loss

STRIDES = [8, 16, 32, 64]
FILES = ["m_1.0x_c3_h128_w128.pt", "m_1.0x_c3_h128_w192.pt", "emptygt_m_1.0x_c3_h128_w128.pt"]
CRITERION = NanoDetPlusLoss(ModelConfig(num_classes=3))


def padded_gt(blob):
    num_gt = max(len(b) for b in blob["gt_bboxes"])
    batch = len(blob["gt_bboxes"])
    gt_boxes = torch.zeros(batch, num_gt, 4)
    gt_labels = torch.zeros(batch, num_gt, dtype=torch.long)
    gt_valid = torch.zeros(batch, num_gt, dtype=torch.bool)
    for i, (boxes, labels) in enumerate(zip(blob["gt_bboxes"], blob["gt_labels"])):
        gt_boxes[i, :len(boxes)], gt_labels[i, :len(boxes)], gt_valid[i, :len(boxes)] = boxes, labels, True
    return gt_boxes, gt_labels, gt_valid


@pytest.fixture(scope="module", params=FILES)
def blob(request, golden_dir):
    return torch.load(golden_dir / request.param, weights_only=True)


def run(blob, epoch="epoch_0", aux=True):
    train = blob["train"][epoch]
    head_out = train["head_out"].clone().requires_grad_()
    aux_out = train["aux_out"].clone().requires_grad_() if aux else None
    priors = CRITERION.priors(blob["meta"]["input_hw"])
    assert torch.equal(priors, blob["priors"])
    total, terms, targets = CRITERION(head_out, aux_out, *padded_gt(blob), priors)
    return head_out, aux_out, total, terms, targets


def test_losses_and_targets_equal_golden(blob):
    _, _, total, terms, targets = run(blob)
    train = blob["train"]["epoch_0"]
    for key in LOSS_KEYS:
        assert terms[key].dim() == 0 and not terms[key].requires_grad
        torch.testing.assert_close(terms[key], torch.tensor(train["losses"][key]), rtol=1e-5, atol=0)
    torch.testing.assert_close(total.detach(), torch.tensor(train["loss_total"]), rtol=1e-5, atol=0)
    assert int(terms["num_pos"]) == sum(a["num_pos"] for a in train["assign"])
    for i, ref in enumerate(train["assign"]):
        assert torch.equal(targets.labels[i], ref["labels"])
        torch.testing.assert_close(targets.label_scores[i], ref["label_scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(targets.dist_targets[i], ref["dist_targets"], rtol=0, atol=1e-5)


def test_empty_image_in_batch(golden_dir):
    blob = torch.load(golden_dir / "emptygt_m_1.0x_c3_h128_w128.pt", weights_only=True)
    targets = run(blob)[-1]
    assert targets.num_pos[1] == 0 and torch.all(targets.labels[1] == 3)
    assert targets.num_pos[0] > 0


def test_gradients_reach_head_outputs_as_official(golden):
    """The official bias gradients are sums of our output gradients: gfl_cls.{l}.bias over the points of
    level l (main head, 1x1 conv), aux gfl_cls.bias over all points, aux gfl_reg.bias weighted by the
    per-level Scale."""
    head_out, aux_out, total, _, _ = run(golden)
    total.backward()
    grads, state = golden["train"]["epoch_0"]["grads"], golden["state_dict"]
    sizes = [(128 // s) ** 2 for s in STRIDES]
    level = torch.arange(len(STRIDES)).repeat_interleave(torch.tensor(sizes))

    def rel(actual, expected):
        return float((actual - expected).norm() / expected.norm())

    for lvl in (0, 3):
        assert rel(head_out.grad[:, level == lvl].sum((0, 1)), grads[f"head.gfl_cls.{lvl}.bias"]) < 1e-4
    assert rel(aux_out.grad[..., :3].sum((0, 1)), grads["aux_head.gfl_cls.bias"]) < 1e-4
    scale = torch.stack([state[f"aux_head.scales.{lvl}.scale"].reshape(()) for lvl in range(4)])
    reg_grad = (aux_out.grad[..., 3:] * scale[level][None, :, None]).sum((0, 1))
    assert rel(reg_grad, grads["aux_head.gfl_reg.bias"]) < 1e-4


def test_epoch_10_same_losses(golden):
    *_, terms, _ = run(golden, "epoch_10")
    for key in LOSS_KEYS:
        torch.testing.assert_close(terms[key], torch.tensor(golden["train"]["epoch_10"]["losses"][key]),
                                   rtol=1e-5, atol=0)


def test_without_aux_the_main_head_assigns(golden):
    _, _, total, terms, targets = run(golden, aux=False)
    assert set(terms) == {"loss_qfl", "loss_bbox", "loss_dfl", "num_pos"}
    train = golden["train"]["epoch_0"]
    priors = make_priors((128, 128), STRIDES)
    boxes = decode_boxes(train["head_out"][..., 3:], priors, 7)
    expected = DynamicSoftLabelAssigner().assign(train["head_out"][..., :3], priors, boxes, *padded_gt(golden))
    assert torch.equal(targets.labels, torch.where(expected.assigned_gt_inds > 0, expected.labels, 3))
    torch.testing.assert_close(total.detach(), sum(terms[k] for k in LOSS_KEYS[:3]))


def test_no_positive_anywhere(golden):
    train = golden["train"]["epoch_0"]
    head_out = train["head_out"].clone().requires_grad_()
    aux_out = train["aux_out"].clone().requires_grad_()
    gt_boxes, gt_labels, gt_valid = padded_gt(golden)
    total, terms, _ = CRITERION(head_out, aux_out, gt_boxes, gt_labels, torch.zeros_like(gt_valid),
                                      make_priors((128, 128), STRIDES))
    assert int(terms["num_pos"]) == 0
    for key in ("loss_bbox", "loss_dfl", "aux_loss_bbox", "aux_loss_dfl"):
        assert terms[key].item() == 0.0
    background = torch.full((2 * 340,), 3)
    for key, out in (("loss_qfl", train["head_out"]), ("aux_loss_qfl", train["aux_out"])):
        expected = quality_focal_loss(out[..., :3].reshape(-1, 3), background, torch.zeros(680),
                                      torch.ones(680), avg_factor=1.0)
        torch.testing.assert_close(terms[key], expected, rtol=1e-6, atol=0)
    total.backward()  # graph-connected: the box logits get (zero) gradients
    assert head_out.grad is not None and torch.count_nonzero(head_out.grad[..., 3:]) == 0
    assert torch.count_nonzero(head_out.grad[..., :3]) > 0


def test_bf16_autocast_computes_in_float32(golden):
    train = golden["train"]["epoch_0"]
    head_bf16, aux_bf16 = train["head_out"].bfloat16(), train["aux_out"].bfloat16()
    priors = make_priors((128, 128), STRIDES)
    gt = padded_gt(golden)
    reference = CRITERION(head_bf16.float(), aux_bf16.float(), *gt, priors)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = CRITERION(head_bf16.requires_grad_(), aux_bf16.requires_grad_(), *gt, priors)[0]
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, reference, rtol=1e-6, atol=0)
    total.backward()
    assert head_bf16.grad is not None and torch.isfinite(head_bf16.grad.float()).all()


def test_bad_shapes_name_the_problem(golden):
    train = golden["train"]["epoch_0"]
    gt = padded_gt(golden)
    with pytest.raises(ValueError, match="num_classes=3"):
        CRITERION(train["head_out"][..., :-1], None, *gt, make_priors((128, 128), STRIDES))
    with pytest.raises(ValueError, match="gt_valid"):
        CRITERION(train["head_out"], None, gt[0], gt[1], gt[2].float(), make_priors((128, 128), STRIDES))
    bad_labels = gt[1].clone()
    bad_labels[0, 0] = 3
    with pytest.raises(RuntimeError, match="model.num_classes=3"):
        CRITERION(train["head_out"], None, gt[0], bad_labels, gt[2], make_priors((128, 128), STRIDES))
