"""Train NanoDet-Plus: :func:`train` (run by ``python -m pipeline.train [overrides]``, or with DDP
``torchrun --nproc_per_node=N -m pipeline.train [overrides]``, and by Ray Tune trials, several times per
process). It builds data, model and optimiser from the config, runs the epochs (:mod:`pipeline.train.loop`),
validates with THE evaluation (:func:`pipeline.infer.evaluate.evaluate_detector`) and handles checkpoints,
tracking and plots at the edges. Artefacts in
``train.out_dir``: ``last.pt`` (+ ``last.pt.prev``), ``best.pt`` (best val mAP, EMA weights),
``config.yaml``, ``metrics.json`` (headline numbers) + ``details.json`` (full summary) and ``plots/*.csv``
for DVC.

Reproducibility: every epoch re-seeds python/numpy/torch, the loader and the augmentation from
(train.seed, epoch, rank) and the data order comes from (seed, epoch), so a resume - also from a
mid-epoch step checkpoint, whose finished batches are replayed from the loader and dropped -
continues exactly as the uninterrupted run would
(identical weights on CPU with the same world size), also with data.num_workers > 0: the training loader
starts its workers afresh every epoch, seeded from the epoch's loader generator, so their augmentation draws
repeat too.

SIGTERM/SIGINT: the current step finishes, ``last.pt`` is saved and :class:`TrainingInterrupted` is raised
(the entry point turns it into exit code 128 + signal).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline import dist as pdist
from pipeline import faults
from pipeline.config import Config, ConfigError, to_dict
from pipeline.data.dataset import check_prepared
from pipeline.data.formats import prepared_json
from pipeline.data.loader import build_loader
from pipeline.infer.evaluate import DESCRIPTION_KEYS, evaluate_detector, load_gt
from pipeline.infer.runtime import ModuleDetector
from pipeline.logging import get_logger
from pipeline.model import build_model
from pipeline.model.checkpoint import CheckpointError, load_weights_for_finetune, save_checkpoint
from pipeline.model.criterion import NanoDetPlusLoss
from pipeline.perf import apply_memory_format, compile_with_fallback, resolve_amp
from pipeline.train.ema import ModelEMA
from pipeline.train.loop import StopFlag, TrainState, train_one_epoch
from pipeline.train.optim import build_optimizer, build_scheduler
from pipeline.train.progress import hms
from pipeline.train.resume import resume_checkpoint
from pipeline.train.step import TrainForward, TrainStep
from pipeline.train.tracking import (
    Tracker,
    append_plot_row,
    build_panel,
    build_tracker,
    train_headline,
    write_metrics_json,
)

log = get_logger(__name__)

EPOCH_SEED_STRIDE = 1000  # epoch e on rank r uses seed + 1000 * (e + 1) + r


class TrainingInterrupted(Exception):
    """Stopped by a signal after saving last.pt; ``exit_code`` = 128 + signal number."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(f"training stopped by {signal.Signals(signum).name} at step {step}; {path} saved. "
                         "Run the same command again (train.resume=auto) to continue")


# -------------------------------------------------------------------------------------- helpers
def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch`` on this rank."""
    return seed + EPOCH_SEED_STRIDE * (epoch + 1) + pdist.get_rank()


def start_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Make the epoch's randomness a function of (seed, epoch, rank) only, whatever ran before:
    python/numpy/torch global RNGs, the loader's generator (worker base seeds), the augmentation
    stream of the main-process dataset, and the sampler order (``set_epoch``)."""
    s = epoch_seed(seed, epoch)
    pdist.seed_everything(s, rank_offset=False)
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(s)
    if hasattr(loader.dataset, "reseed"):
        loader.dataset.reseed(s)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    else:
        batch_sampler = getattr(loader, "batch_sampler", None)
        for obj in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)


