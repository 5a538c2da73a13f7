"""train.amp=auto: bf16 on CPUs that run it natively (AVX512-BF16 / AMX-BF16) and on CUDA GPUs that support it,
fp16 on older GPUs, fp32 elsewhere; the decision is logged with its reason."""
from __future__ import annotations

import logging

import pytest
import torch

from pipeline import perf
from pipeline.config import ConfigError


def _cpu(monkeypatch, **flags: bool) -> None:
    found = {f: flags.get(f, False) for f in perf.CPU_FLAGS}
    info = {"model": "Test CPU", "cores": 2, "flags": found,
            "native_bf16": found["avx512_bf16"] or found["amx_bf16"]}
    monkeypatch.setattr(perf, "cpu_info", lambda: info)
    perf._log_auto_amp.cache_clear()


@pytest.mark.parametrize("flags, expected", [
    ({"avx2": True}, None),
    ({"avx2": True, "avx512f": True}, None),  # AVX512 without its bf16 extension: emulated
    ({"avx512f": True, "avx512_bf16": True}, torch.bfloat16),
    ({"amx_bf16": True}, torch.bfloat16),
], ids=["avx2", "avx512f", "avx512_bf16", "amx_bf16"])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, caplog, flags, expected):
    _cpu(monkeypatch, **flags)
    with caplog.at_level(logging.INFO, logger=perf.log.name):
        assert perf.resolve_amp("auto", torch.device("cpu")) is expected
    decision = [r.getMessage() for r in caplog.records if "train.amp=auto" in r.getMessage()]
    assert len(decision) == 1, caplog.text
    assert ("-> bfloat16 on cpu" if expected else "-> float32 on cpu") in decision[0]
    assert "Test CPU" in decision[0]


def test_auto_decision_is_logged_once(monkeypatch, caplog):
    _cpu(monkeypatch, avx2=True)
    with caplog.at_level(logging.INFO, logger=perf.log.name):
        for _ in range(3):  # the trainer resolves the mode more than once
            perf.resolve_amp("auto", torch.device("cpu"))
    assert sum("train.amp=auto" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("bf16_ok, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_on_cuda(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Test GPU")
    perf._log_auto_amp.cache_clear()
    assert perf.resolve_amp("auto", torch.device("cuda")) is expected


def test_explicit_modes(monkeypatch):
    _cpu(monkeypatch, avx512_bf16=True)
    cpu = torch.device("cpu")
    assert perf.resolve_amp("off", cpu) is None  # off means off, even where bf16 is native
    assert perf.resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="train.amp=fp16 needs a CUDA device"):
        perf.resolve_amp("fp16", cpu)
