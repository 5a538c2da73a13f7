"""`python -m pipeline.bench {infer,data,assign,train,peak,tta}`: measurements printed as JSON (not a test).

* infer  : per input size (``--sizes``) and runtime (eager PyTorch, onnxruntime fp32/INT8, OpenVINO fp32/INT8,
           NCNN, MNN: those installed) batch-1 latency p50/p90 per thread count (``--infer-threads``), throughput
           at ``--batch``, load time, file size; the official ONNX model's onnxruntime latency in the same run
           (../shared/anchors/nd_onnx.py, unless ``--no-official`` or not set up) and ratios against it; one JSON
           (with a markdown table; ``--out`` also writes it to <out>.md) (pipeline.tools.bench).
* data   : training input pipeline throughput (pipeline.data.loader.bench_data; needs prepared data).
* assign : batched Dynamic Soft Label Assigner vs the per-image reference (pipeline.model.assigner).
* train  : timed training steps (model with aux head; synthetic batches or ``--data loader``) split into
           data / forward / assign / loss / backward / optimizer, with ``--amp``, ``--channels-last`` and
           ``--compile`` as in training; training FLOPs per image, achieved FLOP/s vs the measured peak
           (pipeline.tools.bench_train).
* peak   : achievable FLOP/s of a large matmul and a 3x3 conv in fp32 and bf16 (the roofline for the above).
* tta    : time to accuracy: train the recipe (``--set``) validating every epoch, ``--seeds`` one after the other,
           and with ``--official`` the official NanoDet-Plus ``tools/train.py`` on the same data with the same recipe
           (../shared/anchors); epoch / wall seconds / mAP per run in ``<--out-dir>/tta.json`` + ``tta.png``
           (pipeline.tools.tta).

The model config is composed like everywhere else: ``--set experiment=nanodet_plus_m_320 ...`` (Hydra
overrides). Weights are random: latency does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from pipeline.config import ConfigError, compose
from pipeline.data.loader import bench_data
from pipeline.errors import UserError
from pipeline.model.assigner import bench_assign
from pipeline.tools.bench import OfficialOnnx, bench_infer, machine
from pipeline.tools.bench_train import bench_peak, bench_train
from pipeline.tools.tta import Official, bench_tta

REF = Path(os.environ.get("NANODET_REF", Path.home() / "nanodet-ref"))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["infer", "data", "assign", "train", "peak", "tta"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. experiment=nanodet_plus_m_320")
    parser.add_argument("--batch", type=int, default=None, help="infer: throughput batch (8); assign: batch (16)")
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
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="train: also profile STEPS more steps per operator (torch.profiler)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench_tta"), help="tta: working folder")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="tta: train.seed of each run")
    parser.add_argument("--official", action="store_true", help="tta: also run the official tools/train.py")
    parser.add_argument("--only-official", action="store_true", help="tta: run the official side only")
    parser.add_argument("--official-python", type=Path, default=REF / "venv" / "bin" / "python")
    parser.add_argument("--nanodet-src", type=Path, default=Path(os.environ.get("NANODET_SRC", REF / "src")))
    parser.add_argument("--anchors", type=Path, default=Path("../shared/anchors"))
    parser.add_argument("--sizes", type=int, nargs="*", default=[320, 416], help="infer: square input sizes")
    parser.add_argument("--infer-threads", type=int, nargs="*", default=[1, 2], help="infer: thread counts")
    parser.add_argument("--no-official", action="store_true", help="infer: skip the official ONNX model")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    try:
        cfg = compose(list(args.set))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.what == "infer":
        official = None if args.no_official else OfficialOnnx(args.official_python, args.nanodet_src, args.anchors)
        result = bench_infer(list(args.set), args.batch or 8, args.iters, not args.no_int8, args.infer_threads,
                             args.sizes, official)
    elif args.what == "data":
        result = bench_data(cfg)
    elif args.what == "assign":
        w, h = cfg.data.input_size
        result = {"machine": machine(threads), "by_num_gt": [
            bench_assign(batch=args.batch or 16, num_gt=num_gt, input_hw=(int(h), int(w)),
                         strides=tuple(cfg.model.head.strides), num_classes=int(cfg.model.num_classes),
                         device=args.device)
            for num_gt in args.num_gt]}
    elif args.what == "tta":
        official = (Official(args.official_python, args.nanodet_src, args.anchors.resolve())
                    if args.official or args.only_official else None)
        sides = ("official",) if args.only_official else ("ours", "official")
        result = bench_tta(list(args.set), args.out_dir, list(args.seeds), threads, official, sides)
    elif args.what == "train":
        result = bench_train(list(args.set), args.train_batches, max(1, args.iters), args.amp, args.channels_last,
                             args.compile, args.data, args.device, with_peak=not args.no_peak,
                             profile_steps=args.profile)
    else:
        result = {"machine": machine(threads), **bench_peak(args.device, max(1, args.iters))}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        if args.what == "infer":
            args.out.with_suffix(".md").write_text(result["markdown"] + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
