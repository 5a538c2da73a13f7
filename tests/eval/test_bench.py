"""`pipeline.bench infer` runs end to end on a tiny model and prints the promised JSON, whose numbers agree
with each other and with the model (no timing floors: only relations inside one report)."""
from __future__ import annotations

import json

import pytest

from pipeline import perf
from pipeline.bench import main
from pipeline.config import compose
from pipeline.model import build_model
from pipeline.model.summary import summarize
from pipeline.tools import bench as bench_tools

OVERRIDES = ["model=nanodet_plus_m_0.5x", "data.input_size=[64,64]", "model.head.strides=[8,16,32,64]"]
BACKENDS = ("torch_eager", "onnxruntime_fp32", "onnxruntime_int8")


def test_bench_infer_prints_json(capsys, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["infer", "--set", *OVERRIDES, "--iters", "3", "--batch", "2", "--threads", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert result["machine"]["threads"] == 1 and result["batch_throughput"] == 2
    for backend in BACKENDS:
        stats = result[backend]["batch1"]
        assert stats["iters"] == 3 and 0 < stats["p50_ms"] <= stats["p90_ms"], (backend, stats)
        assert result[backend]["throughput_images_per_s"] > 0, backend
    # the speed-ups are ratios of the same report's batch-1 medians
    base = result["torch_eager"]["batch1"]["p50_ms"]
    assert result["speedup_vs_eager_batch1"] == pytest.approx(
        {k: base / result[k]["batch1"]["p50_ms"] for k in ("onnxruntime_fp32", "onnxruntime_int8")}, rel=1e-9)

    # parameters and FLOPs are the model's own
    cfg = compose(OVERRIDES)
    model = build_model(cfg.model, with_aux=False)
    params = sum(p.numel() for p in model.parameters())
    assert result["model"]["params_inference"] == params
    assert result["model"]["flops_inference"] == summarize(model, (64, 64))["flops_inference"]
    assert result["input_size"] == [64, 64] and result["model"]["num_priors"] == 64 + 16 + 4 + 1
    # the fp32 ONNX file holds every weight as 4 bytes; the INT8 one is smaller than the fp32 one
    fp32, int8 = result["onnxruntime_fp32"]["size_bytes"], result["onnxruntime_int8"]["size_bytes"]
    assert fp32 >= 4 * result["model"]["params_inference_conv"], (fp32, result["model"])
    assert int8 < fp32, (int8, fp32)


def test_latency_stats_and_throughput_arithmetic(monkeypatch):
    """Percentiles and mean of known durations (a fake clock advanced by the timed function itself)."""
    clock = [0.0]
    monkeypatch.setattr(perf.time, "perf_counter", lambda: clock[0])
    durations = iter([0.5, 0.5, 0.5] + [i / 1e3 for i in range(1, 20)] + [0.1])  # 3 warm-ups, 1..19 ms, 100 ms

    def fn():
        clock[0] += next(durations)

    stats = perf.latency_stats(fn, warmup=3, iters=20)
    assert stats == pytest.approx({"p50_ms": 10.5, "p90_ms": 18.1, "mean_ms": 14.5, "iters": 20}, rel=1e-9)

    durations = iter([1.0] + [0.002] * 4 + [0.012])  # 1 warm-up, then a batch of 8 in 4 ms on average
    assert bench_tools._throughput(fn, batch=8, iters=5) == pytest.approx(8 / 0.004, rel=1e-9)  # mean, not median


def test_bench_rejects_bad_override(capsys):
    assert main(["infer", "--set", "model.head.reg_mx=3"]) == 2
    assert "reg_max" in capsys.readouterr().err
