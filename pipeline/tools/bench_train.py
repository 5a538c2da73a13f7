"""Training-speed benchmark behind ``python -m pipeline.bench train`` and ``... peak``.

``train`` times THE training step (pipeline.train.step.TrainStep: autocast, the memory-format policy,
TrainForward, optional torch.compile with fallback, NanoDetPlusLoss, AdamW with clipping, EMA) and splits
each step into data / forward / assign / loss / backward / optimizer. It reports wall-clock
images/s (best and median) and the process CPU time (``images_per_cpu_s``; on a shared machine compare
``cpu_cores_used`` with the thread count: wall time then includes waiting for a core), the training FLOPs per
image, the achieved FLOP/s and the measured peak of this machine (``peak``: a large matmul and a 3x3
conv, float32 and bfloat16).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.config import compose
from pipeline.data.loader import build_loader
from pipeline.model import build_model
from pipeline.model.criterion import NanoDetPlusLoss
from pipeline.model.summary import training_flops
from pipeline.perf import apply_memory_format, compile_with_fallback, cpu_info, resolve_amp, time_calls
from pipeline.train.ema import ModelEMA
from pipeline.train.optim import build_optimizer
from pipeline.train.step import TrainForward, TrainStep

PHASES = ("data", "forward", "assign", "loss", "backward", "optimizer")
# torch.profiler op names -> what the time went to (first match wins; the rest is "other")
OP_CATEGORIES = (
    ("convolution", ("conv", "mkldnn_convolution", "cudnn_convolution")),
    ("batch_norm", ("batch_norm",)),
    ("group_norm", ("group_norm",)),
    ("layout_copies", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy")),
    ("optimizer_ema", ("adam", "_foreach_", "lerp")),
    ("activation", ("leaky_relu", "sigmoid", "softmax", "relu")),
    ("upsample_pool", ("upsample", "pool")),
)


def machine(threads: int) -> dict[str, Any]:
    info = cpu_info()
    return {"cpu": info["model"], "cores": info["cores"], "threads": threads,
            "cpu_flags": info["flags"], "native_bf16": info["native_bf16"], "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()]}


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# ---------------------------------------------------------------------------------------------- peak
def bench_peak(device: str = "cpu", iters: int = 5) -> dict[str, Any]:
    """Achieved TFLOP/s (best of ``iters``) of a square matmul and a 3x3 conv (128 -> 128 channels,
    56 x 56, NCHW), in float32 and bfloat16: the roofline for the training numbers."""
    dev = torch.device(device)
    n = 2048 if dev.type == "cpu" else 8192
    batch = 8 if dev.type == "cpu" else 64
    sync = _sync(dev)
    out: dict[str, Any] = {"device": str(dev), "threads": torch.get_num_threads(),
                           "matmul_size": n, "conv3x3": [batch, 128, 56, 56]}
    conv_flops = 2 * batch * 128 * 128 * 9 * 56 * 56
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(n, n, device=dev, dtype=dtype)
            b = torch.randn(n, n, device=dev, dtype=dtype)
            x = torch.randn(batch, 128, 56, 56, device=dev, dtype=dtype)
            conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).to(dev, dtype)
            name = str(dtype).replace("torch.", "")
            out[f"matmul_{name}_tflops"] = 2 * n**3 / min(time_calls(lambda a=a, b=b: a @ b, iters, sync=sync)) / 1e12
            out[f"conv3x3_{name}_tflops"] = conv_flops / min(time_calls(lambda c=conv, x=x: c(x), iters, sync=sync)) / 1e12
    return out


# --------------------------------------------------------------------------------------------- train
class _TimedAssigner:
    """Stands in for ``criterion.assigner``: the assignment runs inside the criterion, timed apart."""

    def __init__(self, inner: Any, sync: Callable[[], None]):
        self.inner, self.sync, self.seconds = inner, sync, 0.0

    def assign(self, *args: Any, **kwargs: Any) -> Any:
        self.sync()
        start = time.perf_counter()
        out = self.inner.assign(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - start
        return out


def synthetic_batch(batch: int, hw: tuple[int, int], num_classes: int, gen: torch.Generator,
                    num_gt: int = 8) -> dict[str, torch.Tensor]:
    """Random images and ``num_gt`` random boxes per image, in the loader's batch layout."""
    h, w = hw
    xy = torch.rand(batch, num_gt, 2, generator=gen) * torch.tensor([w, h])
    wh = torch.rand(batch, num_gt, 2, generator=gen) * torch.tensor([w, h]) * 0.4 + 8
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1).clamp(min=0).minimum(torch.tensor([w, h, w, h]))
    return {"images": torch.randn(batch, 3, h, w, generator=gen), "gt_boxes": boxes,
            "gt_labels": torch.randint(0, num_classes, (batch, num_gt), generator=gen),
            "gt_valid": torch.ones(batch, num_gt, dtype=torch.bool)}


