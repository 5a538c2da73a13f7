"""The inference and machine benchmarks behind ``python -m pipeline.bench infer`` (the command and its options
are described in :mod:`pipeline.bench`); the training benchmark lives in :mod:`pipeline.tools.bench_train`.

``bench_infer``: for each input size, the model (random weights: latency does not depend on them) is exported
to every runtime whose package is installed, each loaded through THE runtime interface
(:func:`pipeline.infer.runtime.load_detector`) and timed: batch-1 latency p50/p90 per thread count, throughput
at ``batch`` (the largest thread count), load time, file size. The official NanoDet-Plus ONNX model is timed in
onnxruntime in the same run (``../shared/anchors/nd_onnx.py`` with the official reference venv) when it is
set up, and every batch-1 latency gets its ratio to it (same size, same threads). INT8 models are calibrated
on random inputs here: speed only (their accuracy is checked by the export stage on real images).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import compose, to_dict
from pipeline.errors import UserError
from pipeline.infer.export import DEPLOY_FILES
from pipeline.infer.exporters.common import ExportError
from pipeline.infer.exporters.mnn_export import to_mnn
from pipeline.infer.exporters.ncnn_export import to_ncnn
from pipeline.infer.exporters.onnx_export import ExportModule, build_metadata, export_onnx, quantize_int8
from pipeline.infer.exporters.openvino_export import quantize_openvino, to_openvino
from pipeline.infer.runtime import Preprocessing, load_detector
from pipeline.model import build_model
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.summary import summarize
from pipeline.perf import latency_stats

RUNTIMES = ("torch_eager", "onnxruntime", "onnxruntime_int8", "openvino", "openvino_int8", "ncnn", "mnn")


def machine(threads: int) -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _throughput(fn: Callable[[], Any], batch: int, iters: int) -> float:
    stats = latency_stats(fn, warmup=1, iters=iters)
    return batch / (stats["mean_ms"] / 1e3)


@dataclass(frozen=True)
class OfficialOnnx:
    """The official reference (../shared/anchors/README.md): its venv's python, a nanodet checkout, the scripts."""

    python: Path
    src: Path
    anchors: Path

    def missing(self) -> str | None:
        for what, path in (("--official-python", self.python), ("--nanodet-src", self.src / "nanodet"),
                           ("--anchors", self.anchors / "nd_onnx.py")):
            if not path.exists():
                return f"{what}: {path} does not exist (set-up: ../shared/anchors/README.md)"
        return None

    def run(self, work: Path, size: int, threads: int, iters: int) -> dict[str, Any]:
        """nd_onnx.py: the official tools/export_onnx.py (legacy exporter, as written for) + onnxruntime timing."""
        python, anchors = str(self.python.absolute()), self.anchors.resolve()  # the scripts run in ``work``
        env = {**os.environ, "NANODET_SRC": str(self.src.resolve()), "OMP_NUM_THREADS": str(threads)}
        cfg = work / "official_coco80.yml"
        out = work / f"official_{size}_{threads}t.json"
        steps = [] if cfg.is_file() else [[python, str(anchors / "nd_make_config.py"), "--out", str(cfg)]]
        steps.append([python, str(anchors / "nd_onnx.py"), "--config", str(cfg), "--workdir", str(work / f"official_{size}"),
                      "--size", str(size), "--exporter", "legacy", "--threads", str(threads), "--runs", str(iters),
                      "--warmup", "5", "--repeats", "3", "--json", str(out)])
        for cmd in steps:
            res = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=1800, check=False)
            if res.returncode != 0:
                raise ValueError(f"{' '.join(cmd[:2])} failed (exit {res.returncode}): {res.stderr.strip()[-400:]}")
        res = json.loads(out.read_text())["exports"]["legacy"]
        return {"p50_ms": res["ort_latency"]["median_ms"], "min_ms": res["ort_latency"]["min_ms"],
                "size_bytes": res["file_bytes"], "max_abs_diff_cls_prob": res["max_abs_diff_cls_prob"]}


