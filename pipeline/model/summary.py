"""Model size and cost: parameters, conv/linear MACs (FLOPs = 2 x MACs), feature-map sizes, prior count.

The counting convention follows the spec's appendix A (and the README's "1.17M params / 0.9G FLOPs"
for NanoDet-Plus-m @320): the headline parameter count is conv weights + conv biases of the inference
graph; norm affine parameters are reported separately; MACs count only Conv2d/Linear multiply-adds.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.model.detector import NanoDetPlus

PARTS = ("backbone", "fpn", "head", "aux_fpn", "aux_head")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_conv_params(module: nn.Module) -> int:
    """Weights and biases of Conv2d/Linear layers only (no norm affine, no Scale)."""
    return sum(p.numel() for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())


def _macs_hook(counter: dict[str, int], name: str):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            counter[name] += output.numel() // output.shape[0] * k
        else:  # nn.Linear
            counter[name] += output.numel() // output.shape[0] * module.in_features
    return hook


@torch.no_grad()
def count_macs(model: NanoDetPlus, input_hw: tuple[int, int], train_graph: bool = False) -> dict[str, int]:
    """Per-image multiply-accumulates of every Conv2d/Linear, grouped by top-level part.

    ``train_graph`` runs ``forward_train`` (adds aux_fpn and aux_head); otherwise the inference forward.
    """
    names = PARTS if train_graph else ("backbone", "fpn", "head")
    counter = {part: 0 for part in names if hasattr(model, part)}
    handles = []
    for part in counter:
        for module in getattr(model, part).modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                handles.append(module.register_forward_hook(_macs_hook(counter, part)))
    was_training = model.training
    model.eval()  # BN in eval mode: running stats stay untouched
    try:
        param = next(model.parameters())
        images = torch.zeros(1, 3, *input_hw, device=param.device, dtype=param.dtype)
        model.forward_train(images, epoch=0) if train_graph else model(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counter


def summarize(model: NanoDetPlus, input_hw: tuple[int, int]) -> dict[str, Any]:
    """Size/cost report of ``model`` at network input ``input_hw = (H, W)`` (a plain, JSON-able dict).

    Keys: ``params_inference`` (all parameters without aux), ``params_inference_conv`` (conv weights +
    biases, the README convention), ``params_training`` (with aux), ``params_by_part``, ``macs_inference``,
    ``flops_inference`` (2 x MACs), ``macs_by_part``, ``macs_training`` (forward of the training graph,
    when built with aux), ``feature_maps`` (per stride ``[H_l, W_l]``), ``num_priors``, ``input_hw``.
    """
    height, width = int(input_hw[0]), int(input_hw[1])
    parts = {part: getattr(model, part) for part in PARTS if hasattr(model, part)}
    inference = ("backbone", "fpn", "head")
    macs = count_macs(model, (height, width))
    report: dict[str, Any] = {
        "input_hw": [height, width],
        "params_inference": sum(count_params(parts[p]) for p in inference),
        "params_inference_conv": sum(count_conv_params(parts[p]) for p in inference),
        "params_training": count_params(model),
        "params_by_part": {p: count_params(m) for p, m in parts.items()},
        "macs_inference": sum(macs.values()),
        "macs_by_part": macs,
        "feature_maps": {int(s): [math.ceil(height / s), math.ceil(width / s)] for s in model.strides},
    }
    report["flops_inference"] = 2 * report["macs_inference"]
    report["num_priors"] = sum(h * w for h, w in report["feature_maps"].values())
    if model.with_aux:
        report["macs_training"] = sum(count_macs(model, (height, width), train_graph=True).values())
    return report


def format_summary(report: dict[str, Any]) -> str:
    """Human-readable multi-line rendering of :func:`summarize`'s dict."""
    h, w = report["input_hw"]
    lines = [
        f"input {w}x{h} (WxH): {report['num_priors']} priors, maps "
        + ", ".join(f"s{s}: {hw[0]}x{hw[1]}" for s, hw in report["feature_maps"].items()),
        f"params (inference): {report['params_inference']:,} ({report['params_inference_conv']:,} conv only)",
        f"params (training, with aux): {report['params_training']:,}  by part: "
        + ", ".join(f"{k} {v:,}" for k, v in report["params_by_part"].items()),
        (f"FLOPs (inference, 2 x MACs): {report['flops_inference'] / 1e9:.3f}G "
         f"(MACs {report['macs_inference'] / 1e9:.3f}G)"),
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- FLOPs
def training_flops(model: nn.Module, input_hw: tuple[int, int]) -> dict[str, float]:
    """Per-image conv/linear FLOPs (2 x MACs) of the training forward (with aux) and of a training step.

    The step counts 3x the forward: the backward computes a gradient for the input and one for the
    weights, each as costly as the forward (the usual convention; the first conv's input gradient,
    not needed, is included).
    """
    raw = model
    forward = 2.0 * sum(count_macs(raw, input_hw, train_graph=True).values())
    inference = 2.0 * sum(count_macs(raw, input_hw, train_graph=False).values())
    return {"forward_train_flops": forward, "train_step_flops": 3.0 * forward, "inference_flops": inference}
