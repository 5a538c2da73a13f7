"""One Ray Tune trial: the function trainable that runs :func:`pipeline.train.train` and reports to Tune.

A trial's folder is ``<experiment>/trial_<id>/``: ``train/`` is ``train.out_dir`` (last.pt, best.pt,
metrics.json, plots), ``trial.json`` counts the attempts, holds the overrides and, per attempt, the Ray
node it ran on (``nodes``: node id, node ip, hostname, pid; on a cluster the results table shows it), Ray adds its own
``result.json``/``progress.csv`` and ``checkpoint_*``. Every validation is reported with last.pt and best.pt
as Tune checkpoint; a (re)started trial always continues from its last *reported* checkpoint.

With ``workers_per_trial > 1`` the trial drives a Ray Train TorchTrainer: every worker runs
``pipeline.train.train`` as one DDP rank (Ray Train sets up the process group and RANK/LOCAL_RANK/
WORLD_SIZE); rank 0's reports travel back to the trial through a Ray queue.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from pipeline.config import compose
from pipeline.io import atomic_write
from pipeline.logging import get_logger
from pipeline.train import train
from pipeline.tune.space import SweepError, format_value, sample_overrides

# Test hook: after a report, "once" fails each trial's first attempt, "always" every attempt, "interrupt"
# sends SIGINT to the driver once per sweep (as Ctrl-C would).
INJECT_ENV = "NANODET_TUNE_INJECT_FAILURE"
TIME_ATTR = "epochs_done"  # ASHA's clock: validations completed (val_interval is 1 in trials)

log = get_logger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by the NANODET_TUNE_INJECT_FAILURE test hook."""


def trial_dirname(trial: Any) -> str:
    """``trial_<id>`` for a Tune Trial or a trial id (also Tune's trial_dirname_creator)."""
    return f"trial_{trial if isinstance(trial, str) else trial.trial_id}"


def trial_overrides(plan: dict, params: dict, trial_dir: Path, trial_id: str) -> list[str]:
    sweep = plan["sweep"]
    return [*plan["overrides"], *sample_overrides(sweep, params),
            f"train.out_dir={trial_dir / 'train'}", "train.val_interval=1", "train.resume=auto",
            f"tracking.group={format_value(sweep.name)}", f"tracking.name={format_value(trial_id)}",
            f"tracking.dir={trial_dir}"]


def snapshot(out_dir: Path) -> Path:
    """A folder in ``out_dir`` with copies of last.pt/best.pt as they are right after an epoch (training
    goes on overwriting them); Tune copies it into the trial's checkpoint and it is then deleted."""
    folder = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    for name in ("last.pt", "best.pt"):
        if (out_dir / name).exists():
            shutil.copy2(out_dir / name, folder / name)
    return folder


class _Reporter:
    """Hands one epoch to Tune: numeric metrics plus a snapshot folder of last.pt/best.pt as checkpoint.

    The last epoch is held back until training has returned: Tune may stop a trial at any report (ASHA
    at max_t), which ends the training thread inside the report, before pipeline.train writes
    metrics.json and closes its W&B run.
    """

    def __init__(self, plan: dict, attempt: int, epochs: int):
        self.plan, self.attempt, self.epochs = plan, attempt, epochs
        self.held: tuple[int, dict, Path] | None = None

    def __call__(self, epoch: int, metrics: dict, folder: Path) -> None:
        if epoch + 1 >= self.epochs:
            self.held = (epoch, metrics, folder)
            return
        self._send(epoch, metrics, folder)

    def flush(self) -> None:
        """Send the held-back last epoch (after training returned)."""
        if self.held is not None:
            held, self.held = self.held, None
            self._send(*held)

    def _send(self, epoch: int, metrics: dict, folder: Path) -> None:
        from ray import tune  # ray is optional and heavy: imported only when a sweep runs

        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.plan["metric"] not in numbers:
            shutil.rmtree(folder, ignore_errors=True)
            raise SweepError(f"{self.plan['sweep'].path}: metric '{self.plan['metric']}' is not among what training "
                             f"reports ({', '.join(sorted(numbers))})")
        numbers["epoch"], numbers[TIME_ATTR] = epoch, epoch + 1
        try:
            tune.report(numbers, checkpoint=tune.Checkpoint.from_directory(str(folder)))  # copied to storage
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        inject = self.plan.get("inject_failure")
        if inject == "interrupt" and _first_time(Path(self.plan["exp_dir"]) / ".injected_interrupt"):
            os.kill(self.plan["driver_pid"], signal.SIGINT)  # as if the user pressed Ctrl-C in the driver
        if inject == "always" or (inject == "once" and self.attempt == 1):
            raise InjectedFailure(f"injected failure ({INJECT_ENV}={inject}) after epoch {epoch}, attempt {self.attempt}")


def _first_time(marker: Path) -> bool:
    """True for exactly one caller across processes (atomic exclusive create)."""
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    return True


