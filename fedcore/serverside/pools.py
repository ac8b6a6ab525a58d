"""Thread pools the server's aggregation kernel may split its arithmetic over.

The kernel (:class:`fedcore.core.aggregation.WeightedMean`) is pure: it starts no
threads; the server side owns them. One pool per thread count, for the life of the
process (the threads are daemon-like: ``concurrent.futures`` joins them at exit).

>>> pool = aggregation_pool(2)
>>> pool.threads, aggregation_pool(2) is pool, aggregation_pool(1)
(2, True, None)
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["AggregationPool", "aggregation_pool", "default_threads"]


class AggregationPool(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` of ``threads - 1`` workers; the caller's thread is the last."""

    def __init__(self, threads: int) -> None:
        if threads < 2:
            raise ValueError(f"an aggregation pool needs >= 2 threads, got {threads}")
        super().__init__(max_workers=threads - 1, thread_name_prefix="fedcore-agg")
        self.threads = threads


def default_threads() -> int:
    """One thread per core this process may use, at most 4.

    The kernel is memory-bound: past a few threads the memory bus is the limit
    (docs/benchmarks.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@functools.lru_cache(maxsize=8)
def aggregation_pool(threads: int) -> AggregationPool | None:
    """The process's pool for ``threads`` threads (0 = :func:`default_threads`); None for 1."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = one per core), got {threads}")
    threads = threads or default_threads()
    return AggregationPool(threads) if threads > 1 else None
