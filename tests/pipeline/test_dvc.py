"""The DVC pipeline end to end, in a temporary copy of the repository with its own git + DVC.

A tiny experiment replaces the demo so the four stages run in about a minute; everything else (dvc.yaml,
conf/, the entry points, Hydra composition by `dvc exp run -S`) is the real thing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TINY = """# @package _global_
defaults:
  - override /model: nanodet_plus_m_0.5x
model:
  num_classes: 5
  neck: {out_channels: 32}
  head: {feat_channels: 32, strides: [8, 16, 32]}
  aux_head: {feat_channels: 64}
data:
  input_size: [64, 64]
  batch_size: 4
  eval_batch_size: 8
  num_workers: 0
  builtin: {num_train: 16, num_val: 8, image_size: [64, 64]}
train:
  epochs: 1
  val_interval: 1
  warmup_steps: 2
tracking:
  mode: disabled
export:
  verify_images: 4
  int8: false
"""


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("dvcrepo") / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    (dst / "conf/experiment/tiny.yaml").write_text(TINY)
    cfg_yaml = (dst / "conf/config.yaml").read_text().replace("- experiment: demo", "- experiment: tiny")
    (dst / "conf/config.yaml").write_text(cfg_yaml)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": str(dst), "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run([sys.executable, "-m", "pipeline.config", "--write"], dst, env)
    _run(["git", "init", "-q"], dst, env)
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "commit", "-qm", "init"], dst, env)
    return dst, env


@pytest.mark.slow
def test_dvc_repro_runs_all_stages_then_is_a_noop(repo_copy):
    repo, env = repo_copy
    _run(["dvc", "repro"], repo, env)
    for rel in ("data/prepared/train.json", "runs/train/best.pt", "runs/train/metrics.json",
                "runs/evaluate/metrics.json", "runs/export/model.onnx", "runs/export/export.json"):
        assert (repo / rel).exists(), rel
    metrics = json.loads((repo / "runs/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 1.0
    again = _run(["dvc", "repro"], repo, env)
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout.lower()
    status = _run(["dvc", "status"], repo, env)
    assert "up to date" in status.stdout.lower()


@pytest.mark.slow
def test_changing_eval_param_reruns_only_evaluate(repo_copy):
    """eval.confusion_iou is read by evaluate only (train validates with eval.score_thr/iou_thr/max_dets)."""
    repo, env = repo_copy
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eval"]["confusion_iou"] = 0.6
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo, env).stdout
    assert "Running stage 'evaluate'" in out
    for stage in ("prepare", "train", "export"):
        assert f"Running stage '{stage}'" not in out, out


@pytest.mark.slow
def test_dvc_exp_run_composes_hydra_overrides(repo_copy):
    repo, env = repo_copy
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "after repro", "--allow-empty"], repo, env)
    _run(["dvc", "exp", "run", "-S", "model.head.reg_max=5"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["model"]["head"]["reg_max"] == 5
    show = _run(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert "reg_max" in show and "mAP" in show
    archived = list((repo / "runs/train/previous").glob("*/last.pt"))
    assert archived, "the run made with reg_max 7 must be moved aside, not lost"
    import torch

    ckpt = torch.load(repo / "runs/train/last.pt", weights_only=True)
    assert ckpt["config"]["model"]["head"]["reg_max"] == 5


@pytest.mark.slow
def test_dvc_push_pull_with_a_local_remote(repo_copy, tmp_path):
    repo, env = repo_copy
    remote = tmp_path / "remote"
    _run(["dvc", "remote", "add", "-f", "-d", "local", str(remote)], repo, env)
    _run(["dvc", "push"], repo, env)
    assert any(remote.rglob("*")), "dvc push wrote nothing"
    onnx = repo / "runs/export/model.onnx"
    before = onnx.read_bytes()
    onnx.unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    _run(["dvc", "pull"], repo, env)
    assert onnx.read_bytes() == before
