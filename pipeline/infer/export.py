"""ONNX export of the inference model (no aux branch), verified (``python -m pipeline.export`` runs
:func:`export_model`).

Layouts (export.decode_in_graph):
* raw (default, like the official export): one output ``output [B, N, C + 4(R+1)]`` = sigmoid class
  scores followed by the raw DFL logits (left, top, right, bottom x R+1 bins); decode with priors
  ``(col*s, row*s)``, softmax + expectation per side times the stride, then NMS (pipeline.model.decode).
* decoded: ``scores [B, N, C]`` and ``boxes [B, N, 4]`` xyxy in network-input pixels (NMS left to the user).

Input ``images [B, 3, H, W]`` float32 BGR, ``(pixel - mean) / std``, batch axis dynamic. The dummy input
is built as ``[1, 3, h, w]`` from the config's ``[w, h]`` (the official script swapped them, issue #574).
Everything needed to run the file is in ``metadata_props`` (see :func:`build_metadata`).

Verification (fails the stage): onnxruntime vs PyTorch on real validation images (max |diff| <= export.atol)
and the ONNX mAP on the val split within export.map_tolerance of the PyTorch mAP. Optional INT8 static
quantization (QDQ, per-channel) reports its mAP drop and speed-up, and fails the stage when its mAP is more
than export.int8_max_map_drop below the fp32 ONNX mAP: the rejected model.int8.onnx is deleted (no file
that looks usable is left behind), the verified fp32 model.onnx stays, export.json records the numbers.

Writes to <export.out_dir>: model.onnx, model.int8.onnx (optional), export.json (every detail: parity,
both mAPs, latency, INT8 numbers; written even when a check fails, to show why) and, last and only when
every check passed, metrics.json (the headline numbers for `dvc metrics show`, see :data:`HEADLINE`).
A metrics.json or model.int8.onnx left by an earlier run is removed first, so neither describes a failed one.
"""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Config, config_hash
from pipeline.data.transforms import read_image
from pipeline.errors import UserError
from pipeline.infer import evaluate as evaluation  # module access: tests replace its functions
from pipeline.infer.runtime import OnnxDetector, Preprocessing, TorchDetector, preprocess_batch
from pipeline.io import atomic_write
from pipeline.logging import get_logger
from pipeline.model.decode import decode_for_export, num_bins, priors_for
from pipeline.perf import latency_stats

log = get_logger("pipeline.export")


class ExportError(UserError, RuntimeError):
    """The exported model does not match PyTorch (or could not be written); the message says by how much."""


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


def export_onnx(module: ExportModule, path: str | Path, opset: int = 17, dynamic_batch: bool = True) -> Path:
    """Trace ``module`` to ``path`` with a ``[1, 3, H, W]`` dummy; static H, W; optional dynamic batch.

    The TorchScript-based exporter is used (dynamo=False): it writes the requested opset exactly,
    while the dynamo exporter's down-conversion to opset 17 produced an invalid Split node here, and it
    takes ~0.5 s instead of ~10 s.
    """
    import onnx  # optional heavy dependency: only when exporting

    if opset < 17:
        raise ExportError(f"export.opset={opset}: opset >= 17 is required")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    height, width = module.input_hw
    dummy = torch.zeros(1, 3, height, width)
    names = output_names(module.decode_in_graph)
    axes = {n: {0: "batch"} for n in ["images", *names]} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer / deprecation chatter about the exporter choice
        torch.onnx.export(module, (dummy,), str(path), input_names=["images"], output_names=names,
                          opset_version=opset, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(path))
    num_points = int(module.priors.shape[0])
    widths = [module.num_classes, 4] if module.decode_in_graph else [module.num_classes + num_bins(module.reg_max)]
    for out, last in zip(model.graph.output, widths):  # the tracer leaves N and C symbolic; they are fixed
        dims = out.type.tensor_type.shape.dim
        dims[1].dim_value, dims[2].dim_value = num_points, last
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
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
        "outputs": outputs,
        "score_thr": str(thresholds["score_thr"]),
        "iou_thr": str(thresholds["iou_thr"]),
        "max_dets": str(thresholds["max_dets"]),
        "package_version": package_version(),
        "config_hash": config_hash(model_cfg),
        "config": json.dumps(model_cfg, sort_keys=True),
    }


def write_metadata(path: str | Path, meta: dict[str, str]) -> None:
    import onnx  # optional heavy dependency: only when exporting

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "nanodet-pipeline", meta.get("package_version", "")
    onnx.save(model, str(path))


