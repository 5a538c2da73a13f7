"""Hyperparameter sweeps with Ray Tune: ``python -m pipeline.tune sweep=NAME [options] [config overrides]``.

Options (``key=value``, everything else is a config override passed to :func:`pipeline.config.compose`):
  sweep=NAME|FILE.yaml   the search space (sweeps/NAME.yaml)                      required
  out=DIR                results, Ray experiment and trial folders              runs/tune/<sweep name>
  resume=auto|true|false auto: continue the experiment in DIR when there is one; true: it must exist;
                         false: refuse to touch an existing one                    auto
  experiment_dir=DIR     where best_<sweep>.yaml is written                          conf/experiment
  ray_address=ADDR       auto | host:port | ray://host:port: join a running cluster (paths must be shared;
                         a 127.0.0.1/localhost address keeps this driver on loopback too); default: a
                         local Ray with this machine's CPUs/GPUs, bound to 127.0.0.1 only
  ray_tmp=DIR            Ray's session folder (logs, sockets); default a temporary folder removed at the end

Every trial calls :func:`pipeline.train.train` - the same function ``python -m pipeline.train`` runs - with
``train.out_dir`` inside its trial folder, validation every epoch and ``train.resume=auto``; each validation
is reported to Tune with a checkpoint (last.pt, best.pt) so a retried, paused or restored trial continues
where it stopped. With ``workers_per_trial > 1`` a trial is a Ray Train TorchTrainer with that many
DDP workers; rank 0's reports reach Tune through a queue.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from pipeline.config import CONF_DIR, PRETRAINED_IMAGENET, compose
from pipeline.data.prepare import prepare
from pipeline.errors import UserError
from pipeline.logging import get_logger
from pipeline.tune.results import (
    add_model_costs,
    base_experiment,
    collect_rows,
    expected_trials,
    write_best_experiment,
    write_results,
)
from pipeline.tune.space import (
    SweepError,
    format_value,
    load_sweep,
    param_space,
    validate_space,
)
from pipeline.tune.trial import INJECT_ENV, TIME_ATTR, run_trial, trial_dirname

log = get_logger(__name__)

OPTIONS = ("sweep", "out", "resume", "experiment_dir", "ray_address", "ray_tmp")
MAX_RAY_TMP = 40  # <ray_tmp>/session_<date>_<pid>/sockets/plasma_store must stay under 107 bytes
PATH_KEYS = ("data.prepared_dir", "data.root", "train.init_from", "model.backbone.pretrained")


@dataclass
class Args:
    sweep: str
    out: Path | None = None
    resume: str = "auto"
    experiment_dir: Path = CONF_DIR / "experiment"
    ray_address: str | None = None
    ray_tmp: Path | None = None
    overrides: tuple[str, ...] = ()


def parse_args(argv: list[str]) -> Args:
    """Split ``key=value`` options from config overrides (no argparse: overrides look alike)."""
    found: dict[str, str] = {}
    overrides = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key in OPTIONS and eq:
            found[key] = value
        elif eq:
            overrides.append(arg)
        else:
            raise SweepError(f"argument {arg!r} is not key=value; usage: python -m pipeline.tune sweep=NAME "
                             f"[{' | '.join(o + '=...' for o in OPTIONS[1:])}] [config overrides]")
    if not found.get("sweep"):
        raise SweepError("missing sweep=NAME (a file in sweeps/, e.g. sweep=demo_cpu, or a path to a .yaml)")
    if len(found.get("ray_tmp", "")) > MAX_RAY_TMP:
        raise SweepError(f"ray_tmp={found['ray_tmp']}: Ray puts Unix sockets ~65 characters deep inside it and "
                         f"socket paths are limited to 107 bytes; use a folder of at most {MAX_RAY_TMP} characters "
                         "such as /tmp/ray-sweep")
    if found.get("resume", "auto") not in ("auto", "true", "false"):
        raise SweepError(f"resume={found['resume']!r}: use auto, true or false")
    return Args(sweep=found["sweep"], out=Path(found["out"]).resolve() if found.get("out") else None,
                resume=found.get("resume", "auto"),
                experiment_dir=Path(found.get("experiment_dir") or CONF_DIR / "experiment").resolve(),
                ray_address=found.get("ray_address") or None,
                ray_tmp=Path(found["ray_tmp"]).absolute() if found.get("ray_tmp") else None,
                overrides=tuple(overrides))


def absolute_paths(overrides: list[str]) -> list[str]:
    """Overrides that pin relative data/weight paths to this directory: trials run elsewhere (their cwd
    is a Ray folder), and a cluster needs them on shared storage anyway."""
    cfg = compose(overrides)
    extra = []
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if key == "model.backbone.pretrained" and value == PRETRAINED_IMAGENET:
            continue  # a keyword (torchvision's weights), not a path
        if value and not os.path.isabs(str(value)):
            extra.append(f"{key}={Path(str(value)).resolve()}")
    return extra


# -------------------------------------------------------------------------------------- driver
def loopback(address: str | None) -> bool:
    """True for no address (a local Ray) and for a cluster address on 127.0.0.0/8 or localhost."""
    if address is None:
        return True
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def ray_environment(args: Args) -> None:
    """Environment Ray reads when it is first imported: call before any ``import ray``."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray accepts exactly 0 or 1
    if loopback(args.ray_address):
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node address 127.0.0.1: nothing binds elsewhere


