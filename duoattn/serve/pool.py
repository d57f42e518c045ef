"""The KV memory pool: bytes reserved per request before it starts, a bounded first-come queue for the rest.

The pool is an account, not an allocator: a request reserves ``handle.expected_kv_bytes(prompt + max_tokens)``
(what its preallocated split cache will hold) and the worker allocates the cache itself. Capacity is fixed at
start-up, so the sum of running caches never exceeds it. The pool lives on the server's event loop; the worker
thread releases through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass


@dataclass
class PoolRefusal(Exception):
    """A request the pool cannot take (answered with HTTP 503)."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


class KVPool:
    """``capacity`` bytes and ``max_sequences`` slots, handed out first come, first served.

    A request that does not fit now waits in a queue of at most ``queue_size`` requests for at most ``timeout``
    seconds. Waiters are served in arrival order (a large request at the head is not overtaken by smaller ones
    behind it, so it cannot starve).
    """

    def __init__(self, capacity: int, max_sequences: int, queue_size: int, timeout: float):
        self.capacity = int(capacity)
        self.max_sequences = max_sequences
        self.queue_size = queue_size
        self.timeout = timeout
        self.in_use = 0
        self.running = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def free(self) -> int:
        return self.capacity - self.in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, nbytes: int) -> bool:
        return self.running < self.max_sequences and nbytes <= self.free

    def _take(self, nbytes: int) -> None:
        self.in_use += nbytes
        self.running += 1

    async def acquire(self, nbytes: int) -> None:
        """Reserve ``nbytes`` and a slot, waiting in the queue if needed; :class:`PoolRefusal` if it cannot."""
        if nbytes > self.capacity:
            raise PoolRefusal(
                "kv_pool_too_small",
                f"the request needs {nbytes / 2**20:.1f} MiB of KV cache (prompt + max_tokens) but the server's KV "
                f"pool holds {self.capacity / 2**20:.1f} MiB in all; send a shorter prompt or a smaller max_tokens",
            )
        if not self._waiters and self._fits(nbytes):
            self._take(nbytes)
            return
        if len(self._waiters) >= self.queue_size:
            raise PoolRefusal(
                "queue_full",
                f"the server is at capacity ({self.running} running, {len(self._waiters)} waiting, "
                f"{self.free / 2**20:.1f} MiB of KV cache free); retry later",
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as err:
            if future.done() and not future.cancelled():  # granted just as the wait ended: give it back
                self.release(nbytes)
            else:
                future.cancel()
                self._waiters.remove(entry)
                self._grant()  # the head may have changed
            if isinstance(err, asyncio.CancelledError):
                raise
            raise PoolRefusal(
                "queue_timeout",
                f"no KV memory or batch slot became free within {self.timeout:g} s ({self.running} running, "
                f"{self.free / 2**20:.1f} MiB free, {nbytes / 2**20:.1f} MiB needed); retry later",
            ) from None

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`acquire` reserved, and admit waiters that now fit."""
        self.in_use -= nbytes
        self.running -= 1
        if self.in_use < 0 or self.running < 0:
            raise RuntimeError("KV pool released more than it handed out")
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            nbytes, future = self._waiters.popleft()
            self._take(nbytes)
            future.set_result(None)
