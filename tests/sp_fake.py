"""An in-process sequence-parallel group for tests: N ranks as N threads exchanging tensors in memory.

Not for production: it only proves that the DiTs' sharded path computes what the unsharded one does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from pipeline.models.attention import attention


class ThreadGroup:
    """All-gather between threads: every rank posts its value, waits, and reads everyone's."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=120)
        self.slots: list[Any] = [None] * world_size

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read
        return everyone


class FakeSP:
    """The `sp` object the DiT expects; attention = full attention over the gathered sequence (Ulysses' result)."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        assert x.shape[dim] % self.world_size == 0, f"caller must pad: {x.shape[dim]} rows, {self.world_size} ranks"
        size = x.shape[dim] // self.world_size
        return x.narrow(dim, self.rank * size, size)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self.group.exchange(self.rank, x), dim=dim)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: int) -> torch.Tensor:
        full = attention(self.gather(q, 1), self.gather(k, 1), self.gather(v, 1), k_len)
        return self.shard(full, 1)


def run_ranks(world_size: int, fn: Callable[[FakeSP], torch.Tensor]) -> list[torch.Tensor]:
    """Run fn(sp) on every rank concurrently; return each rank's result (re-raising the first failure)."""
    group = ThreadGroup(world_size)
    results: list[Any] = [None] * world_size

    def body(rank: int) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                results[rank] = fn(FakeSP(group, rank))
        except BaseException as exc:  # surface the failure, unblock the others
            results[rank] = exc
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for res in results:
        if isinstance(res, BaseException) and not isinstance(res, threading.BrokenBarrierError):
            raise res
    for res in results:
        if isinstance(res, BaseException):
            raise res
    return results
