"""`python -m pipeline.bench {infer,data,assign,train,peak}`: measurements printed as JSON (not a test).

* infer  : latency p50/p90 at batch 1 and throughput at batch N for eager PyTorch, onnxruntime fp32 and
           onnxruntime INT8 (static QDQ, calibrated on random inputs: speed only), params and FLOPs.
* data   : training input pipeline throughput (pipeline.data.loader.bench_data; needs prepared data).
* assign : batched Dynamic Soft Label Assigner vs the per-image reference (pipeline.model.assigner).
* train  : timed training steps (model with aux head; synthetic batches or ``--data loader``) split into
           data / forward / assign / loss / backward / optimizer, with ``--amp``, ``--channels-last`` and
           ``--compile`` as in training; training FLOPs per image, achieved FLOP/s vs the measured peak
           (pipeline.bench_train).
* peak   : achievable FLOP/s of a large matmul and a 3x3 conv in fp32 and bf16 (the roofline for the above).

The model config is composed like everywhere else: ``--set experiment=nanodet_plus_m_320 ...`` (Hydra
overrides). Weights are random: latency does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def latency_stats(fn: Callable[[], Any], warmup: int = 3, iters: int = 20) -> dict[str, float]:
    """Wall-clock milliseconds of ``fn()``: p50, p90 and mean over ``iters`` runs after ``warmup``."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        runs = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(runs, 50)), "p90_ms": float(np.percentile(runs, 90)),
            "mean_ms": float(np.mean(runs)), "iters": iters}


def _machine(threads: int) -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def _throughput(fn: Callable[[], Any], batch: int, iters: int) -> float:
    stats = latency_stats(fn, warmup=1, iters=iters)
    return batch / (stats["mean_ms"] / 1e3)


# --------------------------------------------------------------------------------------- infer
def bench_infer(cfg, batch: int, iters: int, int8: bool, threads: int) -> dict[str, Any]:
    from pipeline.config import to_dict
    from pipeline.export import ExportModule, build_metadata, export_onnx, quantize_int8, write_metadata
    from pipeline.model import build_model
    from pipeline.model.summary import summarize
    from pipeline.runtime import OnnxDetector, Preprocessing

    torch.manual_seed(0)
    w, h = (int(v) for v in cfg.data.input_size)
    model = build_model(cfg.model, with_aux=False).eval()
    report: dict[str, Any] = {"machine": _machine(threads), "input_size": [w, h],
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


# ---------------------------------------------------------------------------------------- main
def _optional(module: str, name: str) -> Callable[..., dict]:
    import importlib

    fn = getattr(importlib.import_module(module), name, None)
    if fn is None:
        raise SystemExit(f"error: {module}.{name} is not available in this version")
    return fn


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["infer", "data", "assign", "train", "peak"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. experiment=nanodet_plus_m_320")
    parser.add_argument("--batch", type=int, default=16, help="infer: throughput batch; assign: batch")
    parser.add_argument("--train-batches", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--num-gt", type=int, nargs="*", default=[0, 1, 10, 50, 100],
                        help="assign: ground-truth boxes per image, one measurement each")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch/onnxruntime threads (default: torch's)")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--device", default="cpu", help="assign/peak: cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "auto"],
                        help="train: autocast mode, as train.amp")
    parser.add_argument("--channels-last", action="store_true", help="train: as train.channels_last=true")
    parser.add_argument("--compile", action="store_true", help="train: as train.compile=true")
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "loader"],
                        help="train: synthetic batches, or the real training loader (needs prepared data)")
    parser.add_argument("--no-peak", action="store_true", help="train: skip the peak FLOP/s measurement")
    args = parser.parse_args(argv)
    from pipeline.config import ConfigError, compose

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    try:
        cfg = compose(list(args.set))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.what == "infer":
        result = bench_infer(cfg, args.batch, args.iters, not args.no_int8, threads)
    elif args.what == "data":
        result = _optional("pipeline.data.loader", "bench_data")(cfg)
    elif args.what == "assign":
        w, h = cfg.data.input_size
        bench_assign = _optional("pipeline.model.assigner", "bench_assign")
        result = {"machine": _machine(threads), "by_num_gt": [
            bench_assign(batch=args.batch, num_gt=num_gt, input_hw=(int(h), int(w)),
                         strides=tuple(cfg.model.head.strides), num_classes=int(cfg.model.num_classes),
                         device=args.device)
            for num_gt in args.num_gt]}
    elif args.what == "train":
        from pipeline.bench_train import bench_train

        result = bench_train(list(args.set), args.train_batches, max(1, args.iters), args.amp, args.channels_last,
                             args.compile, args.data, args.device, with_peak=not args.no_peak)
    else:
        from pipeline.bench_train import bench_peak

        result = {"machine": _machine(threads), **bench_peak(args.device, max(1, args.iters))}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
