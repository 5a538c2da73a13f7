"""Time to accuracy behind ``python -m pipeline.bench tta``: train one recipe on one dataset, validating every
epoch, and record (epoch, wall seconds since launch, val mAP) -- ours, and optionally the official NanoDet-Plus
``tools/train.py`` on the same prepared data with the same recipe, one run after the other on this machine.

Ours runs as ``python -m pipeline.train`` in a subprocess; the wall clock of each validation is the moment its
log line ("epoch E val: mAP ...") arrives, the numbers are read from ``plots/val_map.csv``. The official side
runs through ``../shared/anchors``: ``nd_make_config.py`` (data, classes, input size, batch, epochs, warm-up, lr)
from a base YAML that this module derives from ``config/nanodet-plus-m_320.yml`` with our model's widths and
strides, then ``tools/train.py --seed S`` with the log parsed by ``nd_parse_log.py --start``. Both sides get the
same data (our ``prepare`` output, written as ``train/ val/ instances_{train,val}.json`` for the official
COCO loader), threads and seeds. Output: one JSON (``tta.json``) and one plot (``tta.png``) of both curves.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, compose
from pipeline.data.prepare import prepare
from pipeline.errors import UserError
from pipeline.io import atomic_write
from pipeline.perf import cpu_info

VAL_LINE = re.compile(r"epoch (\d+) val: mAP ([0-9.]+)")
SHUFFLENET_CHANNELS = {"0.5x": [48, 96, 192], "1.0x": [116, 232, 464], "1.5x": [176, 352, 704]}


class TtaError(UserError, RuntimeError):
    """A time-to-accuracy run that cannot start or failed; the message names the side, seed and log file."""


@dataclass(frozen=True)
class Official:
    """Where the official reference lives (../shared/anchors/README.md sets it up)."""

    python: Path  # the reference venv's python
    src: Path  # NANODET_SRC: a nanodet checkout
    anchors: Path  # ../shared/anchors

    def check(self) -> None:
        for what, path in (("--official-python", self.python), ("--nanodet-src", self.src / "tools" / "train.py"),
                           ("--anchors", self.anchors / "nd_make_config.py")):
            if not path.exists():
                raise TtaError(f"{what}: {path} does not exist; set up the official reference as in "
                               f"../shared/anchors/README.md or leave out --official")


# ------------------------------------------------------------------------------------------- data
def official_coco_layout(prepared_dir: Path, out: Path) -> Path:
    """``<out>/{train,val}/`` (links to the images) + ``instances_{train,val}.json`` from our prepared
    COCO files: the layout nd_make_config.py's ``--data-root`` expects. Returns ``out``."""
    for split in ("train", "val"):
        coco = json.loads((prepared_dir / f"{split}.json").read_text())
        img_dir = out / split
        img_dir.mkdir(parents=True, exist_ok=True)
        for im in coco["images"]:
            src = Path(im["file_name"])
            src = src if src.is_absolute() else (prepared_dir / src)
            link = img_dir / f"{im['id']}_{src.name}"
            if not link.exists():
                link.symlink_to(src.resolve())
            im["file_name"] = link.name
        atomic_write(out / f"instances_{split}.json", json.dumps(coco))
    return out


# ------------------------------------------------------------------------------------ the recipe
def official_base_yaml(cfg: Config, official_yaml: Path, out: Path) -> Path:
    """The official nanodet-plus-m_320.yml with our model's sizes (backbone width, neck/head/aux channels,
    strides, reg_max, detach epoch), our augmentation, EMA decay and optimiser settings; what
    nd_make_config.py does not set (data, epochs, warm-up steps, lr) it sets itself."""
    c = yaml.safe_load(official_yaml.read_text())
    m, arch = cfg.model, c["model"]["arch"]
    if m.backbone.size not in SHUFFLENET_CHANNELS:
        raise TtaError(f"model.backbone.size={m.backbone.size}: the official backbone has "
                       f"{sorted(SHUFFLENET_CHANNELS)}")
    arch["detach_epoch"] = m.detach_epoch
    arch["backbone"]["model_size"] = m.backbone.size
    arch["fpn"].update(in_channels=SHUFFLENET_CHANNELS[m.backbone.size], out_channels=m.neck.out_channels,
                       kernel_size=m.neck.kernel_size, num_extra_level=len(m.head.strides) - 3)
    arch["head"].update(input_channel=m.neck.out_channels, feat_channels=m.head.feat_channels,
                        stacked_convs=m.head.stacked_convs, kernel_size=m.head.kernel_size,
                        strides=list(m.head.strides), reg_max=m.head.reg_max)
    arch["aux_head"].update(input_channel=2 * m.neck.out_channels, feat_channels=m.aux_head.feat_channels,
                            stacked_convs=m.aux_head.stacked_convs, strides=list(m.head.strides),
                            reg_max=m.head.reg_max)
    c["model"]["weight_averager"]["decay"] = cfg.train.ema_decay
    a, pipe = cfg.data.augment, c["data"]["train"]["pipeline"]
    pipe.update(scale=list(a.scale), stretch=[list(a.stretch), list(a.stretch)], translate=a.translate,
                flip=a.flip, brightness=a.brightness, contrast=list(a.contrast), saturation=list(a.saturation))
    for split in ("train", "val"):
        c["data"][split]["keep_ratio"] = bool(cfg.data.keep_ratio)
    sched = c["schedule"]
    sched["optimizer"]["weight_decay"] = cfg.train.weight_decay
    sched["warmup"]["ratio"] = cfg.train.warmup_ratio
    sched["lr_schedule"]["eta_min"] = cfg.train.min_lr
    c["grad_clip"] = cfg.train.grad_clip
    atomic_write(out, yaml.safe_dump(c, sort_keys=False))
    return out


