"""``python -m pipeline.tools.gpu_check`` (``make gpu-check``): without CUDA it says so and exits 3; ``--device cpu``
runs the same steps (process group + all-reduce, THE training step under DDP, THE evaluation, the export stage's
ONNX verification) and prints one JSON report; a failing check exits 1 naming it. The CUDA numbers themselves
need a GPU (none here)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.tools import gpu_check


def test_without_cuda_it_says_so_and_exits_3(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == gpu_check.EXIT_NO_CUDA == 3
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("no CUDA device: torch.cuda.is_available() is False (torch ")
    assert "--device cpu" in out.err


@pytest.mark.slow
def test_cpu_dry_run_prints_one_json_report_of_every_check(capsys, tmp_path):
    assert gpu_check.main(["--device", "cpu", "--steps", "1", "--work-dir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"device", "versions", "group", "train", "validation", "export_onnx"}
    assert report["device"] == "cpu" and report["versions"]["torch"] == torch.__version__
    assert report["group"] == {"backend": "gloo", "world_size": 1, "all_reduce": "ok"}
    [(amp, train)] = report["train"].items()
    assert amp in ("bf16", "off") and train["amp"] == amp and train["steps"] == 1
    assert train["images_per_s"] > 0 and math.isfinite(train["loss_first"]) and math.isfinite(train["loss_last"])
    assert train["sync_bn_layers"] == 0 and "grad_scale" not in train  # both need CUDA
    assert set(report["validation"]) == {"mAP", "AP50"}
    parity = report["export_onnx"]
    assert 0 <= parity["max_abs_diff"] <= parity["atol"] and (tmp_path / "export" / "model.onnx").is_file()
    assert not torch.distributed.is_initialized()  # the group is torn down


@pytest.mark.slow
def test_a_failing_check_exits_1_and_names_it(monkeypatch, capsys, tmp_path):
    class NanLoss(gpu_check.NanoDetPlusLoss):
        def __call__(self, *args):
            loss, terms, extra = super().__call__(*args)
            return loss * float("nan"), terms, extra

    monkeypatch.setattr(gpu_check, "NanoDetPlusLoss", NanLoss)
    assert gpu_check.main(["--device", "cpu", "--steps", "1", "--work-dir", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "gpu check failed: amp=" in out.err and "non-finite training loss" in out.err
    assert not torch.distributed.is_initialized()
