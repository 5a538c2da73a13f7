"""Speed policy and measurement: CPU features, the mixed-precision (AMP) policy, the memory-format policy,
torch.compile with an eager fallback, and the one latency timer (bench, export verification).

The choices here were measured with ``python -m pipeline.bench train`` on a 2-core AVX512-BF16 CPU
(README "Performance"): channels_last speeds up the ShuffleNetV2/GhostPAN part; under bfloat16 autocast
the dense 3x3 convs and GroupNorms of the aux head are faster in NCHW, and depthwise convs are faster
in float32 (pipeline.model.layers.DepthwiseConv2d keeps them there).
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")


# ------------------------------------------------------------------------------------ CPU features
@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """``{"model": str, "cores": int, "flags": {flag: bool}, "native_bf16": bool}`` (Linux /proc/cpuinfo;
    elsewhere the flags are unknown and reported False)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    found = {flag: flag in flags for flag in CPU_FLAGS}
    return {"model": model, "cores": os.cpu_count() or 1, "flags": found,
            "native_bf16": found["avx512_bf16"] or found["amx_bf16"]}


@lru_cache(maxsize=1)
def check_cpu_bf16() -> None:
    """Warn (once) when bfloat16 autocast is asked for on a CPU without bf16 instructions (it runs,
    emulated, usually slower than float32)."""
    if not cpu_info()["native_bf16"]:
        log.warning("train.amp=bf16 on a CPU without AVX512-BF16/AMX (%s): bfloat16 is emulated there and "
                    "usually slower than float32; consider train.amp=off", cpu_info()["model"])


# ---------------------------------------------------------------------------------- memory format
def apply_memory_format(model: nn.Module, channels_last: bool, amp_dtype: torch.dtype | None,
                        device: torch.device) -> nn.Module:
    """``model.to(channels_last)`` when asked; under CPU bfloat16 autocast the aux head stays NCHW.

    The aux head computes in the layout of its own weights (heads.SimpleConvHead), so this one call
    decides the layout of every part. Parameters are converted in place (before the optimizer exists).
    """
    if not channels_last:
        return model
    model = model.to(memory_format=torch.channels_last)
    aux_head = getattr(model, "aux_head", None)
    if aux_head is not None and device.type == "cpu" and amp_dtype == torch.bfloat16:
        aux_head.to(memory_format=torch.contiguous_format)
    return model


# ------------------------------------------------------------------------------------------ compile
class CompileFallback(nn.Module):
    """``torch.compile(module)`` that turns into plain ``module`` (with a warning) when compiling fails.

    The eager module is the registered child ``_orig_mod`` (so ``train.step.unwrap``, ``train()``/``eval()``
    and ``state_dict`` see exactly the eager one); the compiled callable shares its parameters.
    Forward-time failures are caught here; the backward graph is compiled at the first backward, so
    the training step wraps forward + backward in :func:`run_with_fallback`.
    """

    def __init__(self, module: nn.Module, backend: str | Callable = "inductor"):
        super().__init__()
        self._orig_mod = module
        self.__dict__["compiled"] = torch.compile(module, backend=backend)  # not a child: no duplicate keys
        self.failed = False
        self.proven = False  # one forward + backward ran compiled

    def fall_back(self, err: BaseException) -> None:
        log.warning("torch.compile failed (%s: %s); continuing in eager mode (train.compile=false avoids "
                    "the attempt)", type(err).__name__, str(err).strip().splitlines()[0][:300] if str(err) else "")
        self.failed = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any compiler/backend error: run eagerly instead
                self.fall_back(err)
        return self._orig_mod(*args, **kwargs)


def compile_with_fallback(module: nn.Module, enabled: bool, backend: str | Callable = "inductor") -> nn.Module:
    """``module`` itself, or a :class:`CompileFallback` around it when ``enabled``."""
    if not enabled:
        return module
    log.info("compiling the training module with torch.compile (the first steps are slow)")
    return CompileFallback(module, backend=backend)


def run_with_fallback(module: nn.Module, step: Callable[[], T]) -> T:
    """Run ``step()`` (forward + backward of ``module``). Until a compiled step has succeeded, an
    error makes ``module`` fall back to eager and ``step()`` runs once more (an error that is not the
    compiler's then surfaces from the eager run)."""
    if not isinstance(module, CompileFallback) or module.failed or module.proven:
        return step()
    try:
        out = step()
    except Exception as err:  # noqa: BLE001
        module.fall_back(err)
        return step()
    module.proven = True
    return out


# ----------------------------------------------------------------------------------------- AMP
def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """``train.amp`` -> autocast dtype (None = fp32).

    auto: on CUDA bf16 when the GPU supports it, else fp16 (with a GradScaler); on a CPU bf16 only when it runs
    bfloat16 natively (AVX512-BF16 or AMX-BF16: :func:`cpu_info`), else fp32 -- emulated bf16 is slower than
    fp32. The decision is logged once, with its reason."""
    if mode == "auto":
        dtype, reason = _auto_amp(device)
        _log_auto_amp(device.type, str(dtype).replace("torch.", "") if dtype else "float32", reason)
        return dtype
    if mode == "off":
        return None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device (float16 training relies on a GradScaler); "
                          "use train.amp=bf16 or train.amp=off on CPU")
    if mode == "bf16" and device.type == "cpu":
        check_cpu_bf16()
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _auto_amp(device: torch.device) -> tuple[torch.dtype | None, str]:
    """What ``train.amp=auto`` picks on ``device``, and why (one phrase for the log)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name(device)} supports bfloat16"
        return torch.float16, f"{torch.cuda.get_device_name(device)} has no bfloat16: float16 with a GradScaler"
    if device.type == "cpu":
        info = cpu_info()
        native = [f for f in ("amx_bf16", "avx512_bf16") if info["flags"][f]]
        if native:
            return torch.bfloat16, f"the CPU ({info['model']}) runs bfloat16 natively ({', '.join(native)})"
        return None, f"the CPU ({info['model']}) has no AVX512-BF16/AMX-BF16: bfloat16 would be emulated (slower)"
    return None, f"no autocast policy for device type {device.type}"


@lru_cache(maxsize=8)
def _log_auto_amp(device_type: str, dtype: str, reason: str) -> None:
    log.info("train.amp=auto -> %s on %s: %s", dtype, device_type, reason)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------ timing
def time_calls(fn: Callable[[], Any], iters: int, warmup: int = 1,
               sync: Callable[[], None] | None = None) -> list[float]:
    """THE latency timer: wall-clock seconds of each of ``iters`` calls of ``fn()`` after ``warmup`` untimed
    calls; ``sync()`` (e.g. a CUDA synchronize) ends each call."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    runs = []
    for _ in range(max(1, iters)):
        start = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - start)
    return runs


def latency_stats(fn: Callable[[], Any], warmup: int = 3, iters: int = 20) -> dict[str, float]:
    """Wall-clock milliseconds of ``fn()`` (under no_grad): p50, p90 and mean over ``iters`` runs after ``warmup``."""
    with torch.no_grad():
        runs = [1e3 * s for s in time_calls(fn, iters, warmup)]
    return {"p50_ms": float(np.percentile(runs, 50)), "p90_ms": float(np.percentile(runs, 90)),
            "mean_ms": float(np.mean(runs)), "iters": iters}
