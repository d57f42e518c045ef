"""Running a function in several CPU processes joined by a gloo process group, as torchrun would."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], size: int, port: int, timeout_s: float, args: tuple) -> None:
    # torchrun's environment, so that the code under test joins the group the way it does under torchrun
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from duoattn.distributed import init_world, shutdown

    world = init_world("cpu", timeout_s)
    try:
        fn(world, *args)
        torch.distributed.barrier()  # no rank leaves while another still talks to it
    finally:
        shutdown()


def spawn(fn: Callable[..., Any], *args: Any, size: int = 2, timeout_s: float = 30.0) -> None:
    """Run ``fn(world, *args)`` on ``size`` processes (forked from this process); an
    exception on any rank is raised here (torch.multiprocessing then stops the other ranks)."""
    # fork: the ranks inherit the imported modules (a fresh interpreter per rank spends seconds importing torch)
    mp.start_processes(_entry, args=(fn, size, free_port(), timeout_s, args), nprocs=size, join=True,
                       start_method="fork")