def our_overrides(overrides: list[str], seed: int, out_dir: Path, prepared: Path) -> list[str]:
    return [*overrides, f"data.prepared_dir={prepared}", f"train.out_dir={out_dir}", f"hydra.run.dir={out_dir}",
            "train.val_interval=1", f"train.seed={seed}", "train.resume=never", "tracking.mode=disabled"]


# ------------------------------------------------------------------------------------------ runs
def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    return env


def run_ours(overrides: list[str], seed: int, out_dir: Path, prepared: Path, threads: int) -> dict[str, Any]:
    """Train ours once; ``{"side", "seed", "wall_s", "rows": [{epoch, elapsed_s, mAP, AP50}]}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "tta_train.log"
    cmd = [sys.executable, "-m", "pipeline.train", *our_overrides(overrides, seed, out_dir, prepared)]
    seen: dict[int, float] = {}
    t0 = time.monotonic()
    with open(log_path, "w", buffering=1) as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                       text=True, env=_env(threads)) as proc:
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            m = VAL_LINE.search(line)
            if m:
                seen[int(m.group(1))] = time.monotonic() - t0
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise TtaError(f"ours, seed {seed}: training exited with {proc.returncode}; see {log_path}")
    rows = []
    with open(out_dir / "plots" / "val_map.csv") as f:
        for r in csv.DictReader(f):
            ep = int(r["epoch"])
            rows.append({"epoch": ep + 1, "elapsed_s": round(seen.get(ep, float("nan")), 1),
                         "mAP": round(float(r["mAP"]), 4), "AP50": round(float(r["AP50"]), 4)})
    return {"side": "ours", "seed": seed, "wall_s": round(wall, 1), "rows": rows, "log": str(log_path)}


def run_official(ref: Official, base_yaml: Path, cfg: Config, data_root: Path, seed: int, out_dir: Path,
                 threads: int) -> dict[str, Any]:
    """Train the official tools/train.py once, same recipe; same result structure as :func:`run_ours`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(_env(threads), NANODET_SRC=str(ref.src), PYTHONPATH=str(ref.src))  # tools/train.py imports nanodet
    names = ",".join(json.loads((data_root / "instances_train.json").read_text())["categories"][i]["name"]
                     for i in range(cfg.model.num_classes))
    w, h = cfg.data.input_size
    if w != h:
        raise TtaError(f"data.input_size={list(cfg.data.input_size)}: nd_make_config.py sets square sizes only")
    yml = out_dir / "official.yml"
    subprocess.run([str(ref.python), str(ref.anchors / "nd_make_config.py"), "--base", str(base_yaml),
                    "--out", str(yml), "--data-root", str(data_root), "--class-names", names,
                    "--input-size", str(w), "--batch", str(cfg.data.batch_size),
                    "--workers", str(cfg.data.num_workers), "--epochs", str(cfg.train.epochs),
                    "--val-intervals", "1", "--warmup-steps", str(cfg.train.warmup_steps),
                    "--lr", str(cfg.train.lr), "--log-interval", "5", "--save-dir", str(out_dir / "workspace")],
                   check=True, env=env, capture_output=True)
    log_path = out_dir / "official_train.log"
    start = time.time()
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        code = subprocess.run([str(ref.python), "tools/train.py", str(yml), "--seed", str(seed)], check=False, cwd=ref.src,
                              stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.monotonic() - t0
    if code != 0:
        raise TtaError(f"official, seed {seed}: tools/train.py exited with {code}; see {log_path}")
    parsed = out_dir / "official_curve.json"
    subprocess.run([str(ref.python), str(ref.anchors / "nd_parse_log.py"), str(log_path), "--start", str(start),
                    "--json", str(parsed)], check=True, env=env, capture_output=True)
    rows = [{k: r[k] for k in ("epoch", "elapsed_s", "mAP", "AP50")}
            for r in json.loads(parsed.read_text())["rows"]]
    return {"side": "official", "seed": seed, "wall_s": round(wall, 1), "rows": rows, "log": str(log_path)}


# --------------------------------------------------------------------------------------- summary
def time_to(rows: list[dict], target: float) -> float | None:
    """Wall seconds at the first validation whose mAP reaches ``target`` (None: never)."""
    return next((r["elapsed_s"] for r in rows if r["mAP"] >= target), None)


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per side: final mAPs, mean and spread, wall times; time for ours to reach the official mean final mAP."""
    out: dict[str, Any] = {}
    for side in ("ours", "official"):
        mine = [r for r in runs if r["side"] == side and r["rows"]]
        if not mine:
            continue
        finals = [r["rows"][-1]["mAP"] for r in mine]
        out[side] = {"final_mAP": finals, "final_mAP_mean": round(statistics.mean(finals), 4),
                     "final_mAP_spread": round(max(finals) - min(finals), 4),
                     "best_mAP": [max(x["mAP"] for x in r["rows"]) for r in mine],
                     "wall_s": [r["wall_s"] for r in mine]}
    if "ours" in out and "official" in out:
        target = out["official"]["final_mAP_mean"]
        ours_t = [time_to(r["rows"], target) for r in runs if r["side"] == "ours"]
        off_wall = statistics.mean(out["official"]["wall_s"])
        out["target_mAP"] = target
        out["ours_time_to_target_s"] = ours_t
        out["ours_time_to_target_vs_official_wall"] = [None if t is None else round(t / off_wall, 3) for t in ours_t]
        out["final_mAP_gap"] = round(out["ours"]["final_mAP_mean"] - target, 4)
    return out


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib  # only this function draws; the benchmark JSON does not need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display here

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs = [row["elapsed_s"] / 60 for row in r["rows"]]
        ax.plot(xs, [row["mAP"] for row in r["rows"]], marker=".",
                linestyle="-" if r["side"] == "ours" else "--", label=f"{r['side']} seed {r['seed']}")
    ax.set_xlabel("wall time since launch (min)")
    ax.set_ylabel("val mAP (COCO 0.5:0.95)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _once(run_dir: Path, overrides: list[str], run: Any) -> dict[str, Any]:
    """``run(run_dir)``, or the result a finished earlier call with the same overrides left in
    ``<run_dir>/run.json`` (a long comparison survives a failure of one side)."""
    done = run_dir / "run.json"
    if done.is_file():
        previous = json.loads(done.read_text())
        if previous.get("overrides") == overrides:
            return previous["result"]
    result = run(run_dir)
    atomic_write(done, json.dumps({"overrides": overrides, "result": result}, indent=2))
    return result


def bench_tta(overrides: list[str], out: Path, seeds: list[int], threads: int,
              official: Official | None, sides: tuple[str, ...] = ("ours", "official")) -> dict[str, Any]:
    """Prepare the data once, then train each side for each seed, one after the other; write
    ``<out>/tta.json`` and ``<out>/tta.png`` and return the JSON."""
    out = out.resolve()
    prepared = out / "prepared"
    cfg = compose([*overrides, f"data.prepared_dir={prepared}"])
    if official is not None and "official" in sides:
        official.check()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        prepare(cfg)
    report: dict[str, Any] = {"overrides": overrides, "seeds": seeds, "threads": threads,
                              "machine": {"cpu": cpu_info()["model"], "native_bf16": cpu_info()["native_bf16"],
                                          "loadavg_start": list(os.getloadavg())},
                              "recipe": {"epochs": cfg.train.epochs, "batch": cfg.data.batch_size,
                                         "input_size": list(cfg.data.input_size), "lr": cfg.train.lr,
                                         "warmup_steps": cfg.train.warmup_steps, "amp": cfg.train.amp},
                              "runs": []}
    base = None
    if official is not None and "official" in sides:
        data_root = official_coco_layout(prepared, out / "official_data")
        base = official_base_yaml(cfg, official.src / "config" / "nanodet-plus-m_320.yml", out / "official_base.yml")
    for seed in seeds:
        if "ours" in sides:
            report["runs"].append(_once(out / f"ours_seed{seed}", overrides,
                                        lambda d, s=seed: run_ours(overrides, s, d, prepared, threads)))
        if base is not None and official is not None:
            report["runs"].append(_once(out / f"official_seed{seed}", overrides, lambda d, s=seed: run_official(
                official, base, cfg, data_root, s, d, threads)))
        atomic_write(out / "tta.json", json.dumps(report, indent=2))
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["summary"] = summarize(report["runs"])
    atomic_write(out / "tta.json", json.dumps(report, indent=2))
    plot(report["runs"], out / "tta.png", " ".join(overrides)[:90])
    return report
