"""torchrun-native distribution helpers: init from env vars, rank queries, collectives.

Everything degrades to a no-op in a single process, so the maths is identical with or without DDP.
"""
from __future__ import annotations

import datetime as _dt
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import ConfigError  # a user error: one line, exit code 2


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def select_device(requested: str = "auto") -> torch.device:
    """``auto``: the local rank's CUDA device when CUDA is available, else CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={requested!r} but CUDA is not available here; use train.device=cpu")
        if requested == "cuda":
            requested = f"cuda:{get_local_rank()}"
        torch.cuda.set_device(torch.device(requested))
    return torch.device(requested)


def init_distributed(device: torch.device, timeout_s: int = 600) -> bool:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, MASTER_ADDR...).

    gloo on CPU, NCCL on CUDA. The timeout bounds how long a collective waits for a dead or stuck
    rank. Returns True when a group was (or already is) initialised.
    """
    if is_dist():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = _dt.timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if device.type == "cuda":
        kwargs["device_id"] = device
    store, rank, world_size = _worker_store(timeout)
    dist.init_process_group(store=store, rank=rank, world_size=world_size, **kwargs)
    return True


AGENT_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"


def _worker_store(timeout: _dt.timedelta) -> tuple[dist.Store, int, int]:
    """The key-value store the process group meets in, with no key left over from an earlier attempt.

    By default torchrun's c10d rendezvous lends its own store (``TORCHELASTIC_USE_AGENT_STORE=True``), which
    outlives a restart and keeps the failed attempt's keys (e.g. the dead rank's gloo address); one agent
    counts its attempts in ``TORCHELASTIC_RESTART_COUNT``, so a prefix per attempt keeps them apart. Across
    nodes that count differs (a node whose worker failed counts a restart, a healthy node restarted by the
    new rendezvous round does not), so there the store must be a fresh one per round, which torchrun makes
    (rank 0 hosts it on a port picked per round) when its agents run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
    """
    from torch.distributed.rendezvous import rendezvous  # needs a torch built with distributed support

    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if shared and nodes > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        raise ConfigError(f"torchrun --max-restarts across {nodes} nodes needs {AGENT_STORE_FIX} in the "
                          "environment of every torchrun agent (the shared rendezvous store keeps a failed attempt's "
                          "keys and the nodes count restarts differently): export it before torchrun, as "
                          "scripts/slurm/train.sbatch does")
    store, rank, world_size = next(rendezvous("env://", timeout=timeout))
    if not shared:
        return store, rank, world_size  # a fresh store per attempt (or no torchrun agent at all)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"nanodet/attempt{attempt}/", store), rank, world_size


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for all ranks (bounded by the process group's timeout)."""
    if is_dist():
        dist.barrier()


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Cross-rank mean of ``tensor`` (returned; the input is not modified).

    The official NanoDet code all-reduces a temporary and returns the local clone, so its
    normalisers stay per-GPU; here the averaged value is actually returned.
    """
    if not is_dist():
        return tensor
    out = tensor.detach().clone().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / get_world_size()).to(tensor.dtype)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank; returns the list in rank order on every rank."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_flag(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when ``flag`` is True on any rank (one all-reduce)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device or _collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_flag(flag: bool, src: int = 0, device: torch.device | None = None) -> bool:
    """Rank ``src``'s decision, the same on every rank."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device or _collective_device())
    dist.broadcast(t, src=src)
    return bool(t.item() > 0)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int, rank_offset: bool = True) -> int:
    """Seed python, numpy and torch; each rank gets ``seed + rank`` unless rank_offset is False."""
    s = seed + (get_rank() if rank_offset else 0)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s
