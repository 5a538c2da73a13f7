"""The export stage (``python -m pipeline.export`` runs :func:`export_model`): ONNX always, plus OpenVINO,
NCNN and MNN when listed in ``export.formats``, each verified against PyTorch; optional INT8.

Converters live in :mod:`pipeline.infer.exporters` (one module per format; the layouts and the metadata
dictionary in :mod:`pipeline.infer.exporters.onnx_export`); the runtimes in :mod:`pipeline.infer.runtime`.

Verification of every model (fails the stage): its runtime vs PyTorch on real validation images (max |diff|
<= export.atol) and its mAP on the val split within export.map_tolerance of the PyTorch mAP. A rejected model
is deleted (no file that looks usable is left behind); the verified ONNX model stays. INT8 (export.int8):
onnxruntime static QDQ, and OpenVINO through NNCF when openvino is selected, each calibrated on real
training images and rejected (deleted, stage fails) when its mAP is more than export.int8_max_map_drop below
its own fp32 model's mAP.

Writes to <export.out_dir>: model.onnx, model.int8.onnx (optional); under deploy/: model.openvino.xml/.bin,
model.int8.openvino.xml/.bin, model.ncnn.param/.bin + model.ncnn.param.json, model.mnn + model.mnn.json
(those selected); export.json (every detail, written even when a check fails, to show why) and, last and
only when every check passed, metrics.json (the headline numbers for `dvc metrics show`, see
:data:`HEADLINE`). Files of an earlier run that this one would rewrite are removed first.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.transforms import read_image
from pipeline.infer import evaluate as evaluation  # module access: tests replace its functions
from pipeline.infer.exporters.common import ExportError, remove_model
from pipeline.infer.exporters.mnn_export import mnn_files, to_mnn
from pipeline.infer.exporters.ncnn_export import ncnn_files, to_ncnn
from pipeline.infer.exporters.onnx_export import ExportModule, build_metadata, export_onnx, quantize_int8
from pipeline.infer.exporters.openvino_export import ir_files, quantize_openvino, to_openvino
from pipeline.infer.runtime import (
    Detector,
    InferenceError,
    OnnxDetector,
    TorchDetector,
    load_detector,
    preprocess_batch,
)
from pipeline.io import atomic_write
from pipeline.logging import get_logger
from pipeline.perf import latency_stats

__all__ = ["HEADLINE", "ExportError", "check_int8_drop", "check_parity", "export_model", "headline"]

log = get_logger("pipeline.export")

DEPLOY_DIR = "deploy"
# format -> (file name under deploy/, its files: the named one last)
DEPLOY_FILES: dict[str, tuple[str, Callable[[Path], list[Path]]]] = {
    "openvino": ("model.openvino.xml", ir_files), "ncnn": ("model.ncnn.param", ncnn_files),
    "mnn": ("model.mnn", mnn_files), "openvino_int8": ("model.int8.openvino.xml", ir_files),
}


# ---------------------------------------------------------------------------------- verification
def max_abs_diff(torch_out: Any, other_out: Any) -> float:
    """Largest |difference| over all outputs (tensors or tuples of them)."""
    t = torch_out if isinstance(torch_out, tuple) else (torch_out,)
    o = other_out if isinstance(other_out, tuple) else (other_out,)
    return max(float(np.abs(a.detach().cpu().numpy() - np.asarray(b)).max()) for a, b in zip(t, o))


def load_images(json_path: Path, count: int, seed: int | None = None) -> list[np.ndarray]:
    """``count`` BGR images of a prepared split (the first ones by id, or a seeded sample)."""
    records = evaluation.image_records(json.loads(json_path.read_text()), json_path.parent)
    if seed is not None and len(records) > count:
        idx = np.random.default_rng(seed).choice(len(records), count, replace=False)
        records = [records[i] for i in sorted(idx)]
    return [read_image(p) for _, p in records[:count]]


def check_parity(module: ExportModule, det: Detector, images: np.ndarray, atol: float) -> float:
    """max |runtime - PyTorch| over ``images`` [B, 3, H, W]; an ExportError naming the runtime above ``atol``."""
    with torch.no_grad():
        ref = module(torch.from_numpy(images))
    diff = max_abs_diff(ref, det.forward(images))
    if not diff <= atol:
        raise ExportError(f"{det.backend} output differs from PyTorch by {diff:.3g} (> export.atol={atol}) on "
                          f"{len(images)} validation images; the export of {det.path} is not faithful")
    return diff


def check_map(name: str, map_model: float, map_torch: float, tolerance: float) -> None:
    diff = abs(map_torch - map_model)
    if not diff <= tolerance:
        raise ExportError(f"{name} mAP {map_model:.4f} differs from PyTorch mAP {map_torch:.4f} by {diff:.4f} "
                          f"(> export.map_tolerance={tolerance})")


def check_int8_drop(int8: dict[str, Any], map_fp32: float, max_drop: float, fp32_path: Path,
                    fmt: str = "ONNX") -> str | None:
    """None when the INT8 mAP is within ``max_drop`` of ``map_fp32``; otherwise delete the INT8 files, mark
    the report (``int8["rejected"]``) and return the error message for the stage to raise."""
    drop = int8["map_drop"]
    int8["max_map_drop"] = max_drop
    # 1e-9: a drop equal to the bound passes even when the subtraction rounds a hair above it
    if drop <= max_drop + 1e-9:
        int8["rejected"] = False
        return None
    int8_path = Path(int8["path"])
    remove_model(ir_files(int8_path) if int8_path.suffix == ".xml" else [int8_path])
    int8["rejected"], int8["path"] = True, None
    return (f"INT8 mAP {int8['map']:.4f} is {drop:.4f} below the fp32 {fmt} mAP {map_fp32:.4f}, more than "
            f"export.int8_max_map_drop={max_drop}; the INT8 model was deleted ({int8_path}), the verified fp32 "
            f"model {fp32_path} is kept. Calibrate on more images (export.calib_images), allow a larger drop "
            "(export.int8_max_map_drop) or export without INT8 (export.int8=false)")


# --------------------------------------------------------------------------------------- the stage
def _remove_stale(out_dir: Path) -> None:
    """The old headline, INT8 model and deploy formats must not describe the new export if this run fails."""
    for stale in ("metrics.json", "model.int8.onnx"):
        (out_dir / stale).unlink(missing_ok=True)
    for name, files in DEPLOY_FILES.values():
        remove_model(files(out_dir / DEPLOY_DIR / name))


def export_model(cfg: Config) -> dict[str, Any]:
    """Export ``export.checkpoint`` to every format of export.formats, verify each, optionally quantize;
    returns the export.json dict. Raises ExportError when a check fails (after writing export.json;
    metrics.json is then absent)."""
    e = cfg.export
    out_dir = Path(e.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_dir)
    (out_dir / DEPLOY_DIR).mkdir(exist_ok=True)  # a DVC output of the stage, empty unless export.formats asks
    torch_det = TorchDetector(e.checkpoint, device="cpu", input_size=cfg.data.input_size)
    pre = torch_det.preprocessing
    module = ExportModule(torch_det.model, pre.input_hw, e.decode_in_graph)
    thresholds = {"score_thr": cfg.eval.score_thr, "iou_thr": cfg.eval.iou_thr, "max_dets": cfg.eval.max_dets}
    val_json = evaluation.split_json(cfg, "val")
    class_names = [c["name"] for c in sorted(json.loads(val_json.read_text())["categories"], key=lambda c: c["id"])]
    if len(class_names) != torch_det.num_classes:
        raise ExportError(f"{e.checkpoint} predicts {torch_det.num_classes} classes but {val_json} has "
                          f"{len(class_names)}; export needs the data the model was trained for (to verify it)")
    meta = build_metadata(torch_det.config_dict(), class_names, pre, torch_det.strides, torch_det.reg_max,
                          e.decode_in_graph, thresholds)
    onnx_path = export_onnx(module, out_dir / "model.onnx", e.opset, e.dynamic_batch, meta)
    threads = torch.get_num_threads()
    onnx_det = OnnxDetector(onnx_path, threads=threads)
    images, _ = preprocess_batch(onnx_det, load_images(val_json, e.verify_images))
    diff = check_parity(module, onnx_det, images, e.atol)
    log.info("parity: max |onnxruntime - torch| = %.3g on %d images (atol %g)", diff, len(images), e.atol)
    map_torch = evaluation.evaluate_detector(torch_det, cfg)["mAP"]
    map_onnx = evaluation.evaluate_detector(onnx_det, cfg)["mAP"]
    report: dict[str, Any] = {
        "onnx": str(onnx_path), "layout": meta["layout"], "opset": e.opset, "input_size": list(pre.input_size),
        "dynamic_batch": e.dynamic_batch, "size_bytes": onnx_path.stat().st_size, "verify_images": len(images),
        "max_abs_diff": diff, "atol": e.atol, "map_torch": map_torch, "map_onnx": map_onnx,
        "map_diff": abs(map_torch - map_onnx), "map_tolerance": e.map_tolerance, "formats": {},
    }
    one = images[:1]
    report["latency_ms"] = {"torch": latency_stats(lambda: module(torch.from_numpy(one))),
                            "onnxruntime": latency_stats(lambda: onnx_det.forward(one))}
    errors: list[str] = []
    calib = calibration_images(cfg, onnx_det) if e.int8 else None
    if e.int8:
        report["int8"] = export_int8(onnx_path, meta, cfg, map_onnx, one, report["latency_ms"], calib)
        errors.append(check_int8_drop(report["int8"], map_onnx, e.int8_max_map_drop, onnx_path) or "")
    for fmt in (f for f in e.formats if f != "onnx"):
        entry = report["formats"][fmt] = {}
        try:
            export_deploy(fmt, onnx_path, out_dir / DEPLOY_DIR, meta, module, images, map_torch, cfg, entry,
                          report["latency_ms"])
            if fmt == "openvino" and e.int8:
                entry["int8"] = export_openvino_int8(Path(entry["path"]), meta, cfg, entry["map"], one, calib,
                                                     report["latency_ms"])
                errors.append(check_int8_drop(entry["int8"], entry["map"], e.int8_max_map_drop,
                                              Path(entry["path"]), "OpenVINO") or "")
        except ExportError as err:
            entry["error"] = str(err)
            errors.append(str(err))
    atomic_write(out_dir / "export.json", json.dumps(report, indent=2))
    try:
        check_map("ONNX", map_onnx, map_torch, e.map_tolerance)
    except ExportError as err:
        raise ExportError(f"{err}; see {out_dir}/export.json") from None
    errors = [m for m in errors if m]
    if errors:
        raise ExportError(" | ".join(errors) + f" (details: {out_dir}/export.json)")
    atomic_write(out_dir / "metrics.json", json.dumps(headline(report), indent=2))  # last: every check passed
    log.info("exported %s (+ %s): mAP torch %.4f onnx %.4f", onnx_path, [f for f in e.formats if f != "onnx"],
             map_torch, map_onnx)
    return report


def export_deploy(fmt: str, onnx_path: Path, deploy_dir: Path, meta: dict[str, str], module: ExportModule,
                  images: np.ndarray, map_torch: float, cfg: Config, entry: dict[str, Any], latency: dict) -> None:
    """Convert the verified ONNX model to ``fmt``, then verify it like the ONNX one (fills ``entry``); on any
    failure the converted files are deleted and an ExportError names the format and what to do."""
    name, files = DEPLOY_FILES[fmt]
    dest = deploy_dir / name
    hw = module.input_hw
    convert = {"openvino": lambda: to_openvino(onnx_path, dest, meta), "ncnn": lambda: to_ncnn(onnx_path, dest, meta, hw),
               "mnn": lambda: to_mnn(onnx_path, dest, meta)}[fmt]
    try:
        convert()
        det = load_detector(dest, threads=torch.get_num_threads())
        entry.update(path=str(dest), size_bytes=sum(p.stat().st_size for p in files(dest) if p.suffix != ".json"))
        entry["max_abs_diff"] = check_parity(module, det, images, cfg.export.atol)
        entry["map"] = evaluation.evaluate_detector(det, cfg)["mAP"]
        entry["map_diff"] = abs(entry["map"] - map_torch)
        check_map(fmt, entry["map"], map_torch, cfg.export.map_tolerance)
        latency[det.backend] = latency_stats(lambda: det.forward(images[:1]))
        log.info("%s: max |diff| %.3g, mAP %.4f", fmt, entry["max_abs_diff"], entry["map"])
    except (ExportError, InferenceError) as err:
        remove_model(files(dest))
        entry.pop("path", None)
        raise ExportError(f"export to {fmt} failed: {err}. The {fmt} model was deleted; the verified ONNX model "
                          f"{onnx_path} is kept. Drop {fmt} from export.formats to export the others") from None


# ------------------------------------------------------------------------------------------- INT8
def calibration_images(cfg: Config, det: Detector) -> np.ndarray:
    """``export.calib_images`` real training images (a seeded sample), preprocessed: [B, 3, H, W]."""
    calib, _ = preprocess_batch(det, load_images(evaluation.split_json(cfg, "train"), cfg.export.calib_images, seed=0))
    return calib


def _int8_entry(path: Path, det: Detector, cfg: Config, map_fp32: float, one: np.ndarray, latency: dict,
                fp32_key: str, calib: np.ndarray) -> dict[str, Any]:
    map_int8 = evaluation.evaluate_detector(det, cfg)["mAP"]
    latency[f"{fp32_key}_int8"] = latency_stats(lambda: det.forward(one))
    speedup = latency[fp32_key]["p50_ms"] / latency[f"{fp32_key}_int8"]["p50_ms"]
    log.info("%s int8: mAP %.4f (drop %.4f), %.2fx faster than fp32", fp32_key, map_int8, map_fp32 - map_int8, speedup)
    return {"path": str(path), "map": map_int8, "map_drop": map_fp32 - map_int8, "speedup_vs_fp32": speedup,
            "calib_images": len(calib), "size_bytes": path.stat().st_size}


def export_int8(onnx_path: Path, meta: dict[str, str], cfg: Config, map_fp32: float, one: np.ndarray,
                latency: dict, calib: np.ndarray) -> dict[str, Any]:
    int8_path = quantize_int8(onnx_path, onnx_path.with_name("model.int8.onnx"), calib, meta)
    det = OnnxDetector(int8_path, threads=torch.get_num_threads())
    return _int8_entry(int8_path, det, cfg, map_fp32, one, latency, "onnxruntime", calib)


def export_openvino_int8(fp32_xml: Path, meta: dict[str, str], cfg: Config, map_fp32: float, one: np.ndarray,
                         calib: np.ndarray, latency: dict) -> dict[str, Any]:
    dest = fp32_xml.with_name(DEPLOY_FILES["openvino_int8"][0])
    try:
        quantize_openvino(fp32_xml, dest, [calib[i:i + 1] for i in range(len(calib))], meta)
        det = load_detector(dest, threads=torch.get_num_threads())
        entry = _int8_entry(dest, det, cfg, map_fp32, one, latency, "openvino", calib)
    except (ExportError, InferenceError) as err:
        remove_model(ir_files(dest))
        raise ExportError(f"OpenVINO INT8: {err}") from None
    entry["size_bytes"] = sum(p.stat().st_size for p in ir_files(dest))
    return entry


# The numbers `dvc metrics show` prints for the export stage (runs/export/metrics.json); the rest of the
# report (latency percentiles, sizes, settings) stays in export.json, which DVC does not read as a metric.
HEADLINE = ("map_torch", "map_onnx", "map_diff", "max_abs_diff", "onnxruntime_p50_ms",
            "int8_map", "int8_map_drop", "int8_speedup_vs_fp32",
            "openvino_map", "openvino_max_abs_diff", "openvino_p50_ms", "openvino_int8_map", "openvino_int8_map_drop",
            "ncnn_map", "ncnn_max_abs_diff", "ncnn_p50_ms", "mnn_map", "mnn_max_abs_diff", "mnn_p50_ms")


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The flat headline numbers of an export report (INT8 and the other formats only when exported)."""
    flat = {k: report[k] for k in ("map_torch", "map_onnx", "map_diff", "max_abs_diff")}
    flat["onnxruntime_p50_ms"] = report["latency_ms"]["onnxruntime"]["p50_ms"]
    if "int8" in report:
        q = report["int8"]
        flat.update(int8_map=q["map"], int8_map_drop=q["map_drop"], int8_speedup_vs_fp32=q["speedup_vs_fp32"])
    for fmt, entry in report.get("formats", {}).items():
        flat.update({f"{fmt}_map": entry["map"], f"{fmt}_max_abs_diff": entry["max_abs_diff"],
                     f"{fmt}_p50_ms": report["latency_ms"][fmt]["p50_ms"]})
        if "int8" in entry:
            flat.update({f"{fmt}_int8_map": entry["int8"]["map"], f"{fmt}_int8_map_drop": entry["int8"]["map_drop"]})
    return {k: float(flat[k]) for k in HEADLINE if k in flat}
