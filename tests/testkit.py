"""Helpers shared by several test folders (importable as ``testkit``: pytest puts tests/ on sys.path
because tests/conftest.py lives there): the tiny model, pipeline subprocesses, tensor comparisons."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.faults import ALL_ENV

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
STEP_LINE = re.compile(r"\] step (\d+) ")
TINY_MODEL = ["model=nanodet_plus_m_0.5x", "model.num_classes=3", "model.neck.out_channels=32",
              "model.head.feat_channels=32", "model.aux_head.feat_channels=64", "model.head.strides=[8,16,32]"]


def assert_same_tensors(a, b, where: str = "") -> int:
    """torch.equal on every tensor of two nested structures (other leaves compared with ==); returns the
    number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {where}"
        return 1
    if isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        return sum(assert_same_tensors(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        return sum(assert_same_tensors(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a pipeline subprocess: one thread, no W&B, no fault hooks unless given."""
    env = {k: v for k, v in os.environ.items() if k not in ALL_ENV and not k.startswith("NANODET_FAULT_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, stop_at_step: int | None = None,
            sig: int = signal.SIGKILL, delay_s: float = 0.0, stop_on: str | None = None,
            timeout: float = 240) -> tuple[int, str, int]:
    """Run ``python <args>`` and return (exit code, output, last training step logged).

    With ``stop_at_step`` (or ``stop_on``, a text to wait for) send ``sig`` ``delay_s`` seconds after that
    step's log line (or the text) appears, while the process goes on working."""
    proc = subprocess.Popen([PYTHON, *args], cwd=cwd, env=env or subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, seen, sent = [], 0, False
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            m = STEP_LINE.search(line)
            if m:
                seen = int(m.group(1))
            due = (stop_at_step is not None and seen >= stop_at_step) or (stop_on is not None and stop_on in line)
            if due and not sent:
                if delay_s:
                    time.sleep(delay_s)
                proc.send_signal(sig)
                sent = True
            if time.monotonic() > deadline:
                break
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines), seen


def train_cli(overrides: list[str], cwd: Path, **kw) -> tuple[int, str, int]:
    return run_cli(["-m", "pipeline.train", *overrides, f"hydra.run.dir={cwd / 'hydra'}"], cwd, **kw)


def run_metrics(out_dir: Path) -> dict:
    """A training run's summary: ``metrics.json`` (headline figures) merged with ``details.json`` beside it
    when that exists (the detail keys, same names as metrics.json had before they moved)."""
    import json

    out_dir = Path(out_dir)
    merged = json.loads((out_dir / "metrics.json").read_text())
    if (out_dir / "details.json").is_file():
        merged.update(json.loads((out_dir / "details.json").read_text()))
    return merged


def read_csv_rows(path: Path) -> list[dict[str, float]]:
    """A plot CSV (plots/train_loss.csv, plots/val_map.csv) as rows of floats (empty cells: NaN)."""
    import csv

    with open(path, newline="") as fh:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(fh)]


def wandb_records(run_file: Path) -> list:
    """Every ``wandb_internal_pb2.Record`` of an offline W&B run file (``run-<id>.wandb``), in order.

    The file is a LevelDB-style log (wandb's own format: a 7-byte ``:W&B`` header, then 32 KiB blocks of
    records with a 7-byte header - CRC, length, type FULL/FIRST/MIDDLE/LAST - never straddling a block end)
    whose payloads are ``Record`` messages (wandb 0.31 ships no reader)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    block, pos, parts, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            records.append(record)
    return records


def wandb_history(run_file: Path) -> dict[int, dict]:
    """The history rows of an offline W&B run file: {step: {key: value}}; history items hold JSON values
    under ``key`` or ``nested_key``. Rows logged for the same step are merged."""
    import json

    rows: dict[int, dict] = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            row = rows.setdefault(int(record.history.step.num), {})
            for item in record.history.item:
                row[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return rows


KILL_SEED_ENV = "NANODET_KILL_SEED"


def kill_seeds(default: tuple[int, ...]) -> tuple[int, ...]:
    """Seeds of the random kill moments of a test: ``default``, or those in NANODET_KILL_SEED (comma-separated
    integers), to replay a failure whose seed the test printed."""
    text = os.environ.get(KILL_SEED_ENV, "").strip()
    if not text:
        return tuple(default)
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{KILL_SEED_ENV}={text!r}: expected integers separated by commas, e.g. 3 or 0,7") from None


def kill_rng(seed: int) -> random.Random:
    """The random source of a kill test, its seed printed (pytest shows it with a failure) for replaying."""
    print(f"random kill seed {seed} (replay: {KILL_SEED_ENV}={seed})")
    return random.Random(seed)
