"""Client sampling seeded by (run seed, round, purpose): a resumed run picks the same clients.

>>> sample_clients([5, 3, 9, 1], fraction=0.5, minimum=1, seed=0, server_round=1)
[3, 9]
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from fedcore.core.seeds import rng

__all__ = ["sample_clients", "sample_size"]


def sample_size(available: int, *, fraction: float, minimum: int) -> int:
    """``max(floor(fraction * available), minimum)``, capped at ``available``."""
    return min(available, max(math.floor(fraction * available), minimum))


def sample_clients(
    node_ids: Iterable[int],
    *,
    fraction: float,
    minimum: int,
    seed: int,
    server_round: int,
    purpose: str = "train",
) -> list[int]:
    """A sorted sample of ``node_ids`` drawn without replacement.

    The draw depends only on the set of ids, ``fraction``, ``minimum``, ``seed``,
    ``server_round`` and ``purpose``, never on global RNG state or id order.
    """
    pool = sorted(set(node_ids))
    k = sample_size(len(pool), fraction=fraction, minimum=minimum)
    if k >= len(pool):
        return pool
    picked = rng(seed, "sample", purpose, server_round).choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in picked)
