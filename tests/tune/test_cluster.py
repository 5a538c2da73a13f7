"""A sweep on a 2-node Ray cluster simulated on 127.0.0.1 (``ray.cluster_utils.Cluster``: two raylets, 1 CPU
each, custom resources node_a / node_b), through the real entry point ``python -m pipeline.tune
ray_address=<head>``: trials run on both nodes and write their checkpoints to the shared storage path, each
trial is an offline W&B run in the sweep's group; a driver killed mid-sweep is finished by ``resume=true``
without rerunning completed trials; a trial whose worker node is removed is retried on the remaining node.

Both tests share one cluster (the second removes its worker node). Everything Ray writes stays under a short
temporary folder (RAY_TMPDIR; Unix socket paths are limited to 107 bytes), removed at the end."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tunekit import (
    TINY,
    read_table,
    reported_epochs,
    start_cli,
    trial_record,
    wandb_run_info,
    write_sweep,
)

# the trials log to W&B offline here: the sweep's group and the sampled values must reach the run files
CLUSTER_TINY = [o for o in TINY if not o.startswith("tracking.mode=")] + ["tracking.mode=offline"]
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
SWEEP_TIMEOUT_S = 420


class LoopbackCluster:
    """Two Ray nodes on 127.0.0.1 in this process; ``address`` is the head's GCS address."""

    def __init__(self, root: Path):
        from ray.cluster_utils import Cluster  # ray is optional and heavy: only for these tests

        common = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "temp_dir": str(root / "ray")}
        self.cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                               head_node_args={**common, "resources": {"node_a": 1}, "include_dashboard": False})
        self.head = self.cluster.head_node
        self.worker = self.cluster.add_node(**common, resources={"node_b": 1})
        self.address = self.cluster.address

    def names(self) -> dict[str, str]:
        """{node id: 'node_a' | 'node_b'} of the nodes alive now."""
        return {self.head.node_id: "node_a", **({self.worker.node_id: "node_b"} if self.worker else {})}

    def remove_worker(self) -> None:
        self.cluster.remove_node(self.worker, allow_graceful=False)
        self.worker = None

    def pids(self) -> set[int]:
        nodes = [self.head, *([self.worker] if self.worker else [])]
        return {p.process.pid for node in nodes for procs in node.all_processes.values() for p in procs}

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="rc-"))  # short: Ray's socket paths are limited to 107 bytes
    (root / "ray").mkdir()
    saved = {k: os.environ.get(k) for k in [*RAY_ENV, "RAY_TMPDIR"]}
    os.environ.update(RAY_ENV, RAY_TMPDIR=str(root))  # ray_current_cluster goes there, not to /tmp/ray
    made = None
    try:
        made = LoopbackCluster(root)
        yield made
    finally:
        if made is not None:
            made.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen, log: Path,
             timeout: float = SWEEP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the driver ended (exit {proc.returncode}) before {what}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{tail(log)}"
        time.sleep(0.5)


