"""Single-client exposure in SecAgg+ (issue 9): the old per-client lists vs the consistency check.

On fedcore's real graphs (``harary_graph`` with ``resolve(n, 0, 0)``): under the old
rules a malicious server unmasks a client by route A (its neighbours' keys); under
the consistency check it unmasks nobody with fewer than ``2t - k`` colluding
neighbours, and the bound is tight. A threshold of ``k // 2`` (not a majority) is
exposed by route B. The verdicts are checked against concrete attacks played by
the protocol's rules (``attack_succeeds``) and, on graphs of <= 8 nodes, against
an exhaustive search.
"""

from __future__ import annotations

import doctest
import functools
import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fedcore.core.errors import SecureAggregationError
from fedcore.secagg.protocol import exposure
from fedcore.secagg.protocol.exposure import (
    any_exposable,
    attack_succeeds,
    brute_force_exposable,
    exposable,
    worst_colluders,
)
from fedcore.secagg.protocol.graph import harary_graph, resolve

pytestmark = pytest.mark.adversarial

SIZES = (16, 20, 50, 100, 200, 1000)
RUN_SEED = 7


@functools.cache
def real_graph(n: int) -> tuple[dict[int, tuple[int, ...]], int, int]:
    """fedcore's round-1 graph for ``n`` clients and its default ``(k, t)``."""
    k, t = resolve(n, 0, 0)
    return harary_graph(list(range(n)), k, seed=RUN_SEED, server_round=1), k, t