def init_ray(args: Args, tmp_dir: Path) -> None:
    """Local Ray on 127.0.0.1 with this machine's CPUs (and GPUs), or join ``ray_address``."""
    ray_environment(args)
    import ray  # optional heavy dependency, only for a sweep

    if args.ray_address:
        # on a loopback cluster the driver's own services must find (and bind) the nodes' 127.0.0.1
        client = args.ray_address.startswith("ray://")  # Ray Client: this process starts no Ray services
        local = {"_node_ip_address": "127.0.0.1"} if loopback(args.ray_address) and not client else {}
        ray.init(address=args.ray_address, configure_logging=False, log_to_driver=True, **local)
        return
    ray.init(num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", _temp_dir=str(tmp_dir), configure_logging=False)


def build_tuner(sweep: Any, plan: dict, exp_dir: Path, restore: bool, epochs: int) -> Any:
    from ray import tune  # ray is optional and heavy: imported only when a sweep runs
    from ray.tune.schedulers import (  # ray is optional and heavy: imported only when a sweep runs
        ASHAScheduler,
        FIFOScheduler,
    )

    trainable = tune.with_parameters(run_trial, plan=plan)
    if plan["workers_per_trial"] > 1:  # the trial itself only drives the TorchTrainer workers
        trainable = tune.with_resources(trainable, {"cpu": 0.1})
    else:
        trainable = tune.with_resources(trainable, {"cpu": sweep.resources["cpu"], "gpu": sweep.resources["gpu"]})
    if restore:
        return tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
    if sweep.scheduler["type"] == "asha":
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=sweep.scheduler["max_t"] or epochs,
                                  grace_period=sweep.scheduler["grace_period"],
                                  reduction_factor=sweep.scheduler["reduction_factor"])
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable, param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent, scheduler=scheduler,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(exp_dir.parent), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _check_resume(args: Args, exp_dir: Path, fingerprint: dict) -> bool:
    """True when an existing experiment is to be continued; refuses a changed sweep."""
    ray_environment(args)
    from ray import tune  # ray is optional and heavy: imported only when a sweep runs

    stamp = exp_dir.parent / "sweep.json"
    exists = tune.Tuner.can_restore(str(exp_dir))
    if args.resume == "true" and not exists:
        raise SweepError(f"resume=true but there is no sweep to continue in {exp_dir}")
    if exists and args.resume == "false":
        raise SweepError(f"{exp_dir} already holds a sweep: pass resume=auto to continue it, or another out=")
    if exists and stamp.exists():
        before = json.loads(stamp.read_text())
        if before != fingerprint:
            raise SweepError(f"{exp_dir} holds a sweep started with a different search space or overrides "
                             f"(before: {before}; now: {fingerprint}); use another out= or delete the folder")
    return exists


def prepare_data(overrides: list[str]) -> None:
    """The built-in dataset is generated once here, not by concurrent trials."""
    cfg = compose(overrides)
    if (Path(cfg.data.prepared_dir) / "train.json").exists():
        return
    log.info("preparing the dataset into %s", cfg.data.prepared_dir)
    prepare(cfg)


