"""Helpers of the sweep tests (importable as ``tunekit``: pytest puts this folder on sys.path): tiny
overrides, sweep files, the sweep CLI in a subprocess, the results table, offline W&B run records."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from testkit import wandb_records

from pipeline.tune.trial import INJECT_ENV

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.head.strides=[8,16,32]", "data.input_size=[64,64]", "data.builtin.num_train=16",
        "data.builtin.num_val=8", "data.builtin.image_size=[64,64]", "data.batch_size=4",
        "data.eval_batch_size=8", "data.num_workers=0", "train.warmup_steps=2", "tracking.mode=disabled"]


def write_sweep(folder: Path, body: str, name: str = "s") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def cli_env(inject: str | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(INJECT_ENV, None)
    if inject:
        env[INJECT_ENV] = inject
    env.update(extra)
    return env


def run_cli(args: list[str], inject: str | None = None, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """``python -m pipeline.tune <args>`` to its end."""
    return subprocess.run([sys.executable, "-m", "pipeline.tune", *args], check=False, cwd=REPO,
                          env=cli_env(inject, **env), capture_output=True, text=True, timeout=timeout)


def start_cli(args: list[str], log_file: Path, **env: str) -> subprocess.Popen:
    """``python -m pipeline.tune <args>`` started in the background, output to ``log_file``."""
    with open(log_file, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "pipeline.tune", *args], cwd=REPO, env=cli_env(**env),
                                stdout=fh, stderr=subprocess.STDOUT, text=True)


def check_ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-5000:]


def read_table(out: Path) -> dict[str, dict]:
    """results.csv as {trial_id: row}."""
    with open(out / "results.csv") as fh:
        return {row["trial_id"]: row for row in csv.DictReader(fh)}


def reported_epochs(row_or_dir: dict | Path) -> list[int]:
    """The epochs_done of every result a trial reported to Tune (its result.json), in order."""
    trial_dir = Path(row_or_dir["trial_dir"]) if isinstance(row_or_dir, dict) else Path(row_or_dir)
    path = trial_dir / "result.json"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["epochs_done"] for line in lines if line.strip()]


def trial_record(trial_dir: Path) -> dict:
    """A trial's trial.json (attempts, overrides, the node of each attempt); {} before its first start."""
    path = Path(trial_dir) / "trial.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wandb_run_info(run_file: Path) -> dict[str, Any]:
    """The run of an offline W&B file: group, name, job type and config (nested dict, later updates merged)."""
    info: dict[str, Any] = {"config": {}}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info.update(group=record.run.run_group, name=record.run.display_name, job_type=record.run.job_type,
                        run_id=record.run.run_id)
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        else:
            continue
        for item in items:
            key = item.key or "/".join(item.nested_key)
            info["config"][key] = json.loads(item.value_json)
    return info
