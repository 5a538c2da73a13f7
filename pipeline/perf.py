"""Training speed: CPU features, the memory-format policy for mixed precision, torch.compile with an
eager fallback, and the FLOP count of a training step.

The choices here were measured with ``python -m pipeline.bench train`` on a 2-core AVX512-BF16 CPU
(README "Performance"): channels_last speeds up the ShuffleNetV2/GhostPAN part; under bfloat16 autocast
the dense 3x3 convs and GroupNorms of the aux head are faster in NCHW, and depthwise convs are faster
in float32 (pipeline.model.layers.DepthwiseConv2d keeps them there).
"""
from __future__ import annotations

import os
import platform
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar

import torch
from torch import nn

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

    The eager module is the registered child ``_orig_mod`` (so ``engine.unwrap``, ``train()``/``eval()``
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


# ------------------------------------------------------------------------------------------- FLOPs
def training_flops(model: nn.Module, input_hw: tuple[int, int]) -> dict[str, float]:
    """Per-image conv/linear FLOPs (2 x MACs) of the training forward (with aux) and of a training step.

    The step counts 3x the forward: the backward computes a gradient for the input and one for the
    weights, each as costly as the forward (the usual convention; the first conv's input gradient,
    not needed, is included).
    """
    from pipeline.model.summary import count_macs

    raw = model
    forward = 2.0 * sum(count_macs(raw, input_hw, train_graph=True).values())
    inference = 2.0 * sum(count_macs(raw, input_hw, train_graph=False).values())
    return {"forward_train_flops": forward, "train_step_flops": 3.0 * forward, "inference_flops": inference}