def run_sweep(args: Args) -> int:
    sweep = load_sweep(args.sweep)
    user_overrides = [*sweep.base_overrides, *args.overrides]
    n_checked = validate_space(sweep, user_overrides)
    log.info("%s: %d combinations of the search space compose cleanly", sweep.path, n_checked)
    overrides = user_overrides + absolute_paths(user_overrides)
    out = args.out or Path("runs/tune").resolve() / sweep.name
    exp_dir = out / "ray"
    fingerprint = {"sweep": yaml.safe_load(sweep.path.read_text()), "overrides": user_overrides}
    restore = _check_resume(args, exp_dir, fingerprint)
    plan = {"sweep": sweep, "exp_dir": str(exp_dir), "overrides": overrides, "metric": sweep.metric,
            "workers_per_trial": sweep.workers_per_trial, "resources": sweep.resources,
            "inject_failure": os.environ.get(INJECT_ENV) or None, "driver_pid": os.getpid()}
    prepare_data(overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(fingerprint, indent=1))
    tmp_dir = args.ray_tmp or Path(tempfile.mkdtemp(prefix="ray-"))
    start = time.perf_counter()
    init_ray(args, tmp_dir)
    try:
        log.info("%s sweep %s in %s", "continuing" if restore else "starting", sweep.name, exp_dir)
        grid = build_tuner(sweep, plan, exp_dir, restore, compose(overrides).train.epochs).fit()
    finally:
        import ray  # ray is optional and heavy: imported only when a sweep runs

        ray.shutdown()
        if args.ray_tmp is None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return write_report(sweep, args, grid, user_overrides, out, time.perf_counter() - start)


# ------------------------------------------------------------------------------------- results
def write_report(sweep: Any, args: Args, grid: Any, user_overrides: list[str], out: Path, seconds: float) -> int:
    """results.csv/.md and, when the sweep is complete, the best experiment file. Returns the exit code."""
    rows, configs = collect_rows(sweep, grid, out / "ray", user_overrides)
    add_model_costs(rows, configs)
    best_file = args.experiment_dir / f"best_{sweep.name}.yaml"
    missing = expected_trials(sweep) - sum(r.status != "unfinished" for r in rows)
    header = [f"# Sweep `{sweep.name}` ({sweep.path})", "",
              (f"- metric: {sweep.metric} ({sweep.mode}), best validation epoch per trial; {len(rows)} trials, "
               f"{sum(r.status == 'error' for r in rows)} errored, wall time {seconds:.0f} s"),
              f"- base overrides: {' '.join(user_overrides) or '(none)'}",
              "- params/GFLOPs: inference graph; CPU latency: eager, batch 1, 1 thread, median of 10, after the sweep"]
    if missing > 0:
        header.insert(2, f"- INTERRUPTED: {missing} of {expected_trials(sweep)} trials unfinished; run the same "
                         "command again (resume=auto) to continue")
    rows = write_results(out, rows, sweep.metric, sweep.mode, header)
    best = next((r for r in rows if r.metrics.get(sweep.metric) is not None and r.status != "error"), None)
    if missing > 0:
        print(f"sweep interrupted with {missing} trials unfinished: partial results in {out / 'results.md'}; "
              "run the same command again to continue", file=sys.stderr)
        return 130
    if best is None:
        print(f"no trial ran to its end with a {sweep.metric}; see {out / 'results.md'} (errors are listed "
              "there); fix the cause and run the same command again to retry the failed trials", file=sys.stderr)
        return 1
    # every key of the row as the best trial trained it (not re-derived from its sampled keys)
    cfg = compose([*user_overrides, *(f"{key}={format_value(value)}" for key, value in best.values.items())])
    comment = [(f"Best trial {best.trial_id} of sweep {sweep.name} ({sweep.path.name}): "
                f"{sweep.metric}={best.metrics[sweep.metric]:.4f} at epoch {best.best_epoch}."),
               f"Written by `python -m pipeline.tune`; train it with: python -m pipeline.train experiment={best_file.stem}"]
    write_best_experiment(best_file, cfg, base_experiment(user_overrides), compose, comment)
    with open(out / "results.md", "a") as fh:
        fh.write(f"\nBest: trial {best.trial_id}, {sweep.metric}={best.metrics[sweep.metric]:.4f}; "
                 f"experiment file {best_file} (`python -m pipeline.train experiment={best_file.stem}`)\n")
    print((out / "results.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    try:
        return run_sweep(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
