"""Multi-node torchrun, simulated on 127.0.0.1: two torchrun agents (``--nnodes=2``, one worker each, c10d
rendezvous on a loopback port, one ``--rdzv-id``) train the tiny config like one 2-process agent does,
share one Hydra run dir, and survive (``--max-restarts=1``) or report (no restarts) a worker killed mid-run.

Each agent runs in its own process group, killed in ``finally``: no test leaves processes behind.
"""
from __future__ import annotations

import datetime
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from relkit import free_port, tiny_overrides
from testkit import PYTHON, subprocess_env, wandb_history

from pipeline import dist as pdist
from pipeline.config import ConfigError
from pipeline.faults import KILL_RANK_ENV, KILL_STEP_ENV, ONCE_ENV
from pipeline.model.checkpoint import load_checkpoint
from pipeline.train.tracking import run_group

EPOCHS = 2
DDP_STEPS = 4  # 16 images / (2 ranks x batch 4) = 2 steps per epoch
KILL_STEP = 3  # the first step of epoch 1: last.pt then holds step 2
DIST_TIMEOUT_S = 20


def _torchrun_args(nnodes: int, nproc: int, port: int, rdzv_id: str, extra: list[str]) -> list[str]:
    return ["-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv_id}",
            "--local-addr=127.0.0.1", "--monitor-interval=0.5", *extra]


