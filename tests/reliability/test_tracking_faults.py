"""W&B faults never stop or hang training: a server that accepts connections but never answers (online
mode with a key), the W&B service process dying in the middle of a run, an unwritable tracking folder.

(tests/train/test_tracking.py covers build_tracker against a closed port; a crashing Ray trial is retried
and reported in tests/tune/test_tune.py::test_crashing_trial_is_retried_from_its_checkpoint_and_reported.)
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest
from relkit import tiny_overrides

from pipeline.config import compose
from pipeline.train import train

INIT_TIMEOUT_S = 3


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never sends a byte."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(32)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()
    for conn in held:
        conn.close()


@pytest.mark.slow
def test_online_wandb_with_a_silent_server_falls_back_within_the_timeout(tiny_data, wandb_env, silent_server,
                                                                       monkeypatch, pipeline_log):
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "0" * 40)  # well-formed, only ever sent to the silent server
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    import wandb

    real_init, inits = wandb.init, []

    def recording_init(*args, **kwargs):
        inits.append(kwargs.get("settings"))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", recording_init)
    summary = train(compose(tiny_overrides(tiny_data, wandb_env / "run", "train.epochs=1", "tracking.mode=online",
                                           f"tracking.dir={wandb_env / 'wb'}", f"tracking.init_timeout_s={INIT_TIMEOUT_S}",
                                           "tracking.num_images=2")))
    assert summary["stopped"] == "completed" and summary["steps"] == 4
    assert any("falling back to offline" in r.getMessage() for r in pipeline_log.records)
    assert list((wandb_env / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    # bounded, not a hang: the online init that met the silent server waited tracking.init_timeout_s, not
    # W&B's default (no wall-clock assertion: the run's duration depends on the machine's load)
    assert inits and inits[0] is not None and inits[0].init_timeout == INIT_TIMEOUT_S, inits


def _wandb_service_pids() -> list[int]:
    """Child processes of this one that are W&B's service (wandb-core)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"wandb-core" in cmd:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_wandb_service_dying_mid_run_does_not_stop_training(tiny_data, wandb_env, pipeline_log):
    killed: list[int] = []

    def kill_service(epoch: int, _metrics: dict) -> None:
        if epoch == 0:
            for pid in _wandb_service_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    cfg = compose(tiny_overrides(tiny_data, wandb_env / "run", "train.epochs=2", "tracking.mode=offline",
                                 f"tracking.dir={wandb_env / 'wb'}", "tracking.num_images=2"))
    summary = train(cfg, report=kill_service)
    assert killed, "no W&B service process found to kill"
    assert summary["stopped"] == "completed" and summary["steps"] == 8
    assert any("training continues without W&B tracking" in r.getMessage() for r in pipeline_log.records)
    assert (wandb_env / "run" / "metrics.json").is_file()


@pytest.mark.slow
def test_unwritable_tracking_folder_leaves_training_untracked_not_stopped(tiny_data, wandb_env, pipeline_log):
    blocker = wandb_env / "a_file"
    blocker.write_text("not a folder")
    summary = train(compose(tiny_overrides(tiny_data, wandb_env / "run", "train.epochs=1", "tracking.mode=offline",
                                           f"tracking.dir={blocker / 'wb'}")))
    assert summary["stopped"] == "completed"
    assert any("continuing without tracking" in r.getMessage() for r in pipeline_log.records)
