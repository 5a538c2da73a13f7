"""The inference and machine benchmarks behind ``python -m pipeline.bench infer`` (the command, its options
and what each benchmark reports are described in :mod:`pipeline.bench`); the training benchmark lives in
:mod:`pipeline.tools.bench_train`. Weights are random: latency does not depend on them."""
from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import to_dict
from pipeline.infer.export import ExportModule, build_metadata, export_onnx, quantize_int8, write_metadata
from pipeline.infer.runtime import OnnxDetector, Preprocessing
from pipeline.model import build_model
from pipeline.model.summary import summarize
from pipeline.perf import latency_stats


def machine(threads: int) -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def _throughput(fn: Callable[[], Any], batch: int, iters: int) -> float:
    stats = latency_stats(fn, warmup=1, iters=iters)
    return batch / (stats["mean_ms"] / 1e3)


# --------------------------------------------------------------------------------------- infer
def bench_infer(cfg, batch: int, iters: int, int8: bool, threads: int) -> dict[str, Any]:
    torch.manual_seed(0)
    w, h = (int(v) for v in cfg.data.input_size)
    model = build_model(cfg.model, with_aux=False, load_pretrained=False).eval()  # speed, not accuracy
    report: dict[str, Any] = {"machine": machine(threads), "input_size": [w, h],
                              "backbone": cfg.model.backbone.size, "batch_throughput": batch}
    report["model"] = {k: v for k, v in summarize(model, (h, w)).items()
                       if k in ("params_inference", "params_inference_conv", "flops_inference", "num_priors")}
    one, many = torch.randn(1, 3, h, w), torch.randn(batch, 3, h, w)
    report["torch_eager"] = {"batch1": latency_stats(lambda: model(one), iters=iters),
                             "throughput_images_per_s": _throughput(lambda: model(many), batch, max(3, iters // 5))}
    module = ExportModule(model, (h, w), decode_in_graph=False)
    pre = Preprocessing((w, h), bool(cfg.data.keep_ratio), tuple(cfg.data.mean), tuple(cfg.data.std))
    meta = build_metadata(to_dict(cfg), [f"class{i}" for i in range(model.num_classes)], pre,
                          model.strides, model.reg_max, False, {"score_thr": 0.05, "iou_thr": 0.6, "max_dets": 100})
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"onnxruntime_fp32": export_onnx(module, Path(tmp) / "model.onnx")}
        write_metadata(paths["onnxruntime_fp32"], meta)
        if int8:
            calib = np.random.default_rng(0).standard_normal((8, 3, h, w)).astype(np.float32)
            paths["onnxruntime_int8"] = quantize_int8(paths["onnxruntime_fp32"], Path(tmp) / "model.int8.onnx", calib)
            write_metadata(paths["onnxruntime_int8"], meta)
        for name, path in paths.items():
            report[name] = _bench_onnx(OnnxDetector(path, threads=threads), one.numpy(), many.numpy(), iters)
            report[name]["size_bytes"] = path.stat().st_size
    base = report["torch_eager"]["batch1"]["p50_ms"]
    report["speedup_vs_eager_batch1"] = {k: base / report[k]["batch1"]["p50_ms"] for k in paths}
    return report


def _bench_onnx(det, one: np.ndarray, many: np.ndarray, iters: int) -> dict[str, Any]:
    return {"batch1": latency_stats(lambda: det.forward(one), iters=iters),
            "throughput_images_per_s": _throughput(lambda: det.forward(many), len(many), max(3, iters // 5))}