def _launch(work: Path, agents: list[list[str]], overrides: list[str], env: dict[str, str],
            timeout: float = 300) -> list[tuple[int, str]]:
    """Start every agent (``python <agent args> -m pipeline.train <overrides>``) in ``work`` at once and wait
    for all; returns (exit code, output) per agent. Each agent is its own process group, killed at the end."""
    procs, logs = [], []
    try:
        for i, args in enumerate(agents):
            log = open(work / f"agent{i}.log", "w")  # noqa: SIM115 - closed in finally
            logs.append(log)
            procs.append(subprocess.Popen([PYTHON, *args, "-m", "pipeline.train", *overrides], cwd=work, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            else:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # workers an agent may have left behind
                except ProcessLookupError:
                    pass
        for log in logs:
            log.close()
    return [(p.returncode, (work / f"agent{i}.log").read_text()) for i, p in enumerate(procs)]


def _two_nodes(work: Path, name: str, data: Path, env: dict[str, str], extra: list[str] = (),
               tracking: list[str] = (), rdzv_id: str | None = None) -> list[tuple[int, str]]:
    port, rdzv_id = free_port(), rdzv_id or f"{name}-{time.monotonic_ns()}"
    agents = [_torchrun_args(2, 1, port, rdzv_id, [f"--node-rank={r}", *extra]) for r in (0, 1)]
    overrides = tiny_overrides(data, work / name, f"train.epochs={EPOCHS}", f"train.dist_timeout_s={DIST_TIMEOUT_S}")
    if tracking:
        overrides = [o for o in overrides if not o.startswith("tracking.mode=")] + list(tracking)
    return _launch(work, agents, overrides, env)


@pytest.fixture
def work(tiny_data, tmp_path) -> Path:
    (tmp_path / "data").symlink_to(tiny_data)
    return tmp_path


def _assert_close_states(a: dict, b: dict) -> int:
    """model and EMA tensors equal within float tolerance; returns how many were compared."""
    n = 0
    for part in ("model", "ema"):
        assert set(a[part]) == set(b[part]), part
        for key, x in a[part].items():
            y = b[part][key]
            if x.is_floating_point():
                assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), f"{part}.{key}: max diff {(x - y).abs().max()}"
            else:
                assert torch.equal(x, y), f"{part}.{key}"
            n += 1
    return n


@pytest.mark.slow
def test_two_agents_equal_one_agent_with_two_processes_and_share_one_run_dir_and_wandb_group(work):
    rdzv_id = f"job{time.monotonic_ns()}"
    wb = work / "wb"
    results = _two_nodes(work, "two_nodes", work / "data", subprocess_env(WANDB_MODE="offline"),
                         tracking=["tracking.mode=offline", f"tracking.dir={wb}"], rdzv_id=rdzv_id)
    for code, output in results:
        assert code == 0, output[-4000:]
    # one Hydra run dir for both agents: outputs/train/<TORCHELASTIC_RUN_ID>, holding each rank's log
    run_dirs = list((work / "outputs" / "train").iterdir())
    assert [p.name for p in run_dirs] == [rdzv_id]
    assert sorted(p.name for p in run_dirs[0].glob("train_rank*.log")) == ["train_rank0.log", "train_rank1.log"]
    # W&B: one offline run (rank 0 only) in the job's group, with every step's loss
    runs = list((wb / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run_file = next(runs[0].glob("run-*.wandb"))
    assert run_group(None, {"TORCHELASTIC_RUN_ID": rdzv_id}).encode() in run_file.read_bytes()
    assert sorted(s for s, row in wandb_history(run_file).items() if "train/loss" in row) == list(range(1, DDP_STEPS + 1))
    assert load_checkpoint(work / "two_nodes" / "last.pt")["tracking_run_id"] in runs[0].name

    port, rdzv_id = free_port(), f"one-node-{time.monotonic_ns()}"
    overrides = tiny_overrides(work / "data", work / "one_node", f"train.epochs={EPOCHS}",
                               f"hydra.run.dir={work / 'hydra_one_node'}")
    [(code, output)] = _launch(work, [_torchrun_args(1, 2, port, rdzv_id, [])], overrides, subprocess_env())
    assert code == 0, output[-4000:]

    a, b = load_checkpoint(work / "one_node" / "last.pt"), load_checkpoint(work / "two_nodes" / "last.pt")
    assert a["step"] == b["step"] == DDP_STEPS and a["world_size"] == b["world_size"] == 2
    assert _assert_close_states(a, b) > len(a["model"])


@pytest.mark.slow
def test_killed_worker_on_one_node_restarts_both_and_resumes_from_last_pt(work):
    marker = work / "killed_once"
    env = subprocess_env(**{KILL_STEP_ENV: str(KILL_STEP), KILL_RANK_ENV: "1", ONCE_ENV: str(marker)})
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # a fresh store per rendezvous round (pipeline.dist._worker_store)
    results = _two_nodes(work, "restarted", work / "data", env, ["--max-restarts=1"])
    for code, output in results:
        assert code == 0, output[-5000:]
    assert marker.is_file()  # the fault fired (first attempt only)
    both = "".join(out for _, out in results)
    assert "failed (exitcode: -9)" in both  # the killed worker's agent names it
    resumed = [ln for ln in both.splitlines() if "resumed from" in ln]
    assert resumed and f"step {KILL_STEP - 1}" in resumed[0], resumed
    assert "training completed" in both
    assert load_checkpoint(work / "restarted" / "last.pt")["step"] == DDP_STEPS


@pytest.mark.slow
def test_killed_worker_without_restarts_stops_both_agents_with_a_clear_message(work):
    env = subprocess_env(**{KILL_STEP_ENV: str(KILL_STEP), KILL_RANK_ENV: "1"})
    t0 = time.monotonic()
    results = _two_nodes(work, "failed", work / "data", env)
    print(f"both agents exited after {time.monotonic() - t0:.1f} s (train.dist_timeout_s={DIST_TIMEOUT_S})")
    for code, output in results:
        assert code != 0, output[-4000:]
        # torchrun's failure report on each agent - unless the agent that hosted the rendezvous store exited
        # first: the other agent's rendezvous shutdown then raises before its report (torchrun's own race)
        assert "pipeline.train FAILED" in output or "RendezvousConnectionError" in output, output[-4000:]
    assert any("pipeline.train FAILED" in out for _, out in results), "no agent reported the failed job"
    both = "".join(out for _, out in results)
    assert "failed (exitcode: -9)" in both  # the killed worker
    assert "rank 0: a collective operation with the other ranks failed" in both  # the survivor: one clear line
    last = load_checkpoint(work / "failed" / "last.pt")  # intact: the last completed step's checkpoint
    assert last["step"] == KILL_STEP - 1


def test_restarts_across_nodes_on_the_shared_agent_store_are_refused_with_the_fix_named(monkeypatch):
    """torchrun's default (its rendezvous store lent to the workers) cannot restart across nodes cleanly:
    the message names the environment variable that gives every round a fresh store."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the environment of every"):
        pdist._worker_store(datetime.timedelta(seconds=1))


def test_wandb_group_is_the_same_on_every_rank_and_node_of_a_job():
    """run_group: tracking.group wins (a sweep's name); else the torchrun job id every agent shares (not the
    rank, node or restart); a single process has no group."""
    job = {"TORCHELASTIC_RUN_ID": "4242", "TORCHELASTIC_RESTART_COUNT": "0", "RANK": "0", "GROUP_RANK": "0"}
    other = {**job, "RANK": "7", "GROUP_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert run_group(None, job) == run_group(None, other) == "torchrun-4242"
    assert run_group("sweep-head_widths", job) == "sweep-head_widths"
    assert run_group(None, {}) is None and run_group(None, {"TORCHELASTIC_RUN_ID": "none"}) is None
