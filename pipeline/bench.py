"""`python -m pipeline.bench {infer,data,assign,train,peak}`: measurements printed as JSON (not a test).

* infer  : latency p50/p90 at batch 1 and throughput at batch N for eager PyTorch, onnxruntime fp32 and
           onnxruntime INT8 (static QDQ, calibrated on random inputs: speed only), params and FLOPs.
* data   : training input pipeline throughput (pipeline.data.loader.bench_data; needs prepared data).
* assign : batched Dynamic Soft Label Assigner vs the per-image reference (pipeline.model.assigner).
* train  : timed training steps on synthetic batches (model with aux head), split into forward /
           assign / loss / backward / optimizer.
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


# --------------------------------------------------------------------------------------- train
def _synthetic_batch(batch: int, hw: tuple[int, int], num_classes: int, gen: torch.Generator, num_gt: int = 8):
    h, w = hw
    images = torch.randn(batch, 3, h, w, generator=gen)
    xy = torch.rand(batch, num_gt, 2, generator=gen) * torch.tensor([w, h])
    wh = torch.rand(batch, num_gt, 2, generator=gen) * torch.tensor([w, h]) * 0.4 + 8
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1).clamp(min=0).minimum(torch.tensor([w, h, w, h]))
    labels = torch.randint(0, num_classes, (batch, num_gt), generator=gen)
    return images, boxes, labels, torch.ones(batch, num_gt, dtype=torch.bool)


def bench_train(cfg, batches: list[int], iters: int) -> dict[str, Any]:
    """Per-phase milliseconds of a training step (median over ``iters`` after one warm-up step)."""
    from pipeline.model import build_model
    from pipeline.model.criterion import NanoDetPlusLoss
    from pipeline.model.decode import decode_boxes, make_priors

    torch.manual_seed(0)
    w, h = (int(v) for v in cfg.data.input_size)
    model = build_model(cfg.model, with_aux=True).train()
    criterion = NanoDetPlusLoss(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    priors = make_priors((h, w), model.strides)
    c, r = model.num_classes, model.reg_max
    out: dict[str, Any] = {"machine": _machine(torch.get_num_threads()), "input_size": [w, h],
                           "backbone": cfg.model.backbone.size, "steps": {}}
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        phases: dict[str, list[float]] = {k: [] for k in ("forward", "assign", "loss", "backward", "optimizer", "step")}
        for i in range(iters + 1):
            images, boxes, labels, valid = _synthetic_batch(batch, (h, w), c, gen)
            t0 = time.perf_counter()
            head_out, aux_out = model.forward_train(images, epoch=0)
            t1 = time.perf_counter()
            with torch.no_grad():  # the assignment alone, as the criterion runs it (aux head guides)
                cls, reg = aux_out.detach().split([c, 4 * (r + 1)], -1)
                criterion.assigner.assign(cls, priors, decode_boxes(reg, priors, r), boxes, labels, valid)
            t2 = time.perf_counter()
            loss, _, _ = criterion(head_out, aux_out, boxes, labels, valid, priors)
            t3 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t4 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
            optimizer.step()
            t5 = time.perf_counter()
            if i == 0:
                continue  # warm-up
            for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0 - (t2 - t1))):
                phases[key].append(dt * 1e3)
        med = {f"{k}_ms": float(np.median(v)) for k, v in phases.items()}
        med["loss_ms_includes_assign"] = True
        med["images_per_s"] = batch / (med["step_ms"] / 1e3)
        out["steps"][str(batch)] = med
    return out


# ---------------------------------------------------------------------------------------- peak
def bench_peak(device: str = "cpu", iters: int = 5) -> dict[str, Any]:
    """Achieved FLOP/s of a square matmul and a 3x3 conv (fp32 and bf16)."""
    dev = torch.device(device)
    n = 2048 if dev.type == "cpu" else 8192
    out: dict[str, Any] = {"machine": _machine(torch.get_num_threads()), "device": str(dev)}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        x = torch.randn(8 if dev.type == "cpu" else 64, 128, 56, 56, device=dev, dtype=dtype)
        conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).to(dev, dtype)
        conv_flops = 2 * x.shape[0] * 128 * 128 * 9 * 56 * 56

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def mm(a=a, b=b):
            a @ b
            sync()

        def cv(conv=conv, x=x):
            conv(x)
            sync()

        name = str(dtype).replace("torch.", "")
        out[f"matmul_{name}_tflops"] = 2 * n**3 / (latency_stats(mm, 1, iters)["p50_ms"] / 1e3) / 1e12
        out[f"conv3x3_{name}_tflops"] = conv_flops / (latency_stats(cv, 1, iters)["p50_ms"] / 1e3) / 1e12
    return out


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
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch/onnxruntime threads (default: torch's)")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--device", default="cpu", help="assign/peak: cpu or cuda")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
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
        result = _optional("pipeline.model.assigner", "bench_assign")(
            batch=args.batch, input_hw=(int(h), int(w)), strides=tuple(cfg.model.head.strides),
            num_classes=int(cfg.model.num_classes), device=args.device)
    elif args.what == "train":
        result = bench_train(cfg, args.train_batches, max(1, args.iters))
    else:
        result = bench_peak(args.device, max(1, args.iters))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
