"""Several processes through ``torch.distributed``: the process group, its device, and failures that stop the job.

``torchrun --nproc-per-node N`` starts N processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_world` joins them into one process group: NCCL when the device is
CUDA (each process on the GPU of its ``LOCAL_RANK``), gloo otherwise. The collectives the callers use (all-gather,
all-reduce, broadcast, point-to-point send / receive) exist on both backends, so the same code runs on CPU
processes and on GPUs.

Every process group gets a timeout: a collective that a peer never joins (it crashed, hangs, or took another code
path) raises after ``timeout_s`` instead of waiting forever, and :func:`collective_errors` turns the backend's
error into one that names the rank and the timeout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Long enough for a first step that compiles kernels on every rank, short enough that a dead peer is noticed.
DEFAULT_TIMEOUT_S = 600.0
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on its host, the device it
    computes on, the process group (None: the default group) and the collective timeout."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    group: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process is one of several started by ``torchrun`` (or joined a process group already)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA, ``gloo`` for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_world(device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join (or reuse) the default process group from torchrun's environment; ``device`` ``cuda`` becomes
    ``cuda:LOCAL_RANK``. Raises a clear error if the environment does not describe a job."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [name for name in ENV_VARS if name not in os.environ]
        if missing:
            raise RuntimeError(f"no process group: {', '.join(missing)} not set; start the job with torchrun "
                               "--nproc-per-node N")
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend_for(dev), timeout=timedelta(seconds=timeout_s), **kwargs)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, dev, None, timeout_s)


def shutdown() -> None:
    """Leave the process group if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class CollectiveError(RuntimeError):
    """A collective failed on this rank: a peer stopped, hung past the timeout, or the network failed."""


@contextmanager
def collective_errors(world: World | None, what: str) -> Iterator[None]:
    """Re-raise a backend error inside the body as a :class:`CollectiveError` naming the rank and the timeout."""
    if world is None or world.size == 1:
        yield
        return
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        if isinstance(err, CollectiveError) or not _is_backend_error(err):
            raise
        raise CollectiveError(
            f"rank {world.rank} of {world.size}: {what} failed: another rank stopped or did not join a collective "
            f"within the {world.timeout_s:g} s timeout ({type(err).__name__}: {str(err).strip()[:300]})"
        ) from err


def _is_backend_error(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return any(s in text for s in ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "socket"))
