"""`python -m pipeline.bench train|peak|assign` run end to end on a tiny model: the JSON they print is
internally consistent (rates from the same run's step times, phases that add up to the step, FLOPs equal to
the model summary's) and keeps the keys ../shared/anchors/side_by_side.py reads. No timing floors: only
relations between numbers of one report."""
from __future__ import annotations

import json

import pytest
import torch

import pipeline.tools.bench_train as bench_train_module
from pipeline import perf
from pipeline.bench import main
from pipeline.config import compose
from pipeline.model import build_model
from pipeline.model.summary import summarize
from pipeline.tools.bench_train import PHASES, profile_ops
from pipeline.train.optim import build_optimizer

TINY = ["model=nanodet_plus_m_0.5x", "model.num_classes=3", "data.input_size=[64,64]",
        "model.aux_head.feat_channels=64"]
# the modes of ../shared/anchors/side_by_side.py (MODES there), which runs
#   python -m pipeline.bench train --set ... --train-batches B --iters N --threads T --no-peak <mode flags>
# and reads steps[str(B)]["images_per_s_median"] from the JSON on stdout
SIDE_BY_SIDE_MODES = {"fp32": [], "fp32_cl": ["--channels-last"], "bf16_cl": ["--amp", "bf16", "--channels-last"]}
# batch 16 is side_by_side.py's default; the other modes use 2 (emulated bf16 is slow on CPUs without it)
BATCHES = {"fp32": 16, "fp32_cl": 2, "bf16_cl": 2}
ITERS = 2  # with 2 timed steps every median is a mean: the phase medians then add up to the step's


def _train(capsys, tmp_path, *flags: str, batch: int = 2) -> dict:
    out = tmp_path / "train.json"
    code = main(["train", "--set", *TINY, "model.backbone.pretrained=null", "--train-batches", str(batch),
                 "--iters", str(ITERS), "--threads", "1", "--out", str(out), *flags])
    assert code == 0
    text = capsys.readouterr().out
    result = json.loads(text)  # stdout is exactly one JSON object (side_by_side.py parses it)
    assert result == json.loads(out.read_text())
    return result


@pytest.mark.parametrize("mode", list(SIDE_BY_SIDE_MODES))
def test_bench_train_report_is_consistent(capsys, tmp_path, mode):
    flags, batch = SIDE_BY_SIDE_MODES[mode], BATCHES[mode]
    result = _train(capsys, tmp_path, "--no-peak", *flags, batch=batch)
    assert result["settings"]["amp"] == ("bfloat16" if "bf16" in mode else "fp32")
    assert result["settings"]["channels_last"] == ("--channels-last" in flags)
    assert result["machine"]["threads"] == 1 and "peak" not in result
    assert "reference" not in result  # no hard-coded official figure: ratios come from side_by_side.py

    # the key side_by_side.py reads
    assert list(result["steps"]) == [str(batch)]
    step = result["steps"][str(batch)]
    assert isinstance(step["images_per_s_median"], float)
    assert step["timed_steps"] == ITERS

    # rates are the batch over the same report's step times
    assert step["images_per_s_median"] == pytest.approx(batch / (step["step_ms_median"] / 1e3), rel=1e-9)
    assert step["images_per_s_best"] == pytest.approx(batch / (step["step_ms_best"] / 1e3), rel=1e-9)
    assert step["images_per_cpu_s"] == pytest.approx(batch / (step["cpu_ms_median"] / 1e3), rel=1e-9)
    assert step["step_ms_best"] <= step["step_ms_median"]
    # the phases are consecutive slices of each step (2 steps: medians are means, so they add up exactly)
    assert all(step[f"{p}_ms"] >= 0 for p in PHASES)
    assert sum(step[f"{p}_ms"] for p in PHASES) == pytest.approx(step["step_ms_median"], rel=1e-6)

    # FLOPs: the model summary's numbers for the same config, and the achieved rate from them
    cfg = compose([*TINY, "model.backbone.pretrained=null"])
    summary = summarize(build_model(cfg.model, with_aux=True), (64, 64))
    flops = result["flops_per_image"]
    assert flops["inference_flops"] == summary["flops_inference"]
    assert flops["forward_train_flops"] == 2 * summary["macs_training"] > flops["inference_flops"]
    assert flops["train_step_flops"] == 3 * flops["forward_train_flops"]
    assert step["achieved_tflops"] == pytest.approx(flops["train_step_flops"] * step["images_per_s_best"] / 1e12,
                                                    rel=1e-9)
    assert result["model"] == {"backbone": "0.5x", "input_size": [64, 64], "with_aux": True, "num_classes": 3}


