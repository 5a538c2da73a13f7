"""reduce_mean, all_gather_object and flags in a real 2-process gloo group."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline import dist as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert D.init_distributed(torch.device("cpu"), timeout_s=60)
    value = torch.tensor([1.0 + 2.0 * rank, 10.0 * rank])
    mean = D.reduce_mean(value)
    gathered = D.all_gather_object({"rank": rank, "dets": [rank] * (rank + 1)})
    any_true = D.any_flag(rank == 1)
    from_zero = D.broadcast_flag(rank == 0)
    obj = D.broadcast_object({"from": rank})
    queue.put((rank, mean.tolist(), value.tolist(), gathered, any_true, from_zero, obj))
    D.barrier()
    D.cleanup()


@pytest.mark.slow
def test_collectives_in_two_process_gloo_group():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, mean, value, gathered, any_true, from_zero, obj in results:
        assert mean == [2.0, 5.0]  # (1 + 3) / 2, (0 + 10) / 2: the averaged value really is returned
        assert value == [1.0 + 2.0 * rank, 10.0 * rank]  # input untouched
        assert gathered == [{"rank": 0, "dets": [0]}, {"rank": 1, "dets": [1, 1]}]
        assert any_true is True and from_zero is True and obj == {"from": 0}


def test_single_process_is_identity():
    t = torch.tensor([3.0])
    assert D.reduce_mean(t) is t
    assert D.all_gather_object(5) == [5]
    assert D.any_flag(False) is False and D.broadcast_flag(True) is True
    assert D.get_world_size() == 1 and D.is_main()