# ---------------------------------------------------------------------------------- verification
def max_abs_diff(torch_out: Any, onnx_out: Any) -> float:
    """Largest |difference| over all outputs (tensors or tuples of them)."""
    t = torch_out if isinstance(torch_out, tuple) else (torch_out,)
    o = onnx_out if isinstance(onnx_out, tuple) else (onnx_out,)
    return max(float(np.abs(a.detach().cpu().numpy() - np.asarray(b)).max()) for a, b in zip(t, o))


def load_images(json_path: Path, count: int, seed: int | None = None) -> list[np.ndarray]:
    """``count`` BGR images of a prepared split (the first ones by id, or a seeded sample)."""
    records = evaluation.image_records(json.loads(json_path.read_text()), json_path.parent)
    if seed is not None and len(records) > count:
        idx = np.random.default_rng(seed).choice(len(records), count, replace=False)
        records = [records[i] for i in sorted(idx)]
    return [read_image(p) for _, p in records[:count]]


def check_parity(module: ExportModule, onnx_det: OnnxDetector, images: np.ndarray, atol: float) -> float:
    with torch.no_grad():
        ref = module(torch.from_numpy(images))
    diff = max_abs_diff(ref, onnx_det.forward(images))
    if not diff <= atol:
        raise ExportError(f"onnxruntime output differs from PyTorch by {diff:.3g} (> export.atol={atol}) on "
                          f"{len(images)} validation images; the export of {onnx_det.path} is not faithful")
    return diff


