"""One-command GPU check: ``make gpu-check`` / ``python -m pipeline.tools.gpu_check [--device cuda|cpu] [overrides]``
(all GPUs: ``torchrun --standalone --nproc-per-node=gpu -m pipeline.tools.gpu_check``).

On a CUDA machine, in this order (rank 0 prints one JSON object on stdout):
1. process group: NCCL, one process (or every torchrun rank), checked with an all-reduce;
2. a few training steps per AMP mode - bf16 (when the GPU supports it) and fp16 with the GradScaler - through
   THE training step (:class:`pipeline.train.step.TrainStep`), the model converted to SyncBatchNorm and wrapped
   in DistributedDataParallel; images/s (all ranks, after one warm-up step) and the peak memory
   (``torch.cuda.max_memory_allocated`` on this rank, reset at the start of each mode) of each mode;
3. one validation of the model the last AMP mode trained, through THE evaluation
   (:func:`pipeline.infer.evaluate.evaluate_detector`) on a small generated data set;
4. the export stage's ONNX export and verification (:func:`pipeline.infer.export.export_model`: parity with
   PyTorch, mAP) of that model.

``--device cpu`` runs the same steps on the CPU (gloo; bf16 autocast where the CPU runs it natively, else
float32; no fp16, no SyncBatchNorm: both need CUDA) with a tiny model: a dry run that exercises the code path
anywhere.

Exit codes: 0 every check passed; 1 a check failed (the message names it); 2 bad arguments or config;
3 no CUDA device (``--device cuda``, the default, on a machine without one).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline import dist as pdist
from pipeline.config import Config, compose, to_dict
from pipeline.data.prepare import prepare
from pipeline.errors import UserError
from pipeline.infer.evaluate import evaluate_detector
from pipeline.infer.export import ExportError, export_model
from pipeline.infer.runtime import ModuleDetector
from pipeline.model import build_model
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.criterion import NanoDetPlusLoss
from pipeline.perf import apply_memory_format, cpu_info, resolve_amp
from pipeline.tools.bench_train import synthetic_batch
from pipeline.train.optim import build_optimizer
from pipeline.train.step import TrainForward, TrainStep

EXIT_CHECK_FAILED, EXIT_USER_ERROR, EXIT_NO_CUDA = 1, 2, 3
# the data every mode shares: a small generated set (validation and export verification run on its val split)
DATA = ["data=builtin", "model.num_classes=3", "data.builtin.num_train=8", "data.builtin.num_val=8",
        "data.builtin.max_objects=3", "data.num_workers=0", "data.eval_batch_size=8", "model.backbone.pretrained=null",
        "export.formats=[onnx]", "export.verify_images=4", "tracking.mode=disabled"]
CUDA_DEFAULTS = ["data.input_size=[320,320]", "data.builtin.image_size=[320,320]", "data.batch_size=64"]
CPU_DEFAULTS = ["model=nanodet_plus_m_0.5x", "model.neck.out_channels=32", "model.head.feat_channels=32",
                "model.aux_head.feat_channels=64", "data.input_size=[64,64]", "data.builtin.image_size=[64,64]",
                "data.batch_size=4"]


class CheckFailed(RuntimeError):
    """A GPU check did not pass (exit code 1)."""


class NoCuda(RuntimeError):
    """--device cuda on a machine without a usable CUDA device (exit code 3)."""


# ---------------------------------------------------------------------------------------- setup
def no_cuda_reason() -> str | None:
    """None when CUDA is usable, else why not (one line)."""
    if torch.cuda.is_available():
        return None
    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda else \
        f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"torch.cuda.is_available() is False ({build}; {torch.cuda.device_count()} device(s) visible"
            f"{'' if visible is None else f', CUDA_VISIBLE_DEVICES={visible!r}'})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_group(device: torch.device) -> dict[str, Any]:
    """NCCL (CUDA) or gloo (CPU): every torchrun rank, or a one-process group on 127.0.0.1; one all-reduce."""
    if pdist.launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        pdist.init_distributed(device, timeout_s=300)
    else:
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{_free_port()}", **kwargs)
    ones = torch.ones(1, device=device)
    dist.all_reduce(ones)
    world = dist.get_world_size()
    if ones.item() != world:
        raise CheckFailed(f"all-reduce over {world} ranks gave {ones.item()} instead of {world}")
    out = {"backend": dist.get_backend(), "world_size": world, "all_reduce": "ok"}
    if device.type == "cuda":
        out["nccl_version"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    return out


def amp_modes(device: torch.device) -> list[str]:
    """bf16 (when supported) and fp16 on CUDA; on a CPU bf16 where it runs natively, else float32 (emulated
    bf16 is many times slower; fp16 training needs CUDA: pipeline.perf.resolve_amp refuses it on a CPU)."""
    if device.type != "cuda":
        return ["bf16"] if cpu_info()["native_bf16"] else ["off"]
    return ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]


# ---------------------------------------------------------------------------------------- checks
def train_steps(cfg: Config, device: torch.device, amp: str, steps: int) -> tuple[nn.Module, dict[str, Any]]:
    """``steps`` timed steps (+1 warm-up) of THE training step under DDP; returns (model, figures)."""
    amp_dtype = resolve_amp(amp, device)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, with_aux=True, load_pretrained=False)
    sync_bn = device.type == "cuda"
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = apply_memory_format(model.to(device).train(), cfg.train.channels_last, amp_dtype, device)
    module = nn.parallel.DistributedDataParallel(TrainForward(model), device_ids=[device.index] if sync_bn else None)
    batch = int(cfg.data.batch_size)
    optimizer = build_optimizer(model, cfg.train, batch * dist.get_world_size())
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step = TrainStep(module, NanoDetPlusLoss(cfg.model), optimizer, scaler, None, device, amp_dtype,
                     cfg.train.channels_last, float(cfg.train.grad_clip))
    w, h = (int(v) for v in cfg.data.input_size)
    data = synthetic_batch(batch, (h, w), int(cfg.model.num_classes), torch.Generator().manual_seed(dist.get_rank()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, start = [], 0.0
    for i in range(steps + 1):
        if i == 1:
            _sync(device)
            start = time.perf_counter()
        loss, _terms, _norm = step(data, 0)
        step.apply(i)
        losses.append(float(loss.detach()))
    _sync(device)
    seconds = time.perf_counter() - start
    if not all(map(math.isfinite, losses)):
        raise CheckFailed(f"amp={amp}: non-finite training loss {losses}")
    out = {"amp": amp, "steps": steps, "batch_per_rank": batch, "loss_first": losses[0], "loss_last": losses[-1],
           "images_per_s": steps * batch * dist.get_world_size() / seconds,
           "sync_bn_layers": sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())}
    if scaler.is_enabled():
        out["grad_scale"] = float(scaler.get_scale())
    if device.type == "cuda":
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return model, out


def validate(model: nn.Module, cfg: Config, device: torch.device, amp: str) -> dict[str, Any]:
    metrics = evaluate_detector(ModuleDetector(model, cfg, device, resolve_amp(amp, device)), cfg)
    return {k: float(metrics[k]) for k in ("mAP", "AP50") if k in metrics}


def export_parity(model: nn.Module, overrides: list[str], work: Path) -> dict[str, Any]:
    """Save ``model`` as a checkpoint and run the export stage's ONNX export + verification on it (CPU)."""
    ckpt = work / "gpu_check.pt"
    cfg = compose([*overrides, f"export.checkpoint={ckpt}", f"export.out_dir={work / 'export'}"])
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # SyncBatchNorm keys = BatchNorm keys
    save_checkpoint(ckpt, {"model": state, "ema": None, "config": to_dict(cfg), "epoch": 0, "step": 0},
                    keep_prev=False)
    try:
        report = export_model(cfg)
    except ExportError as err:  # the model is not at fault here: the export path is
        raise CheckFailed(f"ONNX export verification: {err}") from None
    return {k: report[k] for k in ("max_abs_diff", "atol", "map_torch", "map_onnx", "opset")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions(device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        out["device_name"] = cpu_info()["model"]
    return out


# ------------------------------------------------------------------------------------------- run
def run_check(device_kind: str, steps: int, overrides: list[str], work: Path) -> dict[str, Any]:
    """Every check in order; returns the report (the same dict on every rank)."""
    if device_kind == "cuda":
        reason = no_cuda_reason()
        if reason:
            raise NoCuda(reason)
    device = pdist.select_device(device_kind)
    all_overrides = [*DATA, *(CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS),
                     f"data.prepared_dir={work / 'data'}", f"train.out_dir={work / 'train'}",
                     f"eval.out_dir={work / 'evaluate'}", *overrides]
    cfg = compose(all_overrides)
    report: dict[str, Any] = {"device": str(device), "versions": versions(device), "group": init_group(device)}
    if pdist.is_main():
        prepare(cfg)
    pdist.barrier()
    report["train"] = {}
    for amp in amp_modes(device):
        model, report["train"][amp] = train_steps(cfg, device, amp, steps)
    report["validation"] = validate(model, cfg, device, amp)
    if pdist.is_main():
        report["export_onnx"] = export_parity(model, all_overrides, work)
    pdist.barrier()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default; exit code 3 without one) or cpu (a dry run of the same steps)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per AMP mode (default 5)")
    parser.add_argument("--work-dir", type=Path, help="keep the data, checkpoint and ONNX model here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=nanodet_plus_m_1.5x")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = (args.work_dir or Path(tmp)).absolute()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON report only (prepare prints)
                report = run_check(args.device, max(1, args.steps), args.overrides, work)
        except NoCuda as err:
            print(f"no CUDA device: {err}. Run it on a machine with an NVIDIA GPU, or try the CPU dry run: "
                  "python -m pipeline.tools.gpu_check --device cpu", file=sys.stderr)
            return EXIT_NO_CUDA
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except CheckFailed as err:
            print(f"gpu check failed: {err}", file=sys.stderr)
            return EXIT_CHECK_FAILED
        finally:
            pdist.cleanup()
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 of torchrun (the group is gone by now)
        print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
