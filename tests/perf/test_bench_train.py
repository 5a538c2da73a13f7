"""`python -m pipeline.bench train|peak` run end to end on a tiny model and print the promised JSON."""
from __future__ import annotations

import json

import pytest

from pipeline.bench import main
from pipeline.tools.bench_train import PHASES

TINY = ["model=nanodet_plus_m_0.5x", "model.num_classes=3", "data.input_size=[64,64]",
        "model.aux_head.feat_channels=64"]


@pytest.mark.parametrize("flags", [[], ["--amp", "bf16", "--channels-last"]])
def test_bench_train_reports_phases_flops_and_rates(capsys, tmp_path, flags):
    out = tmp_path / "train.json"
    code = main(["train", "--set", *TINY, "--train-batches", "2", "--iters", "2", "--threads", "1", "--no-peak",
                 "--out", str(out), *flags])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert result["settings"]["amp"] == ("bfloat16" if flags else "fp32")
    assert result["settings"]["channels_last"] == bool(flags)
    flops = result["flops_per_image"]
    assert flops["train_step_flops"] == pytest.approx(3 * flops["forward_train_flops"])
    assert flops["forward_train_flops"] > flops["inference_flops"] > 0  # the aux branch costs extra
    step = result["steps"]["2"]
    assert step["timed_steps"] == 2
    assert all(step[f"{p}_ms"] >= 0 for p in PHASES) and step["forward_ms"] > 0 and step["backward_ms"] > 0
    # the phases are consecutive slices of each step: their medians cannot exceed the worst step by much
    assert sum(step[f"{p}_ms"] for p in PHASES) <= 1.5 * step["step_ms_median"] + 1.0
    assert step["images_per_s_best"] >= step["images_per_s_median"] > 0
    assert step["images_per_cpu_s"] > 0 and step["achieved_tflops"] > 0
    assert "reference" not in result  # the official reference is for batch 16 only
    assert result["machine"]["threads"] == 1 and "avx512_bf16" in result["machine"]["cpu_flags"]


def test_bench_peak_reports_fp32_and_bf16(capsys):
    assert main(["peak", "--iters", "1", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("matmul_float32_tflops", "conv3x3_float32_tflops", "matmul_bfloat16_tflops",
                "conv3x3_bfloat16_tflops"):
        assert result[key] > 0, key


def test_bench_assign_covers_box_counts(capsys):
    assert main(["assign", "--set", "data.input_size=[64,64]", "--batch", "2", "--num-gt", "0", "3",
                 "--threads", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["by_num_gt"]
    assert [r["num_gt"] for r in rows] == [0, 3]
    assert all(r["same_assignment"] and r["batched_ms"] >= 0 for r in rows)
