"""ONNX export of the inference model (no aux branch) and its INT8 (onnxruntime QDQ) variant.

Layouts (export.decode_in_graph):
* raw (default, like the official export): one output ``output [B, N, C + 4(R+1)]`` = sigmoid class
  scores followed by the raw DFL logits (left, top, right, bottom x R+1 bins); decode with priors
  ``(col*s, row*s)``, softmax + expectation per side times the stride, then NMS (pipeline.model.decode).
* decoded: ``scores [B, N, C]`` and ``boxes [B, N, 4]`` xyxy in network-input pixels (NMS left to the user).

Input ``images [B, 3, H, W]`` float32 BGR, ``(pixel - mean) / std``, batch axis dynamic. The dummy input
is built as ``[1, 3, h, w]`` from the config's ``[w, h]`` (the official script swapped them, issue #574).
Everything needed to run the file is in ``metadata_props`` (see :func:`build_metadata`); the other formats
carry the same dictionary.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import config_hash
from pipeline.infer.exporters.common import ExportError, staging
from pipeline.infer.runtime import Preprocessing
from pipeline.io import atomic_write
from pipeline.model.decode import decode_for_export, num_bins, priors_for


class ExportModule(nn.Module):
    """What goes into the ONNX graph: the inference model plus the output convention of the layout."""

    def __init__(self, model: nn.Module, input_hw: Sequence[int], decode_in_graph: bool):
        super().__init__()
        self.model = model.eval()
        self.num_classes, self.reg_max = int(model.num_classes), int(model.reg_max)
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.decode_in_graph = decode_in_graph
        # fixed H, W -> the priors are constants of the graph
        self.register_buffer("priors", priors_for(self.input_hw, model.strides).clone(), persistent=False)
        # eval mode on the wrapper too: the exporter restores the wrapper's mode recursively afterwards,
        # which would otherwise switch the shared model's BatchNorm layers to training mode
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] -> raw [B, N, C + 4(R+1)] or (scores [B, N, C], boxes [B, N, 4])."""
        head_out = self.model(images)
        if self.decode_in_graph:
            return decode_for_export(head_out, self.priors, self.num_classes, self.reg_max, self.input_hw)
        cls_logits, reg_logits = head_out.split([self.num_classes, num_bins(self.reg_max)], dim=-1)
        return torch.cat([cls_logits.sigmoid(), reg_logits], dim=-1)


def output_names(decode_in_graph: bool) -> list[str]:
    return ["scores", "boxes"] if decode_in_graph else ["output"]


