"""`pipeline.bench infer` runs end to end on a tiny model and prints the promised JSON."""
from __future__ import annotations

import json

from pipeline.bench import main


def test_bench_infer_prints_json(capsys, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["infer", "--set", "model=nanodet_plus_m_0.5x", "data.input_size=[64,64]",
                 "model.head.strides=[8,16,32,64]", "--iters", "2",
                 "--batch", "2", "--threads", "1", "--out", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    for backend in ("torch_eager", "onnxruntime_fp32", "onnxruntime_int8"):
        assert result[backend]["batch1"]["p50_ms"] > 0 and result[backend]["throughput_images_per_s"] > 0
    assert result["model"]["params_inference"] > 0 and result["model"]["flops_inference"] > 0
    assert result["input_size"] == [64, 64] and result["model"]["num_priors"] == 64 + 16 + 4 + 1


def test_bench_rejects_bad_override(capsys):
    assert main(["infer", "--set", "model.head.reg_mx=3"]) == 2
    assert "reg_max" in capsys.readouterr().err