# --------------------------------------------------------------------------------------- export
def _export_all(cfg, model, work: Path, int8: bool) -> tuple[dict[str, Path], dict[str, str]]:
    """The model in every runtime that is installed -> ({runtime: file to load}, {runtime: why skipped})."""
    w, h = (int(v) for v in cfg.data.input_size)
    pre = Preprocessing((w, h), bool(cfg.data.keep_ratio), tuple(cfg.data.mean), tuple(cfg.data.std))
    meta = build_metadata(to_dict(cfg), [f"class{i}" for i in range(model.num_classes)], pre, model.strides,
                          model.reg_max, False, {"score_thr": 0.05, "iou_thr": 0.6, "max_dets": 100})
    ckpt = save_checkpoint(work / "model.pt", {"model": model.state_dict(), "config": to_dict(cfg)}, keep_prev=False)
    onnx_path = export_onnx(ExportModule(model, (h, w), decode_in_graph=False), work / "model.onnx", meta=meta)
    calib = np.random.default_rng(0).standard_normal((8, 3, h, w)).astype(np.float32)
    deploy = work / "deploy"
    steps: dict[str, Callable[[], Path]] = {
        "onnxruntime_int8": lambda: quantize_int8(onnx_path, work / "model.int8.onnx", calib, meta),
        "openvino": lambda: to_openvino(onnx_path, deploy / DEPLOY_FILES["openvino"][0], meta),
        "openvino_int8": lambda: quantize_openvino(deploy / DEPLOY_FILES["openvino"][0],
                                                   deploy / DEPLOY_FILES["openvino_int8"][0],
                                                   [calib[i:i + 1] for i in range(len(calib))], meta),
        "ncnn": lambda: to_ncnn(onnx_path, deploy / DEPLOY_FILES["ncnn"][0], meta, (h, w)),
        "mnn": lambda: to_mnn(onnx_path, deploy / DEPLOY_FILES["mnn"][0], meta),
    }
    paths, skipped = {"torch_eager": ckpt, "onnxruntime": onnx_path}, {}
    for name, step in steps.items():
        if "int8" in name and not int8:
            continue
        if name == "openvino_int8" and "openvino" not in paths:
            skipped[name] = skipped.get("openvino", "no fp32 OpenVINO model")
            continue
        try:
            paths[name] = step()
        except ExportError as err:  # a converter that is not installed or fails: said in the report
            skipped[name] = str(err)
    return paths, skipped


def _file_bytes(path: Path) -> int:
    names = {path, path.with_suffix(".bin")} if path.suffix in (".xml", ".param") else {path}
    return sum(p.stat().st_size for p in names if p.is_file())


