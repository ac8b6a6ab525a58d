"""The SecAgg+ graph: every client must compute the same one, and the edges of k and t.

Mutation testing of ``fedcore.secagg.protocol.graph`` found unpinned what clients of
two fedcore versions must agree on (the graph of a seed and round, the seed of a listing
of adverts) and the documented edges of the parameters (``auto_neighbours``'s examples,
``t`` a strict majority, ``k`` capped and made even, ``k = 1`` a matching).
"""

from __future__ import annotations

import hashlib
import re
import struct

import pytest

from fedcore.core.errors import SecureAggregationError
from fedcore.secagg.protocol.graph import (
    auto_neighbours,
    auto_threshold,
    graph_seed,
    harary_graph,
    is_connected,
    neighbours_of,
    resolve,
    round_degree,
)

NODES = list(range(20, 29))


def _exactly(message):
    return "^" + re.escape(message) + "$"


def test_the_graph_of_a_seed_and_round_is_the_same_in_every_version():
    g = harary_graph(NODES, 4, seed=7, server_round=2)
    assert g == {
        20: (21, 22, 25, 28),
        21: (20, 23, 24, 25),
        22: (20, 26, 27, 28),
        23: (21, 24, 25, 26),
        24: (21, 23, 26, 27),
        25: (20, 21, 23, 28),
        26: (22, 23, 24, 27),
        27: (22, 24, 26, 28),
        28: (20, 22, 25, 27),
    }
    assert all(neighbours_of(NODES, 4, v, seed=7, server_round=2) == g[v] for v in NODES)
    assert harary_graph(NODES, 4, seed=7, server_round=3) != g
    assert harary_graph(NODES, 4, seed=8, server_round=2) != g


@pytest.mark.parametrize("node", [3, 2**63 + 1, -1])
def test_the_graph_seed_is_sha256_over_the_binding_and_the_listing(node):
    listing = [(node, b"\x01" * 32), (9, b"\x02" * 32)]
    h = hashlib.sha256(b"fedcore/secagg/graph\x00" + b"binding")
    for n, digest in listing:
        h.update(struct.pack(">QH", n % 2**64, len(digest)) + digest)
    seed = graph_seed(b"binding", listing)
    assert seed == int.from_bytes(h.digest()[:8], "big") >> 1
    assert 0 <= seed < 2**63


def test_auto_neighbours_follows_its_documented_examples():
    assert [auto_neighbours(n) for n in (0, 1, 2, 3, 11)] == [0, 0, 1, 2, 10]
    assert [auto_neighbours(n) for n in (20, 100, 1000, 10**4)] == [12, 16, 22, 30]


def test_auto_threshold_is_a_strict_majority():
    assert [auto_threshold(k) for k in (0, 1, 2, 3, 4, 5, 12)] == [0, 1, 2, 2, 3, 3, 7]


@pytest.mark.parametrize(
    ("n", "neighbours", "threshold", "expected"),
    [
        (3, 0, 0, (2, 2)),
        (4, 2, 0, (2, 2)),  # k = 2 is kept (the minimum)
        (5, 3, 0, (4, 3)),  # n * k odd: k raised by one
        (5, 10, 0, (4, 3)),  # capped at n - 1
        (6, 10, 0, (5, 3)),
        (10, 6, 5, (6, 5)),  # a given threshold is kept
        (10, 6, 9, (6, 6)),  # ... capped at k
        (20, 0, 0, (12, 7)),
    ],
)
def test_resolve(n, neighbours, threshold, expected):
    assert resolve(n, neighbours, threshold) == expected


def test_resolve_refuses_two_clients_saying_why():
    message = (
        "secure aggregation needs at least 3 clients in a round, got 2: with 2 the sum "
        "reveals each client's update to the other"
    )
    with pytest.raises(SecureAggregationError, match=_exactly(message)):
        resolve(2, 0, 0)


@pytest.mark.parametrize(("k", "n", "d"), [(3, 5, 2), (5, 7, 4), (4, 7, 4), (9, 6, 5), (2, 3, 2)])
def test_round_degree(k, n, d):
    assert round_degree(k, n) == d


@pytest.mark.parametrize(
    "build", [harary_graph, lambda nodes, k, **kw: neighbours_of(nodes, k, nodes[0], **kw)]
)
def test_impossible_degrees_and_repeated_nodes_are_refused(build):
    kw = {"seed": 0, "server_round": 1}
    for nodes, k in [
        (list(range(5)), 5),
        (list(range(5)), 6),
        (list(range(4)), 0),
        (list(range(5)), 3),
    ]:
        with pytest.raises(
            SecureAggregationError, match=_exactly(f"no {k}-regular graph on {len(nodes)} nodes")
        ):
            build(nodes, k, **kw)
    with pytest.raises(SecureAggregationError, match=_exactly("graph nodes must be distinct")):
        build([1, 2, 2, 3], 2, **kw)


def test_degree_one_is_a_perfect_matching():
    g = harary_graph([1, 2, 3, 4], 1, seed=0, server_round=1)
    assert all(len(v) == 1 for v in g.values())
    assert all(g[g[v][0]] == (v,) for v in g)
    assert neighbours_of([1, 2, 3, 4], 1, 1, seed=0, server_round=1) == g[1]


def test_connectivity_of_members():
    g = harary_graph(NODES, 4, seed=7, server_round=2)
    assert is_connected(NODES, g)
    assert not is_connected([], g)
    assert is_connected([99], g)  # one member, even one the graph does not know
    assert not is_connected([20, 99], g)
    assert not is_connected([20, 26], g)  # not neighbours, and nothing between them counts
