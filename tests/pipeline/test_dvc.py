"""The DVC pipeline end to end, in a temporary copy of the repository with its own git + DVC.

A tiny experiment replaces the demo so the four stages run in about a minute; everything else (dvc.yaml,
conf/, the entry points, Hydra composition by `dvc exp run -S`) is the real thing. The module reproduces
the pipeline once (`reproduced`); each test that changes something works on its own copy of that
reproduced repository (`repo_copy`), so every test passes alone and in any order.
"""
from __future__ import annotations

import hashlib
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


def _env(repo: Path) -> dict:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
            "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


STAGES = ("prepare", "train", "evaluate", "export")


def _declared(repo: Path, kinds=("outs", "metrics", "plots")) -> dict[str, list[str]]:
    """stage -> the paths dvc.yaml declares for it (outs, metrics and plots by default)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return {name: [e if isinstance(e, str) else next(iter(e)) for kind in kinds for e in stage.get(kind, [])]
            for name, stage in stages.items()}


def _output_hashes(repo: Path, stages=STAGES) -> dict[str, str]:
    """md5 of every file of every output (out, metric, plot; folders file by file) of ``stages``."""
    hashes = {}
    for stage in stages:
        for rel in _declared(repo)[stage]:
            path = repo / rel
            assert path.exists(), f"output {rel} of stage {stage} is missing"
            # a folder may be empty (runs/export/deploy holds only the deploy formats asked for)
            files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
            assert all(f.is_file() for f in files), f"output {rel} of stage {stage} is not a file"
            hashes.update({str(f.relative_to(repo)): hashlib.md5(f.read_bytes()).hexdigest() for f in files})
    return hashes


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory) -> tuple[Path, str]:
    """A copy of the repository (tiny experiment) after one `dvc repro`, committed; and that repro's output."""
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
    env = _env(dst)
    _run([sys.executable, "-m", "pipeline.config", "--write"], dst, env)
    _run(["git", "init", "-q"], dst, env)
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "commit", "-qm", "init"], dst, env)
    first = _run(["dvc", "repro"], dst, env)
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "commit", "-qm", "after repro"], dst, env)
    return dst, first.stdout + first.stderr


@pytest.fixture
def repo_copy(reproduced, tmp_path) -> tuple[Path, dict]:
    """A private copy (work tree, git, DVC cache) of the reproduced repository, for a test that changes it."""
    dst = tmp_path / "repo"
    shutil.copytree(reproduced[0], dst, symlinks=True)
    return dst, _env(dst)


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_and_writes_its_outputs(reproduced):
    repo, output = reproduced
    for stage in STAGES:
        assert f"Running stage '{stage}'" in output, output[-3000:]
    _output_hashes(repo)  # every declared out, metric and plot exists
    for rel in ("data/prepared/train.json", "runs/train/best.pt", "runs/export/model.onnx"):
        assert (repo / rel).stat().st_size > 0, rel
    metrics = json.loads((repo / "runs/evaluate/metrics.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 1.0


@pytest.mark.slow
def test_second_repro_runs_no_stage_and_changes_no_output(repo_copy):
    repo, env = repo_copy
    lock, hashes = (repo / "dvc.lock").read_text(), _output_hashes(repo)
    again = _run(["dvc", "repro"], repo, env)
    assert _output_hashes(repo) == hashes
    assert (repo / "dvc.lock").read_text() == lock
    output = again.stdout + again.stderr
    assert "Running stage" not in output, output
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in output, output
    status = _run(["dvc", "status"], repo, env)
    assert "up to date" in status.stdout.lower(), status.stdout


@pytest.mark.slow
def test_changing_eval_param_reruns_only_evaluate(repo_copy):
    """eval.confusion_iou is read by evaluate only (train validates with eval.score_thr/iou_thr/max_dets)."""
    repo, env = repo_copy
    others = ("prepare", "train", "export")
    before = _output_hashes(repo, others)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["eval"]["confusion_iou"] = 0.6
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo, env).stdout
    assert "Running stage 'evaluate'" in out
    for stage in others:
        assert f"Running stage '{stage}'" not in out, out
    assert _output_hashes(repo, others) == before
    assert json.loads((repo / "runs/evaluate/confusion_matrix.json").read_text())["iou_thr"] == 0.6


@pytest.mark.slow
def test_metrics_files_hold_headline_numbers_and_details_the_rest(reproduced):
    """`dvc metrics show` stays readable: each DVC metrics file is a dozen flat numbers; the detail (per-class
    AP, latency percentiles, settings) lives in details.json / export.json beside it, not a DVC metric."""
    repo, _ = reproduced
    metric_files = [rel for files in _declared(repo, ("metrics",)).values() for rel in files]
    assert sorted(metric_files) == ["runs/evaluate/metrics.json", "runs/export/metrics.json",
                                    "runs/train/metrics.json"]
    headline = {}
    for rel in metric_files:
        data = headline[rel] = json.loads((repo / rel).read_text())
        assert 5 <= len(data) <= 15, (rel, sorted(data))
        assert all(type(v) in (int, float) for v in data.values()), (rel, data)
    classes = yaml.safe_load((repo / "params.yaml").read_text())["model"]["num_classes"]
    train = json.loads((repo / "runs/train/details.json").read_text())
    assert len(train["per_class_AP"]) == classes and {"best", "final", "train"} <= set(train)
    assert headline["runs/train/metrics.json"]["best_map"] == train["best_map"]
    assert headline["runs/train/metrics.json"]["best_AP50"] == train["best"]["AP50"]
    evaluate = json.loads((repo / "runs/evaluate/details.json").read_text())
    assert len(evaluate["per_class_AP"]) == len(evaluate["per_class_AP50"]) == classes
    assert {k: evaluate[k] for k in headline["runs/evaluate/metrics.json"]} == headline["runs/evaluate/metrics.json"]
    export = json.loads((repo / "runs/export/export.json").read_text())
    assert "latency_ms" in export and export["map_onnx"] == headline["runs/export/metrics.json"]["map_onnx"]
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, _env(repo)).stdout)
    text = json.dumps(shown)
    assert "per_class_AP" not in text and "latency_ms" not in text and "mAP" in text


@pytest.mark.slow
def test_dvc_exp_run_composes_hydra_overrides(repo_copy):
    repo, env = repo_copy
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