def _bench_runtime(path: Path, threads_list: Sequence[int], one: np.ndarray, many: np.ndarray,
                   iters: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": path.name, "size_bytes": _file_bytes(path), "batch1": {}}
    det = None
    for threads in threads_list:
        torch.set_num_threads(threads)  # the eager runtime's threads; the others take theirs at load
        start = time.perf_counter()
        det = load_detector(path, threads=threads)
        if "load_s" not in entry:
            entry["load_s"] = time.perf_counter() - start
        entry["batch1"][str(threads)] = latency_stats(lambda d=det: d.forward(one), iters=iters)
    entry["throughput_threads"] = threads_list[-1]
    entry["throughput_images_per_s"] = _throughput(lambda: det.forward(many), len(many), max(3, iters // 5))
    return entry


# --------------------------------------------------------------------------------------- report
def bench_infer(overrides: Sequence[str], batch: int, iters: int, int8: bool, threads_list: Sequence[int],
                sizes: Sequence[int], official: OfficialOnnx | None) -> dict[str, Any]:
    """The inference benchmark: ``{"sizes": {size: {runtime: {...}}}, "official_onnx": ..., "markdown": ...}``."""
    threads_list = sorted(set(threads_list))
    why_not = "--no-official" if official is None else official.missing()
    report: dict[str, Any] = {"machine": machine(threads_list[-1]), "loadavg_before": loadavg(), "iters": iters,
                              "threads": threads_list, "batch_throughput": batch, "sizes": {},
                              "official_onnx": {"available": why_not is None, "why_not": why_not}}
    saved_threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in sizes:
                report["sizes"][str(size)] = _bench_size(list(overrides), size, batch, iters, int8, threads_list,
                                                         Path(tmp), report, None if why_not else official)
    finally:
        torch.set_num_threads(saved_threads)
    report["loadavg_after"] = loadavg()
    report["goal"] = goal(report, min(sizes), threads_list[-1])
    report["markdown"] = markdown(report)
    return report


def _bench_size(overrides: list[str], size: int, batch: int, iters: int, int8: bool, threads_list: list[int],
                tmp: Path, report: dict, official: OfficialOnnx | None) -> dict[str, Any]:
    cfg = compose([*overrides, f"data.input_size=[{size},{size}]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, with_aux=False, load_pretrained=False).eval()  # speed, not accuracy
    work = tmp / str(size)
    work.mkdir()
    out: dict[str, Any] = {"model": {k: v for k, v in summarize(model, (size, size)).items() if k in (
        "params_inference", "params_inference_conv", "flops_inference", "num_priors")},
        "backbone": cfg.model.backbone.size, "num_classes": int(cfg.model.num_classes), "runtimes": {}}
    paths, out["skipped"] = _export_all(cfg, model, work, int8)
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    many = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    for name in RUNTIMES:
        if name in paths:
            try:
                out["runtimes"][name] = _bench_runtime(paths[name], threads_list, one, many, iters)
            except UserError as err:  # a runtime that cannot run this model: said in the report, the rest go on
                out["skipped"][name] = str(err)
    if official is not None:
        ref = out["official_onnx"] = {}
        for threads in threads_list:
            try:
                ref[str(threads)] = official.run(tmp, size, threads, iters)
            except (subprocess.SubprocessError, OSError, KeyError, ValueError) as err:
                ref[str(threads)] = {"error": str(err)[-500:]}
        for entry in out["runtimes"].values():
            entry["ratio_vs_official_onnx"] = {
                t: entry["batch1"][t]["p50_ms"] / ref[t]["p50_ms"] for t in entry["batch1"] if "p50_ms" in ref.get(t, {})}
    return out


def goal(report: dict, size: int, threads: int) -> dict[str, Any]:
    """Issue #17's goal at ``size`` px, batch 1, ``threads`` threads: the fastest fp32 runtime <= 0.8x the
    official ONNX model's onnxruntime latency, the fastest INT8 one <= 0.5x (ratios of the same run)."""
    runtimes = report["sizes"].get(str(size), {}).get("runtimes", {})
    t = str(threads)
    out: dict[str, Any] = {"size": size, "threads": threads}
    for kind, target in (("fp32", 0.8), ("int8", 0.5)):
        cands = {k: v for k, v in runtimes.items() if ("int8" in k) == (kind == "int8") and k != "torch_eager"}
        if not cands:
            continue
        best = min(cands, key=lambda k: cands[k]["batch1"][t]["p50_ms"])
        ratio = cands[best].get("ratio_vs_official_onnx", {}).get(t)
        out[kind] = {"fastest": best, "p50_ms": cands[best]["batch1"][t]["p50_ms"], "ratio_vs_official_onnx": ratio,
                     "target": target, "met": None if ratio is None else ratio <= target}
    return out


def markdown(report: dict) -> str:
    """One row per size x runtime x threads."""
    rows = ["| size | runtime | threads | p50 ms | p90 ms | x official ONNX (ORT) | batch-{} img/s | load s | MB |".format(
        report["batch_throughput"]), "|---|---|---|---|---|---|---|---|---|"]
    for size, res in report["sizes"].items():
        for t, ref in res.get("official_onnx", {}).items():
            if "p50_ms" in ref:
                rows.append(f"| {size} | official ONNX (ORT, median) | {t} | {ref['p50_ms']:.2f} |  | 1.00 |  |  | "
                            f"{ref['size_bytes'] / 1e6:.2f} |")
        for name, e in res["runtimes"].items():
            for t, stats in e["batch1"].items():
                ratio = e.get("ratio_vs_official_onnx", {}).get(t)
                thr = f"{e['throughput_images_per_s']:.1f}" if int(t) == e["throughput_threads"] else ""
                rows.append(f"| {size} | {name} | {t} | {stats['p50_ms']:.2f} | {stats['p90_ms']:.2f} | "
                            f"{'' if ratio is None else f'{ratio:.2f}'} | {thr} | {e['load_s']:.2f} | "
                            f"{e['size_bytes'] / 1e6:.2f} |")
    return "\n".join(rows)