@functools.cache
def ring(n: int) -> tuple[int, ...]:
    """The (secret-free, public) ring order of the Harary graph, recovered from the graph.

    Consecutive nodes share the most neighbours; checked: the order reproduces the
    graph exactly (each node is adjacent to the k/2 nodes on either side).
    """
    graph, k, _ = real_graph(n)
    nb = {v: set(ws) for v, ws in graph.items()}
    order = [min(nb)]
    seen = set(order)
    while len(order) < n:
        x = order[-1]
        nxt = max((w for w in nb[x] if w not in seen), key=lambda w: (len(nb[x] & nb[w]), -w))
        order.append(nxt)
        seen.add(nxt)
    assert k % 2 == 0
    for i, x in enumerate(order):
        around = {order[(i + j) % n] for j in range(-(k // 2), k // 2 + 1) if j}
        assert nb[x] == around, f"ring order does not reproduce node {x}'s neighbours"
    return tuple(order)


def cut_attack(n: int, t: int, victim: int, colluders: frozenset[int]) -> dict | None:
    """Route B by a two-group split of the ring at the victim, played by the real rules.

    The victim's group is an arc ending at the victim; every honest client is told
    the survivor set "its own arc + the colluders". Returns the messages if the
    attack unmasks the victim, else None.
    """
    graph, k, _ = real_graph(n)
    order = ring(n)
    p = order.index(victim)
    h = k // 2
    lengths = sorted(range(h + 1, n - h), key=lambda length: abs(length - n // 2))
    for length in lengths:
        left = {order[(p - i) % n] for i in range(length)}
        groups = (frozenset(left - colluders), frozenset(set(graph) - left - colluders))
        sent = {w: g | colluders for g in groups for w in g}
        if attack_succeeds(graph, t, victim, sent, colluders=colluders) == "B":
            return sent
    return None


# -- the real graphs ----------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
def test_old_lists_let_the_server_unmask_a_client_by_route_a(n):
    """The reviewer's finding: per-client lists let the neighbours' keys all leak."""
    graph, k, t = real_graph(n)
    victim = any_exposable(graph, t, rules="lists")
    assert victim is not None, f"n={n} k={k} t={t}: no client exposable under the old rules"
    verdict = exposable(graph, t, victim, rules="lists")
    assert (verdict.feasible, verdict.route) == (True, "A"), verdict.reason
    # the flow is a concrete attack: every client's lists pass its own (old) check
    assert attack_succeeds(graph, t, victim, verdict.witness, rules="lists") == "A"
    # and the consistency check refuses that very victim
    assert not exposable(graph, t, victim, rules="consistency").feasible


@pytest.mark.parametrize("n", SIZES)
def test_consistency_check_unmasks_nobody_without_colluders(n):
    graph, k, t = real_graph(n)
    victim = any_exposable(graph, t, rules="consistency")
    assert victim is None, (
        f"n={n} k={k} t={t}: client {victim} exposable: {exposable(graph, t, victim).reason}"
    )


@pytest.mark.parametrize("n", SIZES)
def test_consistency_check_unmasks_nobody_below_the_colluder_bound(n):
    """``2t - k - 1`` colluding neighbours per victim, placed adversarially: nobody."""
    graph, k, t = real_graph(n)
    bound = 2 * t - k - 1
    assert bound >= 0, f"t={t} is not a majority of k={k}: 2t - k - 1 = {bound}"
    assert bound == (1 if k % 2 == 0 else 0)
    victim = any_exposable(graph, t, colluders_per_victim=bound, rules="consistency")
    assert victim is None, (
        f"n={n} k={k} t={t}: client {victim} exposable with {bound} colluding neighbour(s)"
    )


@pytest.mark.parametrize("n", SIZES)
def test_colluder_bound_is_tight(n):
    """``2t - k`` colluding neighbours (the ring neighbours of the victim) do unmask it."""
    graph, k, t = real_graph(n)
    c = 2 * t - k
    assert c >= 1, f"t={t} is not a majority of k={k}: 2t - k = {c}"
    victim = any_exposable(graph, t, colluders_per_victim=c, rules="consistency")
    assert victim is not None
    order = ring(n)
    p = order.index(victim)
    offsets = [sign * j for j in range(1, k // 2 + 1) for sign in (-1, 1)][:c]
    colluders = frozenset(order[(p + j) % n] for j in offsets)
    verdict = exposable(graph, t, victim, colluders=colluders)
    assert (verdict.feasible, verdict.route) == (True, "B"), verdict.reason
    sent = cut_attack(n, t, victim, colluders)
    assert sent is not None, "no ring cut unmasks the victim: the over-approximation is loose"
    # one colluder fewer: no attack at all (the over-approximation's "safe" is a proof)
    assert not exposable(graph, t, victim, colluders=colluders - {min(colluders)}).feasible


@pytest.mark.parametrize("n", SIZES)
def test_threshold_of_half_the_neighbours_is_unmasked_by_route_b(n):
    """``t = k // 2``: exposed with no colluder at all (the smallest number, 0)."""
    graph, k, t_default = real_graph(n)
    t = k // 2
    smallest = next(
        c
        for c in range(k + 1)
        if any_exposable(graph, t, colluders_per_victim=c, rules="consistency") is not None
    )
    assert smallest == 0
    victim = any_exposable(graph, t, rules="consistency")
    verdict = exposable(graph, t, victim)
    assert (verdict.feasible, verdict.route) == (True, "B"), verdict.reason
    sent = cut_attack(n, t, victim, frozenset())
    assert sent is not None, "route B reported but no ring cut is a real attack"
    # the same messages under the default (majority) threshold: refused
    assert attack_succeeds(graph, t_default, victim, sent) is None


def test_worst_colluders_returns_the_placement_it_judged():
    graph, k, t = real_graph(20)
    verdict, placement = worst_colluders(graph, t, 0, 2 * t - k)
    assert verdict.feasible and len(placement) == 2 * t - k
    assert placement <= set(graph[0])
    assert exposable(graph, t, 0, colluders=placement) == verdict
    verdict, placement = worst_colluders(graph, t, 0, 2 * t - k - 1)
    assert not verdict.feasible and len(placement) == 2 * t - k - 1


# -- exhaustive cross-check on small graphs -------------------------------------------------


@st.composite
def small_cases(draw):
    """A graph of 4..8 nodes (fedcore's Harary family or any), t, a victim, colluders."""
    n = draw(st.integers(4, 8))
    if draw(st.booleans()):
        k = draw(st.sampled_from([k for k in range(2, n) if n * k % 2 == 0]))
        graph = harary_graph(list(range(n)), k, seed=draw(st.integers(0, 99)), server_round=1)
    else:
        pairs = list(itertools.combinations(range(n), 2))
        bits = draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
        adj = {v: set() for v in range(n)}
        for (a, b), on in zip(pairs, bits):
            if on:
                adj[a].add(b)
                adj[b].add(a)
        graph = {v: tuple(sorted(ws)) for v, ws in adj.items()}
    t = draw(st.integers(1, max(1, max(len(ws) for ws in graph.values()))))
    victim = draw(st.integers(0, n - 1))
    others = [v for v in range(n) if v != victim]
    colluders = draw(st.lists(st.sampled_from(others), max_size=2, unique=True))
    return graph, t, victim, frozenset(colluders)


def _k(n: int, k: int, seed: int = 0) -> dict[int, tuple[int, ...]]:
    return harary_graph(list(range(n)), k, seed=seed, server_round=1)


@pytest.mark.property
@settings(max_examples=120, deadline=None)
@given(small_cases())
@example((_k(8, 7), 4, 0, frozenset()))  # K8, fedcore's graph for 8 clients: slowest search
@example((_k(8, 7), 4, 0, frozenset({1})))  # 2t - k = 1 colluder
@example((_k(8, 4), 3, 0, frozenset(_k(8, 4)[0][:2])))  # 2t - k = 2 colluding neighbours
@example((_k(6, 4), 2, 0, frozenset()))  # t = k // 2
@example((_k(8, 5, 3), 3, 0, frozenset({6})))  # odd k
def test_flow_matches_brute_force_on_small_graphs(case):
    graph, t, victim, colluders = case
    # "lists": the flow is exact, and its witness is a real attack
    flow = exposable(graph, t, victim, colluders=colluders, rules="lists")
    brute = brute_force_exposable(graph, t, victim, colluders=colluders, rules="lists")
    assert (flow.feasible, flow.route) == (brute.feasible, brute.route), (flow, brute)
    if flow.feasible:
        played = attack_succeeds(graph, t, victim, flow.witness, colluders=colluders, rules="lists")
        assert played == flow.route
    # "consistency": the over-approximation never says "safe" when an attack exists
    over = exposable(graph, t, victim, colluders=colluders, rules="consistency")
    real = brute_force_exposable(graph, t, victim, colluders=colluders, rules="consistency")
    if real.feasible:
        assert over.feasible, (over, real)
        assert attack_succeeds(graph, t, victim, real.witness, colluders=colluders) == real.route
        assert brute.feasible  # every consistent attack is also a lists attack
    if over.witness is not None:
        assert attack_succeeds(graph, t, victim, over.witness, colluders=colluders) == over.route


def test_brute_force_finds_the_known_attacks():
    """The oracle is not vacuous: it finds route B at ``t = k/2`` and route A under lists."""
    g = _k(8, 4)
    assert brute_force_exposable(g, 2, 0).route == "B"  # t = k/2, consistency
    assert not brute_force_exposable(g, 3, 0).feasible  # t = k/2 + 1, consistency
    g = _k(8, 5)  # t = 3 > k/2: the reviewer's attack in miniature
    assert brute_force_exposable(g, 3, 0, rules="lists").route == "A"
    assert not brute_force_exposable(g, 3, 0, rules="consistency").feasible


# -- the surface ----------------------------------------------------------------------------


def test_bad_inputs_are_named():
    g = {0: (1,), 1: (0, 2), 2: (1,)}
    with pytest.raises(SecureAggregationError, match="not symmetric: 2 is a neighbour of 1"):
        exposable({0: (1,), 1: (0, 2), 2: ()}, 1, 0)
    with pytest.raises(SecureAggregationError, match="victim 0 is listed as a colluder"):
        exposable(g, 1, 0, colluders=[0])
    with pytest.raises(SecureAggregationError, match="victim 9 is not a node"):
        exposable(g, 1, 9)
    with pytest.raises(SecureAggregationError, match="rules must be one of"):
        exposable(g, 1, 0, rules="list")  # type: ignore[arg-type]
    with pytest.raises(SecureAggregationError, match="threshold t must be an integer >= 1"):
        exposable(g, 0, 0)
    with pytest.raises(SecureAggregationError, match="at most 9 nodes"):
        brute_force_exposable(real_graph(16)[0], 6, 0)


def test_module_examples_run():
    assert doctest.testmod(exposure).failed == 0


def test_a_client_outside_its_survivor_set_must_not_answer():
    """The rule the proof needs: ``w`` reveals only if ``w`` is in its own survivor set.

    Every client is told S = {1, 2, 4, 5}. Clients 0 and 3 (the victim's neighbours)
    are not in S; if they answered anyway, the shares they and the others would
    reveal (written as the old per-client lists) unmask victim 1 by route A.
    """
    g = {0: (1, 3, 5), 1: (0, 3), 2: (3, 4, 5), 3: (0, 1, 2), 4: (2, 5), 5: (0, 2, 4)}
    s = frozenset({1, 2, 4, 5})
    assert attack_succeeds(g, 2, 1, {w: s for w in g}) is None
    as_lists = {w: frozenset(set(g[w]) - s) for w in g if len(set(g[w]) & s) >= 2}
    assert attack_succeeds(g, 2, 1, as_lists, rules="lists") == "A"
    assert not brute_force_exposable(g, 2, 1).feasible
    assert not exposable(g, 2, 1).feasible
