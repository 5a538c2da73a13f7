"""What a sweep leaves behind: the results table (csv + markdown) and the best trial as a Hydra experiment.

Each row is one trial: its sampled (and tied/derived) values as the trial actually trained them (read
from the config stored in the trial's own checkpoint, so a value that never reached training is not
reported as trained; a disagreement with what Tune sampled is named in the error column), the best
validation metric and the AP50 of that same epoch, how it ended (finished, stopped early by ASHA, error),
how often it was retried, the Ray node it ran on (node ip and id of its last attempt; results.csv also
lists every attempt's node), and the model's size and cost (parameters, FLOPs at the trained input size,
eager CPU latency at batch 1). Size and cost are measured here in the driver from the trained config,
one model at a time, so concurrent trials never skew the latency numbers.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from pipeline.config import CONF_DIR, Config, ConfigError, compose, config_hash, from_dict, to_dict
from pipeline.io import atomic_write
from pipeline.logging import get_logger
from pipeline.model import build_model
from pipeline.model.checkpoint import CheckpointError, load_checkpoint
from pipeline.model.summary import summarize
from pipeline.perf import time_calls
from pipeline.tune.space import SweepError, expand_sample, format_value, sample_overrides
from pipeline.tune.trial import TIME_ATTR, trial_dirname

log = get_logger(__name__)

# Keys never written into the best experiment: they describe one run, not the configuration found.
RUN_ONLY_KEYS = ("train.out_dir", "train.resume", "tracking")


@dataclass
class TrialRow:
    trial_id: str
    status: str  # finished [(train's own early stop)] | stopped by ASHA | error | unfinished | no result
    values: dict[str, Any]  # sampled + tied + derived keys
    metrics: dict[str, float] = field(default_factory=dict)  # metric, mAP, AP50 at the best epoch
    best_epoch: int | None = None
    epochs: int = 0  # validations reported
    failures: int = 0  # Ray's count of failed attempts (each retried while max_failures allows)
    restarts: int = 0  # times the trial started again (after a failure or when a sweep was resumed)
    error: str = ""
    params: int | None = None
    flops: int | None = None
    latency_ms: float | None = None
    trial_dir: str = ""
    nodes: list[dict] = field(default_factory=list)  # per attempt: node_id, node_ip, hostname, pid (trial.json)


# ------------------------------------------------------------------------------------- model cost
def measure_model(cfg: Config, iters: int = 10, warmup: int = 3) -> dict[str, float]:
    """Inference parameters, FLOPs (2 x conv/linear MACs) and median eager CPU latency at batch 1 (1 thread)."""
    model = build_model(cfg.model, with_aux=False, load_pretrained=False).eval()  # sizes and latency only
    width, height = (int(v) for v in cfg.data.input_size)
    summary = summarize(model, (height, width))
    images = torch.zeros(1, 3, height, width)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: comparable between trials and far less sensitive to other load
    try:
        with torch.inference_mode():
            times = time_calls(lambda: model(images), iters, warmup)
    finally:
        torch.set_num_threads(threads)
    return {"params": summary["params_inference"], "flops": summary["flops_inference"],
            "latency_ms": 1000.0 * sorted(times)[len(times) // 2]}


def add_model_costs(rows: list[TrialRow], configs: dict[str, Config]) -> None:
    """Fill params/flops/latency for every row whose config composed (one measurement per model)."""
    cache: dict[str, dict[str, float]] = {}
    for row in rows:
        cfg = configs.get(row.trial_id)
        if cfg is None:
            continue
        key = config_hash(cfg, "model") + str(list(cfg.data.input_size))
        if key not in cache:
            try:
                cache[key] = measure_model(cfg)
            except Exception as err:  # noqa: BLE001 - a model that cannot be built must not lose the whole table
                log.warning("trial %s: could not measure the model: %s", row.trial_id, err)
                cache[key] = {}
        row.params = cache[key].get("params")
        row.flops = cache[key].get("flops")
        row.latency_ms = cache[key].get("latency_ms")


# ----------------------------------------------------------------------------------- collection
def _error_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _status(ray_status: str, error: BaseException | None, last_epoch: int, epochs: int, summary: Path) -> str:
    """error | unfinished | finished [(train's own early stop)] | stopped by ASHA | no result."""
    if error is not None or ray_status == "ERROR":
        return "error"
    if ray_status != "TERMINATED":
        return "unfinished"
    if last_epoch >= epochs:
        return "finished"
    if summary.exists():  # pipeline.train stopped by itself (train.patience, train.max_steps)
        info = json.loads(summary.read_text())
        if info.get("stopped") not in ("completed", None) and info.get("epochs_completed") == last_epoch:
            return f"finished ({info['stopped']})"
    return "stopped by ASHA" if last_epoch else "no result"


def _summary_file(train_dir: Path) -> Path:
    """Training's full summary: details.json (metrics.json holds only headline numbers), or the
    metrics.json of a trial trained before details.json existed."""
    details = train_dir / "details.json"
    return details if details.exists() else train_dir / "metrics.json"


def _read_json_lines(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


TRAINED_SOURCES = ("best.pt", "last.pt", "config.yaml")  # in <trial>/train/, most authoritative first


def trained_config(train_dir: Path) -> tuple[dict | None, Path | None]:
    """The config the trial's model was trained with and the file it came from: the config stored in its
    checkpoint (best.pt: the weights the table's metric belongs to, else last.pt), else the config.yaml
    that training writes when it starts; ``(None, None)`` when the trial never got that far."""
    for name in TRAINED_SOURCES:
        path = train_dir / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".pt":
                stored = load_checkpoint(path).get("config")
            else:
                stored = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except (CheckpointError, OSError, yaml.YAMLError, ValueError) as err:
            log.warning("cannot read the trained config from %s: %s", path, err)
            continue
        if isinstance(stored, dict):
            return stored, path
    return None, None


def _same(a: Any, b: Any) -> bool:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers:
        return a == b or math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def trained_values(sampled: dict[str, Any], trained: dict | None) -> tuple[dict[str, Any], list[str]]:
    """The row's values as trained: each sampled/tied/derived key looked up in the trained config (a config
    group choice such as ``model`` is not stored there and keeps its sampled name), and the keys whose
    trained value differs from the sampled one, as ``key=trained (sampled x)``."""
    if trained is None:
        return dict(sampled), []
    tree = OmegaConf.create(trained)
    values, differ = {}, []
    absent = object()
    for key, value in sampled.items():
        found = OmegaConf.select(tree, key, default=absent)
        if found is absent or OmegaConf.is_dict(found):
            values[key] = value
            continue
        found = OmegaConf.to_container(found) if OmegaConf.is_list(found) else found
        values[key] = found
        if not _same(found, value):
            differ.append(f"{key}={format_value(found)} (sampled {format_value(value)})")
    return values, differ


def _row_config(sweep: Any, sample: dict, trained: dict | None, overrides: list[str],
                trial_id: str) -> Config | None:
    """The config whose model the row measures: the trained one; else (never trained, or stored by an
    older schema) the one the sample composes to; None when neither validates."""
    if trained is not None:
        try:
            return from_dict(trained)
        except (ConfigError, ValueError) as err:
            log.warning("trial %s: its trained config does not validate (%s); measuring the sampled one",
                        trial_id, err)
    try:
        return compose([*overrides, *sample_overrides(sweep, sample)])
    except (ConfigError, SweepError):
        return None  # the row stays without size and cost


def collect_rows(sweep: Any, grid: Any, exp_dir: Path, overrides: list[str]) -> tuple[list[TrialRow], dict]:
    """One row per trial from Ray's ResultGrid and state, and the trial's folder (result.json, trial.json,
    and the config stored in its checkpoint: the values reported are the ones the trial trained)."""
    from ray.tune import ExperimentAnalysis  # ray is optional and heavy: imported only when a sweep runs

    # by folder name: trial_<id>, or with Tune's suffix when a restore found that folder already there
    state = {getattr(t, "relative_logdir", None) or trial_dirname(t): t for t in ExperimentAnalysis(str(exp_dir)).trials}
    rows, configs = [], {}
    for result in grid:
        trial_dir = Path(result.path)
        trial = state.get(trial_dir.name)
        trial_id = trial.trial_id if trial else trial_dir.name.removeprefix("trial_")
        scored = [r for r in _read_json_lines(trial_dir / "result.json") if r.get(sweep.metric) is not None]
        record = trial_dir / "trial.json"
        info = json.loads(record.read_text()) if record.exists() else {}
        attempts = info.get("attempts", 1) if info else 0
        trained, source = trained_config(trial_dir / "train")
        values, differ = trained_values(expand_sample(sweep, result.config), trained)
        error = _error_line(result.error)
        if differ:
            log.warning("trial %s trained other values than Tune sampled (%s): %s", trial_id, source,
                        "; ".join(differ))
            error = "; ".join([*([error] if error else []), f"trained {', '.join(differ)} ({source.name})"])
        row = TrialRow(trial_id=trial_id, status="", values=values,
                       epochs=len({r.get(TIME_ATTR) for r in scored}), restarts=max(attempts - 1, 0),
                       failures=trial.num_failures if trial else 0, error=error, trial_dir=str(trial_dir),
                       nodes=info.get("nodes", []))
        if scored:
            best = (max if sweep.mode == "max" else min)(scored, key=lambda r: r[sweep.metric])
            row.metrics = {k: best[k] for k in (sweep.metric, "mAP", "AP50") if k in best}
            row.best_epoch = int(best["epoch"])
        cfg = configs[trial_id] = _row_config(sweep, result.config, trained, overrides, trial_id)
        row.status = _status(trial.status if trial else "ERROR", result.error,
                             max((int(r.get(TIME_ATTR, 0)) for r in scored), default=0),
                             cfg.train.epochs if cfg is not None else 0, _summary_file(trial_dir / "train"))
        rows.append(row)
    return rows, configs


def expected_trials(sweep: Any) -> int:
    """num_samples x the product of the grid dimensions (Tune's own count)."""
    return sweep.num_samples * math.prod(len(d.values) for d in sweep.space if d.kind == "grid")


# ------------------------------------------------------------------------------------------ table
def sort_rows(rows: list[TrialRow], metric: str, mode: str) -> list[TrialRow]:
    """Best first by ``metric`` (``mode`` max or min); trials without a value last."""
    def key(row: TrialRow) -> tuple[int, float]:
        value = row.metrics.get(metric)
        if value is None or not math.isfinite(value):
            return (1, 0.0)
        return (0, -value if mode == "max" else value)
    return sorted(rows, key=key)


def _columns(rows: list[TrialRow], metric: str) -> list[str]:
    value_keys = list(dict.fromkeys(k for row in rows for k in row.values))
    metric_keys = list(dict.fromkeys([metric, "mAP", "AP50"]))
    counts = ["best_epoch", "epochs", "failures", "restarts"]
    return (["rank", "trial_id", "status"] + metric_keys + counts + value_keys
            + ["params", "gflops", "cpu_latency_ms", "node_ip", "node_id", "error", "attempt_nodes", "trial_dir"])


CSV_ONLY = ("attempt_nodes", "trial_dir")  # long cells: results.csv only
SHORT_ID = 8  # results.md shows node ids by their first hex digits (results.csv in full)


def _cells(row: TrialRow, rank: int, columns: list[str]) -> dict[str, Any]:
    cells: dict[str, Any] = {
        "rank": rank, "trial_id": row.trial_id, "status": row.status, "best_epoch": row.best_epoch,
        "epochs": row.epochs, "failures": row.failures, "restarts": row.restarts, "params": row.params,
        "gflops": None if row.flops is None else row.flops / 1e9,
        "cpu_latency_ms": row.latency_ms, "error": row.error, "trial_dir": row.trial_dir,
        "node_ip": row.nodes[-1].get("node_ip") if row.nodes else None,
        "node_id": row.nodes[-1].get("node_id") if row.nodes else None,
        "attempt_nodes": " ".join(n.get("node_id", "?") for n in row.nodes) or None}
    cells.update({k: v for k, v in row.metrics.items() if k in columns})
    cells.update({k: format_value(v) for k, v in row.values.items()})
    return cells


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_results(out_dir: Path, rows: list[TrialRow], metric: str, mode: str, header: list[str]) -> list[TrialRow]:
    """Write ``results.csv`` and ``results.md`` (sorted best first); returns the sorted rows."""
    rows = sort_rows(rows, metric, mode)
    columns = _columns(rows, metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for rank, row in enumerate(rows, 1):
            cells = _cells(row, rank, columns)
            writer.writerow({c: ("" if cells.get(c) is None else cells.get(c)) for c in columns})
    shown = [c for c in columns if c not in CSV_ONLY]
    lines = [*header, "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for rank, row in enumerate(rows, 1):
        cells = _cells(row, rank, columns)
        cells["node_id"] = cells["node_id"] and cells["node_id"][:SHORT_ID]
        text = (_fmt(cells.get(c)).replace("|", "\\|").replace("\n", " ") for c in shown)
        lines.append("| " + " | ".join(text) + " |")
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    return rows


# ------------------------------------------------------------------------------ best experiment
def default_experiment() -> str | None:
    """The experiment that conf/config.yaml selects when none is given."""
    raw = yaml.safe_load((CONF_DIR / "config.yaml").read_text())
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict) and "experiment" in entry:
            return entry["experiment"]
    return None


def base_experiment(overrides: list[str]) -> str | None:
    """The experiment the overrides select (the last ``experiment=`` wins), else the default."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == "experiment"]
    if chosen:
        return None if chosen[-1] in ("null", "") else chosen[-1]
    return default_experiment()


def leaf_diff(new: dict, old: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict of the leaves of ``new`` that differ from ``old`` (lists compared whole)."""
    out: dict[str, Any] = {}
    for key, value in new.items():
        full = f"{prefix}{key}"
        if any(full == skip or full.startswith(skip + ".") for skip in RUN_ONLY_KEYS):
            continue
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = leaf_diff(value, old[key], full + ".")
            if sub:
                out[key] = sub
        elif value != old.get(key, object()):
            out[key] = value
    return out


def write_best_experiment(path: Path, best: Config, base_exp: str | None, compose_fn: Any,
                          comment: list[str]) -> Path:
    """Write ``best`` as a Hydra experiment: ``defaults: [<base_exp>, _self_]`` + the keys that differ.

    ``compose_fn(overrides) -> Config`` composes the base to diff against. When the base experiment is
    the file being written (a sweep around a previous best), the file becomes self-contained instead
    of including itself.
    """
    name = path.stem
    if base_exp == name or base_exp is None:
        base_cfg, defaults = compose_fn(["~experiment"]), ["_self_"]
    else:
        base_cfg, defaults = compose_fn([f"experiment={base_exp}"]), [base_exp, "_self_"]
    body = leaf_diff(to_dict(best), to_dict(base_cfg))
    text = "# @package _global_\n" + "".join(f"# {line}\n" for line in comment)
    text += yaml.safe_dump({"defaults": defaults}, sort_keys=False, default_flow_style=False)
    if body:
        text += yaml.safe_dump(body, sort_keys=False, default_flow_style=None)
    atomic_write(path, text)
    return path
