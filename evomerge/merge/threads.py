"""Running a CPU kernel's chunk loop on all of torch's threads.

The kernels walk a tensor in cache-sized chunks with many small in-place operations.
Letting torch split each of those operations over its threads costs a fork and join per
operation and leaves the threads spinning between them (a 2-thread TIES merge took no
less time than a 1-thread one and twice the CPU). Instead the tensor is cut into one
contiguous range per thread, each range runs the plain chunk loop in a Python thread
(torch releases the GIL inside operations), and torch's own threading is off meanwhile.
The ranges are disjoint and aligned to the chunk step, so results do not depend on the
thread count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

_NAME = "evomerge-kernel"
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (process id, size): a forked child has no pool threads
_lock = threading.Lock()


def ranges(n: int, step: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) as at most ``parts`` contiguous ranges whose starts are multiples of ``step``."""
    chunks = -(-n // step)
    parts = max(1, min(parts, chunks))
    bounds = [min(n, (chunks * i // parts) * step) for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def steps(first: int, last: int, step: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk of [first, last)."""
    for start in range(first, last, step):
        yield start, min(start + step, last)


def map_ranges(fn: Callable[[int, int], T], n: int, step: int, device: torch.device | str = "cpu") -> list[T]:
    """``fn(lo, hi)`` over ``ranges(n, step, threads)``, in parallel when torch has more
    than one thread and the tensor more than one chunk; results in range order. Off the
    CPU, one call over everything (the device has its own parallelism)."""
    if torch.device(device).type != "cpu":
        return [fn(0, n)]
    threads = torch.get_num_threads()
    parts = ranges(n, step, threads)
    if len(parts) <= 1 or threading.current_thread().name.startswith(_NAME):  # nested: stay serial
        return [fn(lo, hi) for lo, hi in parts]
    torch.set_num_threads(1)  # global: every range's operations stay on their own thread
    try:
        return list(_executor(threads).map(lambda part: fn(*part), parts))
    finally:
        torch.set_num_threads(threads)


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    with _lock:
        key = (os.getpid(), size)
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool, _pool_key = ThreadPoolExecutor(size, thread_name_prefix=_NAME), key
        return _pool