def export_model(cfg: Config) -> dict[str, Any]:
    """Export ``export.checkpoint``, verify it, optionally quantize; returns the export.json dict.

    Raises ExportError when a check fails (after writing export.json; metrics.json is then absent).
    """
    e = cfg.export
    out_dir = Path(e.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the old headline and INT8 model must not describe the new export if this run fails
    for stale in ("metrics.json", "model.int8.onnx"):
        (out_dir / stale).unlink(missing_ok=True)
    torch_det = TorchDetector(e.checkpoint, device="cpu", input_size=cfg.data.input_size)
    pre = torch_det.preprocessing
    module = ExportModule(torch_det.model, pre.input_hw, e.decode_in_graph)
    onnx_path = export_onnx(module, out_dir / "model.onnx", e.opset, e.dynamic_batch)
    thresholds = {"score_thr": cfg.eval.score_thr, "iou_thr": cfg.eval.iou_thr, "max_dets": cfg.eval.max_dets}
    val_json = evaluation.split_json(cfg, "val")
    class_names = [c["name"] for c in sorted(json.loads(val_json.read_text())["categories"], key=lambda c: c["id"])]
    if len(class_names) != torch_det.num_classes:
        raise ExportError(f"{e.checkpoint} predicts {torch_det.num_classes} classes but {val_json} has "
                          f"{len(class_names)}; export needs the data the model was trained for (to verify it)")
    meta = build_metadata(torch_det.config_dict(), class_names, pre, torch_det.strides, torch_det.reg_max,
                          e.decode_in_graph, thresholds)
    write_metadata(onnx_path, meta)
    onnx_det = OnnxDetector(onnx_path, threads=torch.get_num_threads())
    images, _ = preprocess_batch(onnx_det, load_images(val_json, e.verify_images))
    diff = check_parity(module, onnx_det, images, e.atol)
    log.info("parity: max |onnxruntime - torch| = %.3g on %d images (atol %g)", diff, len(images), e.atol)
    map_torch = evaluation.evaluate_detector(torch_det, cfg)["mAP"]
    map_onnx = evaluation.evaluate_detector(onnx_det, cfg)["mAP"]
    report: dict[str, Any] = {
        "onnx": str(onnx_path), "layout": meta["layout"], "opset": e.opset, "input_size": list(pre.input_size),
        "dynamic_batch": e.dynamic_batch, "size_bytes": onnx_path.stat().st_size, "verify_images": len(images),
        "max_abs_diff": diff, "atol": e.atol, "map_torch": map_torch, "map_onnx": map_onnx,
        "map_diff": abs(map_torch - map_onnx), "map_tolerance": e.map_tolerance,
    }
    one = images[:1]
    report["latency_ms"] = {"torch": latency_stats(lambda: module(torch.from_numpy(one))),
                            "onnxruntime": latency_stats(lambda: onnx_det.forward(one))}
    int8_error = None
    if e.int8:
        report["int8"] = export_int8(onnx_path, meta, cfg, map_onnx, one, report["latency_ms"])
        int8_error = check_int8_drop(report["int8"], map_onnx, e.int8_max_map_drop, onnx_path)
    atomic_write(out_dir / "export.json", json.dumps(report, indent=2))
    if not report["map_diff"] <= e.map_tolerance:
        raise ExportError(f"ONNX mAP {map_onnx:.4f} differs from PyTorch mAP {map_torch:.4f} by "
                          f"{report['map_diff']:.4f} (> export.map_tolerance={e.map_tolerance}); see {out_dir}/export.json")
    if int8_error:
        raise ExportError(int8_error)
    atomic_write(out_dir / "metrics.json", json.dumps(headline(report), indent=2))  # last: every check passed
    log.info("exported %s: mAP torch %.4f onnx %.4f", onnx_path, map_torch, map_onnx)
    return report


# The numbers `dvc metrics show` prints for the export stage (runs/export/metrics.json); the rest of the
# report (latency percentiles, sizes, settings) stays in export.json, which DVC does not read as a metric.
HEADLINE = ("map_torch", "map_onnx", "map_diff", "max_abs_diff", "onnxruntime_p50_ms",
            "int8_map", "int8_map_drop", "int8_speedup_vs_fp32")


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The flat headline numbers of an export report (the INT8 ones only when INT8 was exported)."""
    flat = {k: report[k] for k in ("map_torch", "map_onnx", "map_diff", "max_abs_diff")}
    flat["onnxruntime_p50_ms"] = report["latency_ms"]["onnxruntime"]["p50_ms"]
    if "int8" in report:
        q = report["int8"]
        flat.update(int8_map=q["map"], int8_map_drop=q["map_drop"], int8_speedup_vs_fp32=q["speedup_vs_fp32"])
    return {k: float(flat[k]) for k in HEADLINE if k in flat}


def check_int8_drop(int8: dict[str, Any], map_fp32: float, max_drop: float, fp32_path: Path) -> str | None:
    """None when the INT8 mAP is within ``max_drop`` of ``map_fp32``; otherwise delete the INT8 file, mark
    the report (``int8["rejected"]``) and return the error message for the stage to raise."""
    drop = int8["map_drop"]
    int8["max_map_drop"] = max_drop
    # 1e-9: a drop equal to the bound passes even when the subtraction rounds a hair above it
    if drop <= max_drop + 1e-9:
        int8["rejected"] = False
        return None
    int8_path = Path(int8["path"])
    int8_path.unlink(missing_ok=True)
    int8["rejected"], int8["path"] = True, None
    return (f"INT8 mAP {int8['map']:.4f} is {drop:.4f} below the fp32 ONNX mAP {map_fp32:.4f}, more than "
            f"export.int8_max_map_drop={max_drop}; the INT8 model was deleted ({int8_path}), the verified fp32 "
            f"model {fp32_path} is kept. Calibrate on more images (export.calib_images), allow a larger drop "
            "(export.int8_max_map_drop) or export without INT8 (export.int8=false)")


# ------------------------------------------------------------------------------------------- INT8
def quantize_int8(fp32_path: Path, out_path: Path, calib: np.ndarray) -> Path:
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
        with tempfile.TemporaryDirectory() as tmp:
            # shape inference + graph optimisation first, as onnxruntime recommends for static quantization
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(fp32_path), str(pre))
            quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=nodes_after(onnx.load(str(pre)), "gfl_cls"))
    finally:
        root.setLevel(level)
    return out_path


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


def export_int8(onnx_path: Path, meta: dict[str, str], cfg: Config, map_fp32: float, one: np.ndarray,
                latency: dict) -> dict[str, Any]:
    calib_det = OnnxDetector(onnx_path)
    calib, _ = preprocess_batch(calib_det, load_images(evaluation.split_json(cfg, "train"), cfg.export.calib_images, seed=0))
    int8_path = quantize_int8(onnx_path, onnx_path.with_name("model.int8.onnx"), calib)
    write_metadata(int8_path, {**meta, "quantization": "int8 static QDQ, per-channel weights"})
    det = OnnxDetector(int8_path, threads=torch.get_num_threads())
    map_int8 = evaluation.evaluate_detector(det, cfg)["mAP"]
    latency["onnxruntime_int8"] = latency_stats(lambda: det.forward(one))
    speedup = latency["onnxruntime"]["p50_ms"] / latency["onnxruntime_int8"]["p50_ms"]
    log.info("int8: mAP %.4f (drop %.4f), %.2fx faster than fp32 onnxruntime", map_int8, map_fp32 - map_int8, speedup)
    return {"path": str(int8_path), "map": map_int8, "map_drop": map_fp32 - map_int8, "speedup_vs_fp32": speedup,
            "calib_images": len(calib), "size_bytes": int8_path.stat().st_size}