def export_onnx(module: ExportModule, path: str | Path, opset: int = 17, dynamic_batch: bool = True,
                meta: dict[str, str] | None = None) -> Path:
    """Trace ``module`` to ``path`` with a ``[1, 3, H, W]`` dummy; static H, W; optional dynamic batch;
    ``meta`` (see :func:`build_metadata`) goes into ``metadata_props``. The file appears complete or not at all.

    The TorchScript-based exporter is used (dynamo=False): it writes the requested opset exactly,
    while the dynamo exporter's down-conversion to opset 17 produced an invalid Split node here, and it
    takes ~0.5 s instead of ~10 s.
    """
    import onnx  # optional heavy dependency: only when exporting

    if opset < 17:
        raise ExportError(f"export.opset={opset}: opset >= 17 is required")
    path = Path(path)
    module.eval()
    height, width = module.input_hw
    dummy = torch.zeros(1, 3, height, width)
    names = output_names(module.decode_in_graph)
    axes = {n: {0: "batch"} for n in ["images", *names]} if dynamic_batch else None
    with staging(path.parent) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter about the exporter choice
        torch.onnx.export(module, (dummy,), str(tmp / path.name), input_names=["images"], output_names=names,
                          opset_version=opset, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
        model = onnx.load(str(tmp / path.name))
    num_points = int(module.priors.shape[0])
    widths = [module.num_classes, 4] if module.decode_in_graph else [module.num_classes + num_bins(module.reg_max)]
    for out, last in zip(model.graph.output, widths):  # the tracer leaves N and C symbolic; they are fixed
        dims = out.type.tensor_type.shape.dim
        dims[1].dim_value, dims[2].dim_value = num_points, last
    onnx.checker.check_model(model)
    if meta is not None:
        set_metadata(model, meta)
    atomic_write(path, model.SerializeToString())
    return path


def package_version() -> str:
    try:
        return importlib_metadata.version("nanodet-pipeline")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def build_metadata(model_cfg: dict, class_names: Sequence[str], pre: Preprocessing, strides: Sequence[int],
                   reg_max: int, decode_in_graph: bool, thresholds: dict[str, float]) -> dict[str, str]:
    """The key/value strings stored in ``ModelProto.metadata_props`` (lists and dicts as JSON)."""
    layout = "decoded" if decode_in_graph else "raw"
    c, bins = len(class_names), num_bins(reg_max)
    outputs = ("scores [B, N, C] sigmoid probabilities; boxes [B, N, 4] x1,y1,x2,y2 network-input pixels"
               if decode_in_graph else
               f"output [B, N, {c + bins}]: {c} sigmoid class scores, then {bins} DFL logits (l,t,r,b x {reg_max + 1})")
    return {
        "format": "nanodet-plus",
        "class_names": json.dumps(list(class_names)),
        "num_classes": str(c),
        "input_size": json.dumps(list(pre.input_size)),
        "input": "images [B, 3, H, W] float32 BGR, (pixel - mean) / std",
        "mean": json.dumps(list(pre.mean)),
        "std": json.dumps(list(pre.std)),
        "preprocessing": pre.mode,
        "strides": json.dumps(list(strides)),
        "reg_max": str(reg_max),
        "priors": "x = col * stride, y = row * stride (no half-cell offset), levels in stride order",
        "layout": layout,
        "output_names": json.dumps(output_names(decode_in_graph)),
        "outputs": outputs,
        "score_thr": str(thresholds["score_thr"]),
        "iou_thr": str(thresholds["iou_thr"]),
        "max_dets": str(thresholds["max_dets"]),
        "package_version": package_version(),
        "config_hash": config_hash(model_cfg),
        "config": json.dumps(model_cfg, sort_keys=True),
    }


def write_metadata(path: str | Path, meta: dict[str, str]) -> None:
    """Replace the ``metadata_props`` of the ONNX file at ``path`` (atomically)."""
    import onnx  # optional heavy dependency: only when exporting

    model = onnx.load(str(path))
    set_metadata(model, meta)
    atomic_write(path, model.SerializeToString())


def set_metadata(model, meta: dict[str, str]) -> None:
    """Store ``meta`` in a ModelProto's ``metadata_props`` (replacing what was there)."""
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "nanodet-pipeline", meta.get("package_version", "")


# ------------------------------------------------------------------------------------------- INT8
def quantize_int8(fp32_path: Path, out_path: Path, calib: np.ndarray, meta: dict[str, str] | None = None) -> Path:
    """Static QDQ INT8 (per-channel weights, uint8 activations for VNNI/AVX2 CPUs) calibrated on ``calib``.

    The final 1x1 convs of the head and everything after them stay float: their output mixes
    probabilities (0..1) and DFL logits, which one 8-bit scale cannot hold.
    """
    import onnx  # optional heavy dependency: only when exporting
    from onnxruntime.quantization import (  # optional heavy dependency: only for INT8
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"images": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process  # heavy, only for INT8

    root = logging.getLogger()  # onnxruntime.quantization warns through the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with staging(Path(out_path).parent) as tmp:
            # shape inference + graph optimisation first, as onnxruntime recommends for static quantization
            pre, staged = tmp / "pre.onnx", tmp / "int8.onnx"
            quant_pre_process(str(fp32_path), str(pre))
            quantize_static(str(pre), str(staged), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=nodes_after(onnx.load(str(pre)), "gfl_cls"))
            model = onnx.load(str(staged))
            set_metadata(model, {**(meta or {}), "quantization": "int8 static QDQ, per-channel weights"})
            atomic_write(out_path, model.SerializeToString())
    finally:
        root.setLevel(level)
    return Path(out_path)


def nodes_after(model, name_part: str) -> list[str]:
    """Names of the nodes whose name contains ``name_part`` and of every node downstream of them."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    todo = [n for n in model.graph.node if name_part in n.name]
    seen: set[str] = set()
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        for out in node.output:
            todo += consumers.get(out, [])
    return sorted(seen)