@pytest.mark.parametrize("amp, peak_key", [("off", "conv3x3_float32_tflops"), ("bf16", "conv3x3_bfloat16_tflops")])
def test_bench_train_fraction_of_peak_uses_the_peak_of_its_dtype(capsys, tmp_path, monkeypatch, amp, peak_key):
    fake_peak = {"conv3x3_float32_tflops": 2.0, "conv3x3_bfloat16_tflops": 8.0}
    monkeypatch.setattr(bench_train_module, "bench_peak", lambda device, iters: dict(fake_peak))
    result = _train(capsys, tmp_path, "--amp", amp)
    assert result["peak"] == fake_peak
    step = result["steps"]["2"]
    assert step["fraction_of_conv3x3_peak"] == pytest.approx(step["achieved_tflops"] / fake_peak[peak_key], rel=1e-9)


def test_bench_peak_flop_arithmetic(capsys, monkeypatch):
    """Each kernel's TFLOP/s is its FLOP count over its best time (timing replaced by a fixed 0.25 s). The
    float32 kernels really run once; the bfloat16 ones only have their dtype checked (emulated bf16 takes
    minutes on CPUs without bf16 instructions)."""
    calls = []

    def fixed_times(fn, iters, warmup=1, sync=None):
        (dtype,) = {arg.dtype for arg in fn.__defaults__ if isinstance(arg, torch.Tensor)}
        calls.append((dtype, iters))
        if dtype == torch.float32:
            fn()
        return [0.5, 0.25, 0.75][:max(1, iters)] if iters > 1 else [0.25]

    monkeypatch.setattr(bench_train_module, "time_calls", fixed_times)
    assert main(["peak", "--iters", "1", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    n, (batch, cin, h, w) = result["matmul_size"], result["conv3x3"]
    assert (n, batch, cin, h, w) == (2048, 8, 128, 56, 56) and result["threads"] == 1
    for dtype in ("float32", "bfloat16"):
        assert result[f"matmul_{dtype}_tflops"] == pytest.approx(2 * n**3 / 0.25 / 1e12, rel=1e-12)
        assert result[f"conv3x3_{dtype}_tflops"] == pytest.approx(2 * batch * cin * 128 * 9 * h * w / 0.25 / 1e12,
                                                                  rel=1e-12)
    assert calls == [(torch.float32, 1)] * 2 + [(torch.bfloat16, 1)] * 2


def test_time_calls_drops_the_warm_up_and_times_each_call(monkeypatch):
    """THE timer (pipeline.perf.time_calls, used by every bench): warm-up calls untimed, one time per call."""
    durations = iter([9.0, 3.0, 1.0, 2.0])  # warm-up (ignored), then three timed runs
    clock = [0.0]
    monkeypatch.setattr(perf.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(durations)

    synced = []
    assert perf.time_calls(fn, iters=3, warmup=1, sync=lambda: synced.append(1)) == [3.0, 1.0, 2.0]
    assert len(synced) == 4  # every call, warm-up included, ends with the sync


def test_bench_assign_covers_box_counts(capsys):
    assert main(["assign", "--set", "data.input_size=[64,64]", "--batch", "2", "--num-gt", "0", "3",
                 "--threads", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)["by_num_gt"]
    assert [r["num_gt"] for r in rows] == [0, 3]
    strides = compose(["data.input_size=[64,64]"]).model.head.strides
    for row in rows:
        assert row["same_assignment"], row  # the batched assigner agrees with the per-image reference
        assert (row["batch"], row["num_priors"], row["device"]) == (2, sum((64 // s) ** 2 for s in strides), "cpu")
        assert row["speedup"] == pytest.approx(row["loop_ms"] / max(row["batched_ms"], 1e-9), rel=1e-9)


def test_bench_train_profile_splits_the_step_per_operator(capsys, tmp_path):
    """--profile N: torch.profiler self time per operator, the top operators and the sums per category (which
    together are the whole profiled time)."""
    prof = _train(capsys, tmp_path, "--no-peak", "--profile", "2")["steps"]["2"]["profile"]
    assert prof["steps"] == 2 and prof["time"] == "self_cpu_time_total"
    cats = prof["by_category_ms"]
    assert sum(cats.values()) == pytest.approx(prof["total_ms_per_step"], abs=0.1 * len(cats))
    assert cats["convolution"] > 0 and cats["group_norm"] > 0 and cats["optimizer_ema"] > 0
    ops = [row["op"] for row in prof["top_ops"]]
    assert len(ops) == 15 and len(set(ops)) == 15
    shares = [row["share"] for row in prof["top_ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.001


def test_profile_ops_sees_the_fused_adamw():
    """The optimizer the training uses is the fused AdamW: one kernel over all tensors in the profile."""
    cfg = compose([*TINY, "model.backbone.pretrained=null"])
    model = build_model(cfg.model, with_aux=False)
    opt = build_optimizer(model, cfg.train, 2)
    x = torch.randn(2, 3, 64, 64)

    def one_step() -> None:
        opt.zero_grad()
        model.backbone(x)[-1].mean().backward()
        opt.step()

    ops = {r["op"] for r in profile_ops(one_step, 1, torch.device("cpu"), top=10_000)["top_ops"]}
    assert "aten::_fused_adamw_" in ops
    assert not ops & {"aten::addcdiv_", "aten::_foreach_addcdiv_"}, "a per-tensor or foreach AdamW ran"