def finish(proc: subprocess.Popen, log: Path, code: int = 0) -> str:
    try:
        proc.wait(timeout=SWEEP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == code, tail(log)
    return text


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text()[-chars:] if log.exists() else ""


def saved_statuses(exp_dir: Path) -> dict[str, str]:
    """{trial id: status} in Tune's last saved experiment state (what a restore will see)."""
    found = {}
    for path in exp_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now
        for state, _metadata in trials:
            state = json.loads(state)
            found[state["trial_id"]] = state["status"]
    return found


def trial_dirs(exp_dir: Path) -> list[Path]:
    return sorted(exp_dir.glob("trial_*"))


def listening_outside_loopback(pids: set[int]) -> list[tuple]:
    """Listening sockets of ``pids`` and all their children (the trials' worker processes) not on loopback."""
    import psutil

    for pid in list(pids):
        try:
            pids |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    found = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet")
             if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert found, "no listening socket found for the cluster's processes"
    return [a for a in found if not ipaddress.ip_address(a[0].removeprefix("::ffff:")).is_loopback]


@pytest.mark.slow
def test_sweep_runs_on_both_nodes_and_a_killed_driver_resumes(cluster, tmp_path):
    sweep = write_sweep(tmp_path, """
        name: cluster
        num_samples: 1
        max_concurrent: 2
        resources: {cpu: 1, gpu: 0}
        scheduler: {type: fifo}
        max_failures: 1
        base_overrides: [experiment=demo, train.epochs=2]
        space:
          model.head.reg_max: {grid: [4, 5, 6]}
          model.head.strides: {choice: [[8, 16, 32]]}
    """)
    out = tmp_path / "out"
    exp_dir = out / "ray"
    tiny = [o for o in CLUSTER_TINY if not o.startswith("model.head.strides=")]
    args = [f"sweep={sweep}", f"out={out}", f"experiment_dir={tmp_path / 'exp'}", f"ray_address={cluster.address}",
            f"data.prepared_dir={tmp_path / 'data'}", *tiny]
    env = {**RAY_ENV, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune saves its state every second: a tighter kill
    log1 = tmp_path / "first.log"
    first = start_cli(args, log1, **env)
    try:
        wait_for("a finished trial in Tune's saved state",
                 lambda: "TERMINATED" in saved_statuses(exp_dir).values(), first, log1)
        pids = cluster.pids() | {first.pid}
        bad = listening_outside_loopback(pids)
        assert not bad, f"cluster processes listen outside 127.0.0.1: {bad}"
        first.send_signal(signal.SIGKILL)  # the driver dies mid-sweep, no chance to save anything
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    saved = saved_statuses(exp_dir)
    done_before = {f"trial_{t}" for t, status in saved.items() if status == "TERMINATED"}
    assert done_before and len(done_before) < 3, saved
    assert not (out / "results.csv").exists()
    attempts_before = {d.name: trial_record(d).get("attempts") for d in trial_dirs(exp_dir)}
    epochs_before = {name: reported_epochs(exp_dir / name) for name in done_before}
    assert all(e == [1, 2] for e in epochs_before.values()), epochs_before

    log2 = tmp_path / "second.log"
    text = finish(start_cli([*args, "resume=true"], log2, **env), log2)
    assert "continuing sweep cluster" in text

    table = read_table(out)
    assert len(table) == 3 and all(r["status"] == "finished" for r in table.values()), table
    assert done_before <= {Path(r["trial_dir"]).name for r in table.values()}, (done_before, table.keys())
    names = cluster.names()
    ran_on = {}
    for row in table.values():
        trial = Path(row["trial_dir"])
        record = trial_record(trial)
        # the trial's own record and the table agree on where it ran; both are nodes of this cluster
        nodes = [n["node_id"] for n in record["nodes"]]
        assert row["node_id"] == nodes[-1] and row["attempt_nodes"].split() == nodes, row
        assert row["node_ip"] == "127.0.0.1" and set(nodes) <= set(names), (nodes, names)
        ran_on[trial.name] = names[nodes[-1]]
        # ... and the trial's output (forwarded to the driver) says it too
        said = f"trial {row['trial_id']} attempt {record['attempts']} on node {nodes[-1]} (127.0.0.1"
        assert said in (text if trial.name not in done_before else log1.read_text()), said
        # a trial finished before the kill was not run again, the others continued
        if trial.name in done_before:
            assert record["attempts"] == attempts_before[trial.name] == 1, record
            assert reported_epochs(trial) == epochs_before[trial.name]
        else:
            assert reported_epochs(trial) == [1, 2], trial.name  # no gap, no repeat after the restore
        # checkpoints in the shared storage path (the experiment folder the driver was given)
        assert trial.parent == exp_dir and list(trial.glob("checkpoint_*/last.pt")), trial
        best = torch.load(trial / "train" / "best.pt", map_location="cpu", weights_only=True)
        assert best["config"]["model"]["head"]["reg_max"] == int(row["model.head.reg_max"])
        # one offline W&B run per trial, in the sweep's group, its sampled values in the run config
        # (a restarted attempt resumes the W&B run of the checkpoint it continues: offline, a second folder)
        runs = [wandb_run_info(f) for f in sorted((trial / "wandb").glob("offline-run-*/run-*.wandb"))]
        assert 1 <= len(runs) <= record["attempts"], (trial, runs)
        sampled = json.loads((trial / "params.json").read_text())
        for run in runs:
            assert run["group"] == "cluster" and run["name"] == row["trial_id"], run
            model = run["config"]["model"]
            assert model["head"]["reg_max"] == sampled["model.head.reg_max"] == best["config"]["model"]["head"]["reg_max"]
            assert model["head"]["strides"] == sampled["model.head.strides"]
            assert model == best["config"]["model"]  # the run config is the config the checkpoint trained
    assert set(ran_on.values()) == {"node_a", "node_b"}, ran_on  # 1 CPU per node, 2 concurrent: both used
    md = (out / "results.md").read_text()
    assert "node_ip" in md and "attempt_nodes" not in md
    print(json.dumps({"ran_on": ran_on, "done_before_kill": sorted(done_before)}))


@pytest.mark.slow
def test_trial_on_a_removed_node_is_retried_on_the_other(cluster, tmp_path):
    sweep = write_sweep(tmp_path, """
        name: nodeloss
        num_samples: 1
        max_concurrent: 2
        resources: {cpu: 1, gpu: 0}
        scheduler: {type: fifo}
        max_failures: 2
        base_overrides: [experiment=demo, train.epochs=3]
        space:
          model.head.reg_max: {grid: [5, 7]}
    """)
    out = tmp_path / "out"
    exp_dir = out / "ray"
    args = [f"sweep={sweep}", f"out={out}", f"experiment_dir={tmp_path / 'exp'}", f"ray_address={cluster.address}",
            f"data.prepared_dir={tmp_path / 'data'}", *TINY]
    worker_id = cluster.worker.node_id
    log = tmp_path / "sweep.log"
    proc = start_cli(args, log, **RAY_ENV)

    def on_worker() -> Path | None:
        for trial in trial_dirs(exp_dir):
            nodes = trial_record(trial).get("nodes", [])
            if nodes and nodes[-1]["node_id"] == worker_id and reported_epochs(trial):
                return trial
        return None

    try:
        wait_for("a trial reporting from the worker node", lambda: on_worker() is not None, proc, log)
        victim = on_worker()
        epochs_at_kill = reported_epochs(victim)
        cluster.remove_worker()  # its raylet and the trial's process die with it
        text = finish(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    table = read_table(out)
    assert len(table) == 2 and all(r["status"] == "finished" for r in table.values()), text[-3000:]
    row = table[victim.name.removeprefix("trial_")]
    nodes = row["attempt_nodes"].split()
    assert nodes[0] == worker_id and row["node_id"] == cluster.head.node_id, row
    assert int(row["failures"]) >= 1 and int(row["restarts"]) >= 1, row
    epochs = reported_epochs(victim)
    assert epochs == [1, 2, 3] and epochs[:len(epochs_at_kill)] == epochs_at_kill, epochs  # from its checkpoint
    other = next(r for r in table.values() if r is not row)
    assert other["failures"] == "0" and other["node_id"] == cluster.head.node_id, other
    print(json.dumps({"victim": row["trial_id"], "attempt_nodes": [n[:8] for n in nodes],
                      "epochs_at_kill": epochs_at_kill, "epochs": epochs}))
