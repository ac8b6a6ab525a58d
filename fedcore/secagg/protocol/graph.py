"""The SecAgg+ communication graph: a random k-regular graph and its threshold.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020, Sec. 4: each client masks with and shares its secrets to
only ``k = O(log n)`` neighbours on a random graph; the Harary graph
``H(k, n)`` with randomly permuted vertices is the instance they (and Flower)
use. It is ``k``-regular and ``k``-connected: removing fewer than ``k``
vertices never disconnects it.

The permutation is seeded from a hash of the round's signed adverts
(:func:`graph_seed`), fixed only once every client has committed to its fresh keys:
the graph is public and every client recomputes its own neighbours from the listing
the server relays, but no one (the server included) can choose it in advance, so a
server cannot grind run seeds to surround a victim with colluders.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping, Sequence

from fedcore.core.errors import SecureAggregationError
from fedcore.core.seeds import rng

__all__ = [
    "auto_neighbours",
    "auto_threshold",
    "graph_seed",
    "harary_graph",
    "is_connected",
    "neighbours_of",
    "resolve",
    "round_degree",
]


def auto_neighbours(n: int) -> int:
    """``k`` for ``n`` clients: everyone when ``n <= 11``, else ``2 ceil(log2 n) + 2``.

    ``n = 20 -> 12``, ``100 -> 16``, ``1000 -> 22``, ``10^4 -> 30``.
    """
    if n < 2:
        return 0
    return min(n - 1, 2 * math.ceil(math.log2(n)) + 2)


def auto_threshold(k: int) -> int:
    """``t = floor(k/2) + 1``: a strict majority of the neighbours (at least 2 when ``k >= 2``).

    A majority means an honest client never helps reconstruct both secrets of one
    peer (b-shares for survivors, key shares for dropouts) from disjoint halves.
    """
    return max(1, k // 2 + 1) if k >= 2 else k


def resolve(n: int, neighbours: int, threshold: int) -> tuple[int, int]:
    """``(k, t)`` for ``n`` clients from the config values (0 = auto).

    ``k`` is capped at ``n - 1`` and raised by one when ``n * k`` is odd (no
    ``k``-regular graph exists then); ``t`` is capped at ``k``.
    """
    if n < 3:
        raise SecureAggregationError(
            f"secure aggregation needs at least 3 clients in a round, got {n}: with 2 the "
            "sum reveals each client's update to the other"
        )
    k = auto_neighbours(n) if neighbours == 0 else min(neighbours, n - 1)
    k = max(k, 2)
    if (n * k) % 2 == 1:
        k = k + 1 if k < n - 1 else k - 1
    t = auto_threshold(k) if threshold == 0 else min(threshold, k)
    return k, t


def harary_graph(
    nodes: Sequence[int], k: int, *, seed: int, server_round: int
) -> dict[int, tuple[int, ...]]:
    """Neighbours of each node in ``H(k, n)`` over a seeded random permutation of ``nodes``.

    Examples
    --------
    >>> g = harary_graph([10, 11, 12, 13, 14], 2, seed=0, server_round=1)
    >>> sorted(len(v) for v in g.values())
    [2, 2, 2, 2, 2]

    """
    n = len(nodes)
    if len(set(nodes)) != n:
        raise SecureAggregationError("graph nodes must be distinct")
    if not 1 <= k <= n - 1 or (n * k) % 2:
        raise SecureAggregationError(f"no {k}-regular graph on {n} nodes")
    order = _order(nodes, seed, server_round)
    adj: dict[int, set[int]] = {v: set() for v in nodes}
    half = k // 2
    for i, v in enumerate(order):
        for j in range(1, half + 1):
            w = order[(i + j) % n]
            adj[v].add(w)
            adj[w].add(v)
        if k % 2:  # n is even here: the diametrically opposite vertex
            w = order[(i + n // 2) % n]
            adj[v].add(w)
            adj[w].add(v)
    return {v: tuple(sorted(adj[v])) for v in nodes}


def is_connected(members: Iterable[int], graph: Mapping[int, Sequence[int]]) -> bool:
    """Whether ``members`` induce a connected subgraph of ``graph`` (empty: no)."""
    members = set(members)
    if not members:
        return False
    start = next(iter(members))
    seen = {start}
    stack = [start]
    while stack:
        v = stack.pop()
        for w in graph.get(v, ()):
            if w in members and w not in seen:
                seen.add(w)
                stack.append(w)
    return seen == members


def round_degree(k: int, n: int) -> int:
    """The degree actually used on ``n`` clients for a requested ``k``.

    ``min(k, n - 1)``, lowered by one when ``n * k`` is odd (no ``k``-regular graph
    exists then). Lowering never breaks ``2t > k``; the caller checks ``t <= k``.
    """
    d = min(k, n - 1)
    if (n * d) % 2:
        d -= 1
    return d


def graph_seed(binding: bytes, listing: Sequence[tuple[int, bytes]]) -> int:
    """A 63-bit graph seed from the round binding and ``(node, advert digest)`` pairs.

    The listing is every advert the server accepted in stage 1, sorted by node id;
    each client receives it and recomputes the same seed, so the graph is fixed only
    after the adverts (with their fresh keys) are in.
    """
    h = hashlib.sha256(b"fedcore/secagg/graph\x00" + binding)
    for node, digest in listing:
        h.update(struct.pack(">QH", node & (2**64 - 1), len(digest)) + digest)
    return int.from_bytes(h.digest()[:8], "big") >> 1


def _order(nodes: Sequence[int], seed: int, server_round: int) -> list[int]:
    return [nodes[i] for i in rng(seed, server_round, "secagg-graph").permutation(len(nodes))]


def neighbours_of(
    nodes: Sequence[int], k: int, node: int, *, seed: int, server_round: int
) -> tuple[int, ...]:
    """``node``'s neighbours in :func:`harary_graph` (without building the whole graph).

    >>> g = harary_graph(list(range(8)), 4, seed=3, server_round=2)
    >>> all(neighbours_of(list(range(8)), 4, v, seed=3, server_round=2) == g[v] for v in g)
    True

    """
    n = len(nodes)
    if len(set(nodes)) != n:
        raise SecureAggregationError("graph nodes must be distinct")
    if not 1 <= k <= n - 1 or (n * k) % 2:
        raise SecureAggregationError(f"no {k}-regular graph on {n} nodes")
    order = _order(nodes, seed, server_round)
    i = order.index(node)
    out = {order[(i + j) % n] for j in range(1, k // 2 + 1)}
    out |= {order[(i - j) % n] for j in range(1, k // 2 + 1)}
    if k % 2:
        out.add(order[(i + n // 2) % n])
    return tuple(sorted(out))