def _restore_from_checkpoint(out_dir: Path) -> None:
    """Start a (re)started trial from its last *reported* state: Tune's checkpoint when there is one,
    else from scratch. Training may have gone on after the last report (a trial is stopped only at its
    next report), and resuming from that later last.pt would leave those epochs unreported."""
    from ray import tune  # ray is optional and heavy: imported only when a sweep runs

    checkpoint = tune.get_checkpoint()
    for name in ("last.pt", "last.pt.prev", "best.pt"):
        (out_dir / name).unlink(missing_ok=True)
    for stale in out_dir.glob(".report-*"):  # snapshots of an attempt killed mid-report
        shutil.rmtree(stale, ignore_errors=True)
    if checkpoint is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        for name in ("last.pt", "best.pt"):
            if (Path(folder) / name).exists():
                shutil.copy2(Path(folder) / name, out_dir / name)


def run_trial(params: dict, plan: dict) -> None:
    """The Ray Tune function trainable: one call of pipeline.train.train (or a TorchTrainer around it)."""
    from ray import tune  # ray is optional and heavy: imported only when a sweep runs

    context = tune.get_context()
    trial_id = context.get_trial_id()
    # The trial's folder in the experiment (not Ray's per-session working copy, whose name it shares): it
    # survives restores. Usually trial_<id>; Tune adds a suffix when that folder exists but its saved state
    # does not know it (a driver killed after the trial started but before Tune saved that it had).
    trial_dir = Path(plan["exp_dir"]) / Path(context.get_trial_dir()).name
    trial_dir.mkdir(parents=True, exist_ok=True)
    record = trial_dir / "trial.json"
    info = json.loads(record.read_text()) if record.exists() else {"attempts": 0}
    info["attempts"] += 1
    overrides = trial_overrides(plan, params, trial_dir, trial_id)
    info["overrides"] = overrides
    node = node_info()
    info.setdefault("nodes", []).append(node)
    atomic_write(record, json.dumps(info, indent=1))
    log.info("trial %s attempt %d on node %s (%s, %s)", trial_id, info["attempts"], node["node_id"],
             node["node_ip"], node["hostname"])
    out_dir = trial_dir / "train"
    _restore_from_checkpoint(out_dir)
    cfg = compose(overrides)
    reporter = _Reporter(plan, info["attempts"], cfg.train.epochs)
    if plan["workers_per_trial"] > 1:
        _train_with_workers(overrides, plan, reporter)
    else:
        train(cfg, report=lambda epoch, metrics: reporter(epoch, metrics, snapshot(out_dir)))
    reporter.flush()


def node_info() -> dict[str, Any]:
    """Where this process runs in the Ray cluster: node id, node ip, hostname and pid."""
    import ray  # ray is optional and heavy: imported only when a sweep runs

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "pid": os.getpid()}


def _train_worker(loop_config: dict) -> None:
    """One Ray Train worker: the process group is already up, so pipeline.train runs as DDP rank k."""
    import ray.train.torch  # optional heavy dependency, only inside a Ray worker

    device = ray.train.torch.get_device()
    cfg = compose([*loop_config["overrides"], f"train.device={device}"])
    queue, out_dir = loop_config["queue"], Path(cfg.train.out_dir)

    def report(epoch: int, metrics: dict) -> None:  # called on rank 0 only
        queue.put((epoch, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, str(snapshot(out_dir))))

    train(cfg, report=report)


def torch_trainer(loop: Any, loop_config: dict, workers: int, resources: dict, timeout_s: float,
                  storage: Path) -> Any:
    """The Ray Train TorchTrainer of a multi-worker trial: ``workers`` DDP workers of ``resources`` each
    ({cpu, gpu}), gloo on CPU / NCCL on GPU with ``timeout_s`` on collectives, Ray Train's own files under
    ``storage/ray_train``; no retries inside (Tune retries the whole trial, from its checkpoint)."""
    import ray.train  # ray is optional and heavy: imported only when a sweep runs
    from ray.train.torch import (  # ray is optional and heavy: imported only when a sweep runs
        TorchConfig,
        TorchTrainer,
    )

    gpu = resources["gpu"]
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu > 0,
                                               resources_per_worker={"CPU": resources["cpu"], "GPU": gpu}),
        torch_config=TorchConfig(backend="nccl" if gpu > 0 else "gloo", timeout_s=int(timeout_s)),
        run_config=ray.train.RunConfig(name="ray_train", storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=0)))


def _train_with_workers(overrides: list[str], plan: dict, reporter: _Reporter) -> None:
    """Run a TorchTrainer in a thread and forward rank 0's reports to Tune from this (the trial's) thread.

    Train v2's own ``ray.train.report`` is a barrier over all workers, but pipeline.train reports on
    rank 0 only, so reports travel through a Ray queue instead.
    """
    from ray.util.queue import Empty, Queue  # ray is optional and heavy: imported only when a sweep runs

    cfg = compose(overrides)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": "DEFAULT"})  # outside the trial's bundle
    trainer = torch_trainer(_train_worker, {"overrides": overrides, "queue": queue}, plan["workers_per_trial"],
                            plan["resources"], cfg.train.dist_timeout_s, Path(cfg.train.out_dir).parent)
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="torch-trainer", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            epoch, metrics, folder = queue.get(timeout=1.0)
        except Empty:
            continue
        reporter(epoch, metrics, Path(folder))
    if "error" in outcome:
        raise outcome["error"]