def _batches(cfg: Any, batch: int, source: str, gen: torch.Generator):
    """Endless batches: two synthetic ones in turn (made up front: the data phase then measures only the
    copy to the device, as with loader workers that keep up), or the real training loader's."""
    w, h = (int(v) for v in cfg.data.input_size)
    if source == "synthetic":
        pool = [synthetic_batch(batch, (h, w), int(cfg.model.num_classes), gen) for _ in range(2)]
        while True:
            yield from pool
    loader = build_loader(cfg, "train", train=True, distributed=False)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_train(overrides: list[str], batches: list[int], iters: int, amp: str, channels_last: bool,
                compile_model: bool, data_source: str = "synthetic", device: str = "cpu",
                with_peak: bool = True, profile_steps: int = 0) -> dict[str, Any]:
    """Per-phase milliseconds and images/s of training steps for each batch size (``iters`` timed steps
    after one warm-up step, which also holds torch.compile's compilation); with ``profile_steps`` > 0 also
    a torch.profiler table of that many more steps (:func:`profile_ops`)."""
    dev = torch.device(device)
    sync = _sync(dev)
    amp_dtype = resolve_amp(amp, dev)
    cfg = compose(list(overrides))
    w, h = (int(v) for v in cfg.data.input_size)
    flops = training_flops(build_model(cfg.model, with_aux=True, load_pretrained=False), (h, w))
    out: dict[str, Any] = {
        "machine": machine(torch.get_num_threads()), "device": str(dev),
        "model": {"backbone": cfg.model.backbone.size, "input_size": [w, h], "with_aux": True,
                  "num_classes": int(cfg.model.num_classes)},
        "settings": {"amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
                     "channels_last": channels_last, "compile": compile_model, "data": data_source,
                     "ema": bool(cfg.train.ema), "grad_clip": float(cfg.train.grad_clip)},
        "flops_per_image": flops, "steps": {},
    }
    for batch in batches:
        bcfg = compose(list(overrides) + [f"data.batch_size={batch}"])
        torch.manual_seed(0)
        model = apply_memory_format(build_model(bcfg.model, with_aux=True).to(dev).train(), channels_last,
                                    amp_dtype, dev)
        module = compile_with_fallback(TrainForward(model), compile_model)
        criterion = NanoDetPlusLoss(bcfg.model)
        timed = criterion.assigner = _TimedAssigner(criterion.assigner, sync)
        optimizer = build_optimizer(model, bcfg.train, batch)
        ema = ModelEMA(model, bcfg.train.ema_decay, bcfg.train.ema_ramp_steps) if bcfg.train.ema else None
        # THE training step, without a GradScaler (float32 / bf16 here) and never skipped
        step = TrainStep(module, criterion, optimizer, torch.amp.GradScaler(dev.type, enabled=False), ema, dev,
                         amp_dtype, channels_last, float(bcfg.train.grad_clip))
        data = _batches(bcfg, batch, data_source, torch.Generator().manual_seed(0))
        runs: dict[str, list[float]] = {k: [] for k in (*PHASES, "step", "cpu")}
        for i in range(iters + 1):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            b = next(data)
            marks: dict[str, float] = {}

            def mark(phase: str, marks: dict[str, float] = marks, timed: _TimedAssigner = timed) -> None:
                sync()
                marks[phase] = time.perf_counter()
                if phase == "forward":
                    timed.seconds = 0.0  # the assignment of this step's loss only

            step(b, 0, mark=mark)
            step.apply(i)
            sync()
            t5, c5 = time.perf_counter(), time.process_time()
            if i == 0:
                continue  # warm-up (allocator, oneDNN primitive cache, compilation)
            t1, t2, t3, t4 = (marks[k] for k in ("data", "forward", "loss", "backward"))
            times = (t1 - t0, t2 - t1, timed.seconds, t3 - t2 - timed.seconds, t4 - t3, t5 - t4, t5 - t0, c5 - c0)
            for key, seconds in zip(runs, times):
                runs[key].append(seconds)
        out["steps"][str(batch)] = _summarise(runs, batch, flops["train_step_flops"])
        if profile_steps > 0:
            def one_step(step: TrainStep = step, data: Any = data) -> None:
                step(next(data), 0)
                step.apply(iters + 1)

            out["steps"][str(batch)]["profile"] = profile_ops(one_step, profile_steps, dev)
        if compile_model:
            out["steps"][str(batch)]["compile_fell_back"] = bool(getattr(module, "failed", False))
    if with_peak:
        out["peak"] = bench_peak(device, iters=3)
        key = f"conv3x3_{out['settings']['amp'].replace('fp32', 'float32')}_tflops"
        for step in out["steps"].values():
            step["fraction_of_conv3x3_peak"] = step["achieved_tflops"] / out["peak"][key]
    out["machine"]["loadavg_1_5_15_end"] = [round(v, 2) for v in os.getloadavg()]
    return out


