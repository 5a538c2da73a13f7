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

OVERRIDES = ["model=nanodet_plus_m_0.5x", "model.head.strides=[8,16,32,64]"]
RUNTIMES = ("torch_eager", "onnxruntime", "onnxruntime_int8", "openvino", "openvino_int8", "ncnn", "mnn")

# A stand-in for the official reference venv's python: it answers nd_make_config.py and nd_onnx.py the way
# pipeline.tools.bench.OfficialOnnx reads them, with an onnxruntime median of 2 ms (the ratios are checked).
FAKE_PYTHON = """#!/bin/sh
out=""; json=""
while [ $# -gt 0 ]; do case "$1" in --out) out="$2";; --json) json="$2";; esac; shift; done
[ -n "$out" ] && echo "fake: true" > "$out"
[ -n "$json" ] && echo '{"exports": {"legacy": {"ort_latency": {"median_ms": 2.0, "min_ms": 1.5},
  "file_bytes": 1000, "max_abs_diff_cls_prob": 0.0}}}' > "$json"
exit 0
"""


def _fake_official(tmp_path):
    python = tmp_path / "ref" / "python"
    (tmp_path / "ref" / "src" / "nanodet").mkdir(parents=True)
    (tmp_path / "ref" / "anchors").mkdir()
    (tmp_path / "ref" / "anchors" / "nd_onnx.py").write_text("")
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return ["--official-python", str(python), "--nanodet-src", str(tmp_path / "ref" / "src"),
            "--anchors", str(tmp_path / "ref" / "anchors")]


def test_bench_infer_prints_json_for_every_runtime(capsys, tmp_path):
    """One run at 64 px, 1 thread, batch 2: every runtime's entry, the ratios to the (stand-in) official
    model, the markdown table; what Python prints to stdout is exactly the JSON (NNCF progress bars go to stderr)."""
    out = tmp_path / "bench.json"
    code = main(["infer", "--set", *OVERRIDES, "--sizes", "64", "--infer-threads", "1", "--iters", "3", "--batch",
                 "2", "--out", str(out), *_fake_official(tmp_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert out.with_suffix(".md").read_text() == result["markdown"] + "\n"
    assert result["threads"] == [1] and result["batch_throughput"] == 2 and result["official_onnx"]["available"]
    size = result["sizes"]["64"]
    assert size["skipped"] == {} and list(size["runtimes"]) == list(RUNTIMES)
    for name, entry in size["runtimes"].items():
        stats = entry["batch1"]["1"]
        assert stats["iters"] == 3 and 0 < stats["p50_ms"] <= stats["p90_ms"], (name, stats)
        assert entry["throughput_images_per_s"] > 0 and entry["load_s"] > 0 and entry["size_bytes"] > 0, name
        assert entry["ratio_vs_official_onnx"] == {"1": pytest.approx(stats["p50_ms"] / 2.0, rel=1e-12)}, name
        assert f"| 64 | {name} | 1 | {stats['p50_ms']:.2f} |" in result["markdown"], name
    assert size["official_onnx"]["1"]["p50_ms"] == 2.0
    # the goal names the fastest fp32 / INT8 runtime (eager excluded) and its ratio
    fp32 = {k: v["batch1"]["1"]["p50_ms"] for k, v in size["runtimes"].items() if "int8" not in k and k != "torch_eager"}
    assert result["goal"]["fp32"]["fastest"] == min(fp32, key=fp32.get)
    assert result["goal"]["fp32"]["ratio_vs_official_onnx"] == pytest.approx(min(fp32.values()) / 2.0, rel=1e-12)
    assert result["goal"]["int8"]["fastest"] in ("onnxruntime_int8", "openvino_int8")
    # parameters and FLOPs are the model's own; the INT8 ONNX file is smaller than the fp32 one
    cfg = compose([*OVERRIDES, "data.input_size=[64,64]"])
    model = build_model(cfg.model, with_aux=False)
    assert size["model"]["params_inference"] == sum(p.numel() for p in model.parameters())
    assert size["model"]["flops_inference"] == summarize(model, (64, 64))["flops_inference"]
    assert size["model"]["num_priors"] == 64 + 16 + 4 + 1
    assert size["runtimes"]["onnxruntime_int8"]["size_bytes"] < size["runtimes"]["onnxruntime"]["size_bytes"]
    assert size["runtimes"]["onnxruntime"]["size_bytes"] >= 4 * size["model"]["params_inference_conv"]


def test_bench_infer_says_when_the_official_model_is_not_set_up(capsys, tmp_path):
    code = main(["infer", "--set", *OVERRIDES, "--sizes", "64", "--infer-threads", "1", "--iters", "1", "--batch",
                 "1", "--no-int8", "--official-python", str(tmp_path / "nowhere" / "python")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["official_onnx"] == {"available": False, "why_not": "--official-python: "
                                       f"{tmp_path / 'nowhere' / 'python'} does not exist (set-up: ../shared/anchors/README.md)"}
    assert "official_onnx" not in result["sizes"]["64"] and result["goal"]["fp32"]["met"] is None
    assert "onnxruntime_int8" not in result["sizes"]["64"]["runtimes"]


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