def rng_state() -> dict:
    np_state = np.random.get_state()
    numpy_state = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                   int(np_state[3]), float(np_state[4]))  # ndarray -> tensor: weights_only-loadable
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (EMA buffers drift with per-rank BN statistics)."""
    if pdist.is_dist():
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)


class _SignalHandlers:
    """SIGTERM/SIGINT set the stop flag (main thread only; Ray trials run in other threads)."""

    def __init__(self, flag: StopFlag):
        self.flag, self.previous = flag, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if self.flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        log.warning("received %s: finishing the current step, then saving last.pt",
                    signal.Signals(signum).name)
        self.flag.set(signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------- setup
def _configure_torch(cfg: Config, device: torch.device) -> None:
    torch.backends.cudnn.benchmark = not cfg.train.deterministic
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.train.sync_bn and pdist.get_world_size() > 1 and device.type != "cuda":
        raise ConfigError("train.sync_bn: SyncBatchNorm needs CUDA devices; set train.sync_bn=false on CPU")


def _build_model(cfg: Config, device: torch.device) -> nn.Module:
    pdist.seed_everything(cfg.train.seed, rank_offset=False)  # identical initial weights on every rank
    # train.init_from replaces the backbone too: no need for (or download of) the ImageNet weights then
    model = build_model(cfg.model, with_aux=True, load_pretrained=not cfg.train.init_from)
    if cfg.train.init_from:
        load_weights_for_finetune(model, cfg.train.init_from)
    if cfg.train.sync_bn and pdist.get_world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    # channels_last where it is faster (pipeline.perf: the aux head stays NCHW under CPU bf16 autocast)
    return apply_memory_format(model, cfg.train.channels_last, resolve_amp(cfg.train.amp, device), device)


def _check_out_dir(out_dir: Path) -> None:
    """Fail at the start, with the same error on every rank, when train.out_dir cannot be created or
    written (a path under a file, a read-only mount, no space) instead of at the first checkpoint."""
    problem = None
    if pdist.is_main():
        probe = out_dir / f".write_test.{os.getpid()}"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as err:
            problem = (f"train.out_dir={out_dir} is not writable ({err.strerror or err}: {err.filename}); "
                       "point train.out_dir to a writable folder with free space")
    problem = pdist.broadcast_object(problem)
    if problem:
        raise CheckpointError(problem)


class _Run:
    """Everything one training run holds; methods are the steps of :func:`train`."""

    def __init__(self, cfg: Config, device: torch.device, report: Callable | None):
        self.cfg, self.device, self.report = cfg, device, report
        self.out_dir = Path(cfg.train.out_dir)
        self.distributed = pdist.is_dist()
        _check_out_dir(self.out_dir)
        _configure_torch(cfg, device)
        self.train_loader = build_loader(cfg, "train", train=True, distributed=self.distributed)
        check_prepared(prepared_json(cfg, "val"), cfg)  # a broken val split fails now, not after an epoch
        self.model = _build_model(cfg, device)
        self.criterion = NanoDetPlusLoss(cfg.model)
        global_batch = cfg.data.batch_size * pdist.get_world_size()
        self.optimizer = build_optimizer(self.model, cfg.train, global_batch)
        self.scheduler = build_scheduler(self.optimizer, cfg.train, global_batch)
        self.amp_dtype = resolve_amp(cfg.train.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self.best = {"mAP": -1.0, "epoch": -1, "metrics": {}}
        self.bad_evals = 0
        self.last_eval: dict[str, Any] = {}
        self.last_train: dict[str, float] = {}
        run_id = self._restore()
        module = TrainForward(self.model)
        if self.distributed:
            # every parameter gets a gradient each step (the aux branch always trains on its own loss)
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False)
        # compile after DDP, so that DDP's graph-break optimizer can split the graph; a compiler failure
        # falls back to eager with a warning (pipeline.perf.CompileFallback)
        self.module = compile_with_fallback(module, cfg.train.compile)
        if cfg.train.ema and self.ema is None:  # after DDP's initial broadcast: the same EMA on every rank
            self.ema = ModelEMA(self.model, cfg.train.ema_decay, cfg.train.ema_ramp_steps)
        self.tracker: Tracker = build_tracker(cfg, run_id, pdist.get_rank())
        self.step = TrainStep(self.module, self.criterion, self.optimizer, self.scaler, self.ema, device,
                              self.amp_dtype, cfg.train.channels_last, cfg.train.grad_clip)
        self.state.on_step_end = self._on_step_end
        self.state.on_log = self.tracker.log  # the loop reports; tracking stays here

    def _restore(self) -> str | None:
        self.ema = None
        found = resume_checkpoint(self.cfg)
        if found is None:
            return None
        path, ckpt = found
        self.model.load_state_dict(ckpt["model"])
        if self.cfg.train.ema and ckpt.get("ema"):
            self.ema = ModelEMA(self.model, self.cfg.train.ema_decay, self.cfg.train.ema_ramp_steps)
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        s = self.state
        s.epoch, s.step, s.epoch_step = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt.get("epoch_step", 0))
        nonfinite = ckpt.get("nonfinite") or {}
        s.nonfinite_consecutive = int(nonfinite.get("consecutive", 0))
        s.nonfinite_total = int(nonfinite.get("total", 0))
        s.loss_sums, s.loss_count = list(ckpt.get("loss_sums", [])), int(ckpt.get("loss_count", 0))
        self.best = {"mAP": float(ckpt.get("best_map", -1.0)), "epoch": int(ckpt.get("best_epoch", -1)),
                     "metrics": dict(ckpt.get("best_metrics") or {})}
        self.bad_evals = int(ckpt.get("bad_evals", 0))
        world = pdist.get_world_size()
        rngs = ckpt.get("rng") or []
        if ckpt.get("world_size") == world and len(rngs) == world:
            set_rng_state(rngs[pdist.get_rank()])
        elif ckpt.get("world_size") != world:
            log.warning("resuming with %d processes from a checkpoint written by %s: the data order differs "
                        "from an uninterrupted run", world, ckpt.get("world_size"))
        log.info("resumed from %s: epoch %d, step %d (%d batches into the epoch), best mAP %.4f",
                 path, s.epoch, s.step, s.epoch_step, self.best["mAP"])
        return ckpt.get("tracking_run_id")

    # ----------------------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> dict:
        rngs = pdist.all_gather_object(rng_state())
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), **self._counters(), "rng": rngs,
                "config": to_dict(self.cfg), "tracking_run_id": self.tracker.run_id,
                "world_size": pdist.get_world_size()}

    def _counters(self) -> dict:
        c = self.state.counters()
        return {"epoch": c["epoch"], "epoch_step": c["epoch_step"], "step": c["step"],
                "nonfinite": c["nonfinite"], "loss_sums": c["loss_sums"], "loss_count": c["loss_count"],
                "best_map": self.best["mAP"], "best_epoch": self.best["epoch"],
                "best_metrics": _numbers(self.best["metrics"]), "bad_evals": self.bad_evals}

    def save_last(self) -> Path:
        state = self._checkpoint()  # a collective (rng gather): every rank calls it
        path = self.out_dir / "last.pt"
        if pdist.is_main():
            save_checkpoint(path, state)
        return path

    def _on_step_end(self, state: TrainState) -> None:
        faults.step_end(state.step, pdist.get_rank())  # test-only kill/hang hook (pipeline/faults.py)
        every = self.cfg.train.save_interval_steps
        if every and state.step % every == 0:
            self.save_last()

    # ---------------------------------------------------------------------------------- epochs
    def fit(self, stop_flag: StopFlag) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        if pdist.is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, self.out_dir / "config.yaml")
        stopped = "completed"
        for epoch in range(s.epoch, cfg.train.epochs):
            if cfg.train.max_steps and s.step >= cfg.train.max_steps:
                stopped = "max_steps"
                break
            s.epoch = epoch
            start_epoch(self.train_loader, cfg.train.seed, epoch)
            t0 = time.perf_counter()
            self.last_train = train_one_epoch(self.step, self.train_loader, self.scheduler, epoch, s, cfg.train,
                                              stop_flag)
            if s.interrupted:
                raise TrainingInterrupted(s.interrupted, s.step, self.save_last())
            hit_max = bool(cfg.train.max_steps and s.step >= cfg.train.max_steps)
            if s.epoch_step >= len(self.train_loader) or not hit_max:
                s.epoch, s.epoch_step, s.loss_sums, s.loss_count = epoch + 1, 0, [], 0
            # else: stopped inside the epoch by max_steps; last.pt keeps the position so a resume with a
            # larger train.max_steps continues exactly there
            self._end_of_epoch(epoch, time.perf_counter() - t0)
            val = None
            if (epoch + 1) % cfg.train.val_interval == 0 or epoch + 1 == cfg.train.epochs or hit_max:
                val = self._validate(epoch)
            early = pdist.broadcast_flag(cfg.train.patience > 0 and self.bad_evals >= cfg.train.patience)
            self.save_last()
            if self.report is not None and pdist.is_main():
                self.report(epoch, {**self.last_train, **(val or {}), "epoch": epoch})
            if pdist.any_flag(stop_flag.is_set()):
                signum = stop_flag.signum or int(signal.SIGTERM)
                raise TrainingInterrupted(signum, s.step, self.out_dir / "last.pt")
            if early:
                log.info("early stopping: no mAP improvement in %d validations (best %.4f at epoch %d)",
                         self.bad_evals, self.best["mAP"], self.best["epoch"])
                stopped = "early_stop"
                break
            if hit_max:
                stopped = "max_steps"
                break
        return self._finish(stopped)

    def _end_of_epoch(self, epoch: int, seconds: float) -> None:
        t = self.last_train
        eta = (self.cfg.train.epochs - epoch - 1) * seconds
        its = t.get("steps", 0) / max(seconds, 1e-9)
        log.info("epoch %d/%d done in %.1f s (%.2f it/s, %.1f img/s): loss %.4f, lr %.3e, "
                 "%d non-finite steps skipped so far, eta %s", epoch, self.cfg.train.epochs, seconds, its,
                 t.get("images_per_s", 0.0), t.get("loss", float("nan")), t.get("lr", 0.0),
                 self.state.nonfinite_total, hms(eta))
        if pdist.is_main():
            losses = {k: v for k, v in t.items() if k.startswith(("loss", "aux"))}
            row = {"epoch": epoch, "step": self.state.step, **losses, "lr": t.get("lr", 0.0)}
            append_plot_row(self.out_dir / "plots" / "train_loss.csv", row)

    def _validate(self, epoch: int) -> dict[str, Any]:
        eval_model = self.ema.module if self.ema is not None else self.model
        broadcast_module(eval_model)
        want_panel = type(self.tracker) is not Tracker and self.cfg.tracking.num_images > 0
        detector = ModuleDetector(eval_model, self.cfg, self.device, self.amp_dtype)
        metrics = evaluate_detector(detector, self.cfg, return_detections=want_panel)
        detections = metrics.pop("detections", [])
        metrics = {k: v for k, v in metrics.items() if k not in DESCRIPTION_KEYS}
        self.last_eval = metrics
        improved = metrics["mAP"] > self.best["mAP"]
        if improved:
            self.best = {"mAP": metrics["mAP"], "epoch": epoch, "metrics": metrics}
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        log.info("epoch %d val: mAP %.4f AP50 %.4f (best %.4f at epoch %d)", epoch, metrics["mAP"],
                 metrics.get("AP50", float("nan")), self.best["mAP"], self.best["epoch"])
        if pdist.is_main():
            append_plot_row(self.out_dir / "plots" / "val_map.csv",
                            {"epoch": epoch, "step": self.state.step, **_numbers(metrics)})
            if improved:
                self._save_best(epoch, metrics)
            panel = self._panel(detections) if want_panel else ()
            self.tracker.log_eval(metrics, self.state.step, epoch, panel)
        return metrics

    def _panel(self, detections: list[dict]) -> list[dict]:
        gt_json = prepared_json(self.cfg, "val")
        coco, names = load_gt(gt_json)
        return build_panel(detections, coco, Path(gt_json).parent, names, self.cfg.tracking.num_images,
                           score_thr=self.cfg.eval.confusion_score)

    def _save_best(self, epoch: int, metrics: dict) -> None:
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                 "config": to_dict(self.cfg), "epoch": epoch, "step": self.state.step,
                 "best_map": metrics["mAP"], "metrics": _numbers(metrics),
                 "tracking_run_id": self.tracker.run_id}
        save_checkpoint(self.out_dir / "best.pt", state, keep_prev=False)

    def _finish(self, stopped: str) -> dict[str, Any]:
        summary = {"stopped": stopped, "epochs_completed": self.state.epoch, "steps": self.state.step,
                   "nonfinite_skipped": self.state.nonfinite_total, "best_map": self.best["mAP"],
                   "best_epoch": self.best["epoch"], "best": _numbers(self.best["metrics"]),
                   "final": _numbers(self.last_eval), "train": _numbers(self.last_train),
                   "per_class_AP": dict(self.best["metrics"].get("per_class_AP") or {}),
                   "out_dir": str(self.out_dir)}
        if pdist.is_main():
            # details.json: everything; metrics.json (the DVC metric, written last): the headline numbers
            write_metrics_json(self.out_dir / "details.json", summary)
            write_metrics_json(self.out_dir / "metrics.json", train_headline(summary))
            best = self.out_dir / "best.pt"
            if best.exists():
                self.tracker.log_model(best, {"mAP": self.best["mAP"], "epoch": self.best["epoch"]})
        log.info("training %s after %d epochs / %d steps; best mAP %.4f at epoch %d; artefacts in %s",
                 stopped, self.state.epoch, self.state.step, self.best["mAP"], self.best["epoch"],
                 self.out_dir)
        return summary


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------------- API
def train(cfg: Config, report: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train with ``cfg``; returns the summary also written to ``<out_dir>/metrics.json``.

    ``report(epoch, metrics)`` is called on rank 0 after every epoch (train losses, and val metrics
    on validation epochs). Raises TrainingInterrupted after SIGTERM/SIGINT (last.pt saved).
    """
    device = pdist.select_device(cfg.train.device)
    created = not pdist.is_dist() and pdist.init_distributed(device, cfg.train.dist_timeout_s)
    stop_flag = StopFlag()
    run: _Run | None = None
    exit_code = 1
    try:
        with _SignalHandlers(stop_flag):
            run = _Run(cfg, device, report)
            summary = run.fit(stop_flag)
        exit_code = 0
        return summary
    except TrainingInterrupted as err:
        exit_code = err.exit_code
        raise
    finally:
        if run is not None:
            run.tracker.finish(exit_code)
        if created:
            pdist.cleanup()