def profile_ops(run_step: Callable[[], Any], steps: int, device: torch.device, top: int = 15) -> dict[str, Any]:
    """Self time per operator over ``steps`` training steps (torch.profiler): the ``top`` operators and the
    sums per :data:`OP_CATEGORIES`, in milliseconds per step (CPU self time; device time on CUDA)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            run_step()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(((e.key, getattr(e, attr) / 1e3 / steps, e.count // steps) for e in prof.key_averages()),
                  key=lambda r: -r[1])
    total = sum(ms for _, ms, _ in rows)
    by_cat: dict[str, float] = {name: 0.0 for name, _ in OP_CATEGORIES}
    by_cat["other"] = 0.0
    for key, ms, _ in rows:
        cat = next((name for name, pats in OP_CATEGORIES if any(p in key.lower() for p in pats)), "other")
        by_cat[cat] += ms
    return {"steps": steps, "time": attr, "total_ms_per_step": round(total, 1),
            "by_category_ms": {k: round(v, 1) for k, v in by_cat.items()},
            "top_ops": [{"op": k, "ms": round(ms, 1), "share": round(ms / max(total, 1e-9), 3), "calls": n}
                        for k, ms, n in rows[:top]]}


def _summarise(runs: dict[str, list[float]], batch: int, step_flops: float) -> dict[str, Any]:
    """Median milliseconds per phase, images/s (best and median step), CPU cores used, FLOP/s."""
    step = np.asarray(runs["step"])
    res: dict[str, Any] = {f"{k}_ms": 1e3 * float(np.median(runs[k])) for k in PHASES}
    cpu = np.asarray(runs["cpu"])
    res.update(step_ms_median=1e3 * float(np.median(step)), step_ms_best=1e3 * float(step.min()),
               images_per_s_median=batch / float(np.median(step)), images_per_s_best=batch / float(step.min()),
               # CPU seconds the process used per step: on a shared machine wall time includes waiting for
               # the cores, CPU time does not (images per CPU-second = the rate per fully used core)
               cpu_ms_median=1e3 * float(np.median(cpu)), images_per_cpu_s=batch / float(np.median(cpu)),
               cpu_cores_used=float(np.median(cpu / step)), timed_steps=len(step))
    res["achieved_tflops"] = step_flops * res["images_per_s_best"] / 1e12
    return res
