"""Thread pools the server's aggregation kernel may split its arithmetic over.

The kernel (:class:`fedcore.core.aggregation.WeightedMean`) is pure: it starts no
threads; the server side owns them. One pool per thread count, for the life of the
process (the threads are daemon-like: ``concurrent.futures`` joins them at exit).

>>> pool = aggregation_pool(2)
>>> pool.threads, aggregation_pool(2) is pool, aggregation_pool(1)
(2, True, None)
>>> pool.submit(1, sum, [1, 2, 3]).result()
6
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["AggregationPool", "aggregation_pool", "default_threads"]


def _one_torch_thread() -> None:
    """A lane's torch ops run on that lane's thread alone (no intra-op threads).

    torch keeps its intra-op thread count per thread once a thread has used it; a
    lane's count is set here, at its start, so it never spins OpenMP workers
    against the other lanes (docs/benchmarks.md).
    """
    import torch

    torch.set_num_threads(1)


class AggregationPool:
    """``threads - 1`` ordered lanes, one worker thread each; the caller's thread is the last.

    A lane runs its jobs one at a time in submission order, which
    :class:`~fedcore.core.aggregation.WeightedMean` relies on to hand a lane reply
    k+1's slice while reply k's is still being added.
    """

    def __init__(self, threads: int) -> None:
        if threads < 2:
            raise ValueError(f"an aggregation pool needs >= 2 threads, got {threads}")
        import torch

        self.threads = threads
        before = torch.get_num_threads()
        self._lanes = [
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"fedcore-agg-{lane}",
                initializer=_one_torch_thread,
            )
            for lane in range(1, threads)
        ]
        # start every lane now (its initializer runs before its first job) ...
        for lane in self._lanes:
            lane.submit(int).result()
        # ... then restore torch's default for threads that start later, which the
        # lanes' set_num_threads(1) changed (this thread's own count is unchanged)
        torch.set_num_threads(before)

    def submit(self, lane: int, fn: Callable[..., Any], /, *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` on lane ``lane`` (1 to ``threads - 1``) after its earlier jobs."""
        return self._lanes[lane - 1].submit(fn, *args)

    def shutdown(self) -> None:
        """Stop the lanes after their queued jobs."""
        for lane in self._lanes:
            lane.shutdown()


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
