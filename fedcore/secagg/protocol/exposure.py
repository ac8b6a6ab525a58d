"""Can a malicious server unmask ONE client in SecAgg+? A max-flow feasibility check.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020 (SecAgg+); Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, Sec. 4 (the consistency check).

Pure analysis, independent of the protocol code: it reads a neighbour graph (for
example :func:`fedcore.secagg.protocol.graph.harary_graph`) and a threshold ``t``
and decides whether a server that deviates arbitrarily, helped by a set of
colluding clients, can obtain everything it needs to remove the masks from ONE
honest victim's vector.

Model
-----
The victim ``u`` sent ``y_u = x_u + PRG(b_u) + sum_{v in N(u)} +-PRG(s_uv)``. Every
client ``w`` holds one Shamir share of ``b_x`` ("b-share") and one of ``s_sk_x``
("sk-share") for each neighbour ``x``; ``t`` shares of a secret reveal it. The
server learns ``x_u`` iff it gets

- ``b_u`` (``t`` b-shares of ``u``, from ``N(u)``), and
- for every neighbour ``v`` of ``u`` the pairwise mask ``s_uv``: from ``s_sk_u``
  (route **B**: ``t`` sk-shares of ``u``, which give every ``s_uv`` at once) or
  from ``s_sk_v`` for every ``v`` (route **A**: ``t`` sk-shares of each ``v``,
  from ``N(v)``).

A colluding client hands over both shares of every neighbour and its own keys; so
with ``c_x = |N(x) ∩ colluders|`` the server needs only ``dem_x = max(0, t - c_x)``
shares of ``x``'s secrets from honest clients, and none for a colluding ``v``.
``d_x = |N(x)|`` (``k`` on the regular graphs fedcore uses). The victim is honest,
and answers like any other honest client (it holds shares of its neighbours).

Rules ``"lists"`` (the protocol before the fix)
-----------------------------------------------
The server sends each honest ``w`` its own lists: counted ``C_w`` and dropped
``D_w``, a partition of ``N(w)`` with ``|C_w| >= t``; ``w`` reveals b-shares of
``C_w`` and sk-shares of ``D_w``. Nothing ties one client's lists to another's.

- Route B: ``dem_u`` honest neighbours told "u counted" and ``dem_u`` others told
  "u dropped" (each of those still has ``d_w - 1 >= t`` counted). Exact.
- Route A: nobody needs to declare ``u`` dropped, so all honest neighbours with
  ``d_w >= t`` give b-shares of ``u``; each honest ``w`` may declare at most
  ``d_w - t`` peers dropped. Which ``w`` gives the sk-share of which ``v`` is a
  bipartite b-matching: ``source -> v`` (capacity ``dem_v``), ``v -> w`` for each
  honest ``w in N(v)`` (capacity 1; ``u`` may be one of them), ``w -> sink``
  (capacity ``d_w - t``). Feasible iff the maximum flow equals ``sum dem_v``.
  Exact; the flow itself is the attack (``Exposure.witness``).

Rules ``"consistency"`` (the fix)
---------------------------------
The server sends each honest ``w`` one survivor set ``S_w``; ``w`` signs the
statement (round, attempt, hash(S_w), model digest) once, and only if ``w in S_w``;
colluders sign any statement. ``w`` reveals only if it is itself in ``S_w``, at
least ``t`` of its neighbours are in ``S_w`` and EVERY neighbour of ``w`` in
``S_w`` signed the identical statement; it then reveals b-shares of
``N(w) ∩ S_w`` and sk-shares of ``N(w) - S_w``. (``w in S_w`` is load-bearing:
a client told a set it is not in would give away ``b_u`` while its neighbours in
the set give away its key. On the graph ``{0: (1, 3, 5), 1: (0, 3), 2: (3, 4, 5),
3: (0, 1, 2), 4: (2, 5), 5: (0, 2, 4)}`` with ``t = 2``, victim 1 is unmasked by
route A if every client, told ``S = {1, 2, 4, 5}``, answers; with the rule, no
attack on it exists.)

*Exact reduction* (used by :func:`brute_force_exposable`): group honest clients by
the statement they signed (non-signers alone). Replacing every statement ``S`` by
``G ∪ colluders`` (``G`` its honest signers) keeps every revealer a revealer and
gives the server the same shares of honest clients (an honest neighbour of a
revealer is in ``S`` iff it is in ``G``; colluders' secrets are known anyway), and
varying the digest or attempt only splits groups further. So an attack is a
partition ``P`` of the honest clients; ``w`` is a revealer iff
``|N(w) ∩ P(w)| + c_w >= t``, and then gives b-shares of its neighbours in
``P(w)`` and sk-shares of its honest neighbours outside ``P(w)``.

*Over-approximation* (what :func:`exposable` decides; SOUND: "not feasible" means
no attack exists, "feasible" means these necessary conditions hold):

Lemma 1. A revealer ``w`` gives sk-shares of at most ``d_w - t`` honest peers: at
least ``t - c_w`` of its ``d_w - c_w`` honest neighbours are in its own group.

Lemma 2. If ``t - c_x`` honest revealers give sk-shares of ``x``, none of them is
in a statement ``x`` reveals under (it would have signed it, hence be told the same
set, which contains ``x`` since ``x`` is in its own: it would give ``x``'s b-share),
so at most ``d_x - t`` of ``x``'s honest neighbours are in ``x``'s statement, and
``x`` can be a revealer only if ``c_x >= 2t - d_x``.

- Route B needs disjoint sets of ``dem_u`` revealers in ``N(u)`` inside and outside
  ``P(u)``: the same necessary condition as under "lists", i.e.
  ``d_u - c_u >= 2 (t - c_u)``, ``c_u >= 2t - d_u``. It is reported feasible
  when it holds (only when ``dem_u = 0`` is that constructive: the colluders
  alone hold ``t`` shares of both secrets).
- Route A: every honest ``v in N(u)`` with ``dem_v > 0`` has its key revealed, so
  by Lemma 2 it can reveal (a b-share of ``u`` or anything else) only if
  ``c_v >= 2t - d_v``. So (a) at least ``dem_u`` honest neighbours of ``u`` must
  have ``c_v >= 2t - d_v``, and (b) the "lists" flow, with capacities from Lemma 1
  and without those demand nodes as suppliers, must meet every demand.

With no colluders and ``t > k/2`` (fedcore's ``t = floor(k/2) + 1``) both fail:
``2t - k >= 1 > 0 = c_v``. On a ``k``-regular graph nothing is exposed while every
client has fewer than ``2t - k`` colluding neighbours: ``c < 2t - k`` (2 for even
``k``, so one colluder is harmless; 1 for odd ``k``, so none is allowed).

Maximum flow: scipy's :func:`scipy.sparse.csgraph.maximum_flow` (Dinic's
algorithm) on a CSR matrix of ``int32`` capacities.

Outside this model: a server shrinking a victim's mask peers at stages 2-3 (it
relays only ``t`` boxes), several attempts or rounds, differences of aggregates.

Examples
--------
>>> from fedcore.secagg.protocol.graph import harary_graph, resolve
>>> k, t = resolve(20, 0, 0)
>>> g = harary_graph(list(range(20)), k, seed=0, server_round=1)
>>> (k, t), exposable(g, t, 0, rules="lists").route
((12, 7), 'A')
>>> exposable(g, t, 0, rules="consistency").feasible
False

"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from fedcore.core.errors import SecureAggregationError

__all__ = [
    "Exposure",
    "Rules",
    "any_exposable",
    "attack_succeeds",
    "brute_force_exposable",
    "exposable",
    "worst_colluders",
]

Rules = Literal["lists", "consistency"]
_RULES = ("lists", "consistency")

#: Colluder placements among the victim's neighbours tried one by one up to this
#: many subsets; above it, one greedy placement (see :func:`worst_colluders`).
SUBSET_LIMIT = 256
#: Largest graph :func:`brute_force_exposable` accepts (it is exponential).
BRUTE_FORCE_MAX_NODES = 9

Neighbours = dict[int, frozenset[int]]


@dataclass(frozen=True)
class Exposure:
    """Whether one victim's update can be unmasked, by which route, and why.

    Attributes
    ----------
    feasible : bool
        ``True``: an attack exists (rules ``"lists"``, or a ``witness``), or the
        necessary conditions of the over-approximation hold (``"consistency"``).
        ``False``: no attack exists.
    route : str or None
        ``"B"`` (the victim's own key), ``"A"`` (every neighbour's key), ``None``.
    reason : str
        The figures behind the verdict.
    witness : Mapping[int, frozenset[int]] or None (default: None)
        An attack :func:`attack_succeeds` confirms: what the server sends each
        honest client that answers (``"lists"``: the peers it is told dropped, the
        rest of its neighbours being counted; ``"consistency"``: its survivor set).

    """

    feasible: bool
    route: str | None
    reason: str
    witness: Mapping[int, frozenset[int]] | None = field(default=None, compare=False)


# -- input checks -------------------------------------------------------------------------


def _neighbours(graph: Mapping[int, Sequence[int]]) -> Neighbours:
    nb = {int(v): frozenset(int(w) for w in ws) for v, ws in graph.items()}
    for v, ws in nb.items():
        if v in ws:
            raise SecureAggregationError(f"node {v} is listed as its own neighbour")
        for w in ws:
            if w not in nb:
                raise SecureAggregationError(
                    f"node {v} has neighbour {w}, which is not a node of the graph: "
                    "give every node its own neighbour list"
                )
            if v not in nb[w]:
                raise SecureAggregationError(
                    f"the graph is not symmetric: {w} is a neighbour of {v} but {v} is "
                    f"not a neighbour of {w}"
                )
    return nb


def _check(nb: Neighbours, t: int, rules: str) -> None:
    if rules not in _RULES:
        raise SecureAggregationError(f"rules must be one of {_RULES}, got {rules!r}")
    if not isinstance(t, int) or t < 1:
        raise SecureAggregationError(f"threshold t must be an integer >= 1, got {t!r}")


def _colluders(nb: Neighbours, victim: int, colluders: Iterable[int]) -> frozenset[int]:
    if victim not in nb:
        raise SecureAggregationError(f"victim {victim} is not a node of the graph")
    col = frozenset(int(c) for c in colluders)
    unknown = sorted(c for c in col if c not in nb)
    if unknown:
        raise SecureAggregationError(f"colluders {unknown} are not nodes of the graph")
    if victim in col:
        raise SecureAggregationError(
            f"victim {victim} is listed as a colluder: the victim must be honest"
        )
    return col


# -- the two routes -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Case:
    """One victim, one colluder set: the counts both rule sets start from."""

    nb: Neighbours
    t: int
    u: int
    col: frozenset[int]

    @cached_property
    def _colluding(self) -> dict[int, int]:
        return {x: len(self.nb[x] & self.col) for x in self.nb[self.u] | {self.u}}

    def c(self, x: int) -> int:
        c = self._colluding.get(x)
        return len(self.nb[x] & self.col) if c is None else c

    def d(self, x: int) -> int:
        return len(self.nb[x])

    def dem(self, x: int) -> int:
        return max(0, self.t - self.c(x))

    def honest_neighbours(self, x: int) -> list[int]:
        return sorted(self.nb[x] - self.col)


def _route_b(case: _Case) -> tuple[bool, str, dict[int, frozenset[int]] | None]:
    """Route B's condition (exact under "lists", necessary under "consistency")."""
    u, t = case.u, case.t
    need = case.dem(u)
    honest = case.honest_neighbours(u)
    droppers = [w for w in honest if case.d(w) - 1 >= t]
    counters = [w for w in honest if case.d(w) >= t]
    ok = len(droppers) >= need and len(counters) >= 2 * need
    why = (
        f"route B: {len(honest)} honest neighbour(s) of {u} ({case.c(u)} colluding), "
        f"needs {need} telling 'counted' and {need} others 'dropped' "
        f"({len(droppers)} can drop it and keep t = {t} counted)"
    )
    if not ok:
        return False, why, None
    told_dropped = droppers[:need]
    told_counted = [w for w in counters if w not in told_dropped][:need]
    witness = {w: frozenset({u}) for w in told_dropped}
    witness.update({w: frozenset() for w in told_counted})
    return True, why, witness


def _max_flow(
    demand: Mapping[int, int], capacity: Mapping[int, int], edges: Sequence[tuple[int, int]]
) -> tuple[int, dict[int, set[int]]]:
    """Max flow source -> demand v -> supplier w -> sink; returns (value, {w: {v used}})."""
    if not edges:
        return 0, {}
    left = {v: 2 + i for i, v in enumerate(sorted(demand))}
    right = {w: 2 + len(left) + i for i, w in enumerate(sorted(capacity))}
    rows, cols, caps = [], [], []
    for v, i in left.items():
        rows.append(0)
        cols.append(i)
        caps.append(demand[v])
    for w, j in right.items():
        rows.append(j)
        cols.append(1)
        caps.append(capacity[w])
    for v, w in edges:
        rows.append(left[v])
        cols.append(right[w])
        caps.append(1)
    size = 2 + len(left) + len(right)
    network = csr_matrix(
        (np.asarray(caps, dtype=np.int32), (rows, cols)), shape=(size, size), dtype=np.int32
    )
    result = maximum_flow(network, 0, 1, method="dinic")
    flow = result.flow.toarray()
    used: dict[int, set[int]] = {}
    for v, w in edges:
        if flow[left[v], right[w]] > 0:
            used.setdefault(w, set()).add(v)
    return int(result.flow_value), used


def _route_a_flow(case: _Case, excluded: Collection[int]) -> tuple[bool, str, dict[int, set[int]]]:
    """Route A's b-matching: can every honest neighbour's key get its sk-shares."""
    t = case.t
    demand = {v: case.dem(v) for v in case.honest_neighbours(case.u) if case.dem(v) > 0}
    capacity: dict[int, int] = {}
    edges: list[tuple[int, int]] = []
    for v in sorted(demand):
        for w in case.honest_neighbours(v):
            if w in excluded or case.d(w) - t <= 0:
                continue
            capacity[w] = case.d(w) - t
            edges.append((v, w))
    total = sum(demand.values())
    value, used = _max_flow(demand, capacity, edges) if total else (0, {})
    why = (
        f"route A: max flow {value} of demand {total} (sk-shares of {len(demand)} "
        f"neighbour key(s); {len(capacity)} supplier(s), each dropping <= d - t peers)"
    )
    return value == total, why, used


def _lists(case: _Case) -> Exposure:
    ok_b, why_b, witness_b = _route_b(case)
    if ok_b:
        return Exposure(True, "B", why_b, witness_b)
    u, t = case.u, case.t
    need = case.dem(u)
    counters = [w for w in case.honest_neighbours(u) if case.d(w) >= t]
    if len(counters) < need:
        why_a = f"route A: only {len(counters)} honest neighbour(s) can reveal b_u, needs {need}"
        return Exposure(False, None, f"{why_b}; {why_a}")
    ok_a, why_a, used = _route_a_flow(case, excluded=())
    if not ok_a:
        return Exposure(False, None, f"{why_b}; {why_a}")
    witness = {w: frozenset(vs) for w, vs in used.items()}
    for w in counters:
        witness.setdefault(w, frozenset())
    return Exposure(True, "A", why_a, witness)


def _consistency(case: _Case) -> Exposure:
    u, t = case.u, case.t
    need = case.dem(u)
    ok_b, why_b, _ = _route_b(case)
    if ok_b:
        if need == 0:
            return Exposure(True, "B", f"{why_b}: the colluders alone hold t shares", {})
        return Exposure(True, "B", f"{why_b}: necessary condition holds (not constructive)")
    demand_nodes = [v for v in case.honest_neighbours(u) if case.dem(v) > 0]
    # Lemma 2: a neighbour whose key is revealed keeps fewer than t - c_v neighbours in
    # its own group unless c_v >= 2t - d_v; then it reveals nothing.
    barred = {v for v in demand_nodes if case.c(v) < 2 * t - case.d(v)}
    b_revealers = [v for v in case.honest_neighbours(u) if v not in barred]
    if len(b_revealers) < need:
        why_a = (
            f"route A: {len(b_revealers)} honest neighbour(s) of {u} could reveal b_u while "
            f"their own key is revealed (needs c_v >= 2t - d_v), needs {need}"
        )
        return Exposure(False, None, f"{why_b}; {why_a}")
    ok_a, why_a, _ = _route_a_flow(case, excluded=barred)
    if not ok_a:
        return Exposure(False, None, f"{why_b}; {why_a}")
    return Exposure(True, "A", f"{why_a}: necessary conditions hold (not constructive)")


def _decide(case: _Case, rules: str) -> Exposure:
    return _lists(case) if rules == "lists" else _consistency(case)


# -- public API ---------------------------------------------------------------------------


def exposable(
    graph: Mapping[int, Sequence[int]],
    t: int,
    victim: int,
    *,
    colluders: Iterable[int] = (),
    rules: Rules = "consistency",
) -> Exposure:
    """Whether a malicious server with ``colluders`` can unmask ``victim``'s update.

    Parameters
    ----------
    graph : Mapping[int, Sequence[int]]
        Symmetric neighbour lists.
    t : int
        Shamir threshold.
    victim : int
        The honest client attacked.
    colluders : Iterable[int] (default: none)
        Clients that hand the server their shares and sign anything.
    rules : {"consistency", "lists"} (default: "consistency")
        What an honest client checks before revealing (module docstring).

    Returns
    -------
    Exposure
        Exact under ``"lists"``; under ``"consistency"`` a sound over-approximation
        (``feasible=False`` proves that no attack exists).

    """
    nb = _neighbours(graph)
    _check(nb, t, rules)
    return _decide(_Case(nb, t, victim, _colluders(nb, victim, colluders)), rules)


def _placements(nb: Neighbours, victim: int, count: int) -> Iterator[frozenset[int]]:
    candidates = sorted(nb[victim])
    if not 0 <= count <= len(candidates):
        raise SecureAggregationError(
            f"cannot place {count} colluders among the {len(candidates)} neighbours of "
            f"{victim}: give a count from 0 to {len(candidates)}"
        )
    if math.comb(len(candidates), count) <= SUBSET_LIMIT:
        for subset in itertools.combinations(candidates, count):
            yield frozenset(subset)
        return
    closed = nb[victim] | {victim}
    chosen: list[int] = []
    for _ in range(count):
        best = max(
            (w for w in candidates if w not in chosen),
            key=lambda w: (len(nb[w] & closed), -w),
        )
        chosen.append(best)
    yield frozenset(chosen)


def worst_colluders(
    graph: Mapping[int, Sequence[int]],
    t: int,
    victim: int,
    count: int,
    *,
    rules: Rules = "consistency",
) -> tuple[Exposure, frozenset[int]]:
    """The verdict for ``count`` colluders placed adversarially among ``victim``'s neighbours.

    Every ``count``-subset of the neighbours when there are at most
    :data:`SUBSET_LIMIT` of them (the first feasible one, in sorted order, is
    returned), else one greedy placement: repeatedly the neighbour adjacent to the
    most of ``victim`` and its neighbours (it raises ``c_v`` for the most keys route A
    needs; route B only depends on how many colluders there are). Placement cannot
    matter below the bound: with fewer than ``2t - k`` colluders in all, every
    client has fewer than ``2t - k`` colluding neighbours and no attack exists
    (module docstring).
    """
    nb = _neighbours(graph)
    _check(nb, t, rules)
    return _worst(nb, t, victim, count, rules)


def _worst(
    nb: Neighbours, t: int, victim: int, count: int, rules: str
) -> tuple[Exposure, frozenset[int]]:
    last: tuple[Exposure, frozenset[int]] | None = None
    _colluders(nb, victim, ())
    for col in _placements(nb, victim, count):  # neighbours of the victim: no check needed
        verdict = _decide(_Case(nb, t, victim, col), rules)
        if verdict.feasible:
            return verdict, col
        last = (verdict, col)
    assert last is not None  # _placements yields at least one subset
    return last


def any_exposable(
    graph: Mapping[int, Sequence[int]],
    t: int,
    *,
    colluders_per_victim: int = 0,
    rules: Rules = "consistency",
) -> int | None:
    """The first victim (in node order) that :func:`exposable` reports feasible, or ``None``.

    For each victim, ``colluders_per_victim`` colluders are placed among its
    neighbours as in :func:`worst_colluders`.
    """
    nb = _neighbours(graph)
    _check(nb, t, rules)
    if colluders_per_victim < 0:
        raise SecureAggregationError(
            f"colluders_per_victim must be >= 0, got {colluders_per_victim}"
        )
    for victim in sorted(nb):
        if _worst(nb, t, victim, colluders_per_victim, rules)[0].feasible:
            return victim
    return None


# -- the literal rules and the brute-force oracle ------------------------------------------


def attack_succeeds(
    graph: Mapping[int, Sequence[int]],
    t: int,
    victim: int,
    sent: Mapping[int, Collection[int]],
    *,
    colluders: Iterable[int] = (),
    rules: Rules = "consistency",
) -> str | None:
    """Play one concrete attack by the protocol's rules; return the route that works.

    ``sent[w]`` is what the server sends honest client ``w`` (``"lists"``: the peers
    it is told dropped, the rest of its neighbours counted; ``"consistency"``: its
    survivor set). Honest clients missing from ``sent`` reveal nothing; every
    check an honest client makes is applied as stated in the module docstring.

    Returns
    -------
    str or None
        ``"B"`` if ``t`` b-shares and ``t`` sk-shares of ``victim`` reach the
        server, else ``"A"`` if ``t`` b-shares of ``victim`` and ``t`` sk-shares of
        every non-colluding neighbour do, else ``None``.

    """
    nb = _neighbours(graph)
    _check(nb, t, rules)
    col = _colluders(nb, victim, colluders)
    told = {int(w): frozenset(int(x) for x in s) for w, s in sent.items() if int(w) not in col}
    return _play(nb, t, victim, col, told, rules)


def _play(
    nb: Neighbours,
    t: int,
    u: int,
    col: frozenset[int],
    told: Mapping[int, frozenset[int]],
    rules: str,
) -> str | None:
    b_count = {x: len(nb[x] & col) for x in nb}
    sk_count = dict(b_count)
    for w, s in told.items():
        if rules == "lists":
            dropped = s
            if not dropped <= nb[w] or len(nb[w] - dropped) < t:
                continue  # an invalid pair of lists: w refuses
            counted = nb[w] - dropped
        else:
            survivors = s
            in_s = nb[w] & survivors
            signed = all(x in col or (told.get(x) == survivors and x in survivors) for x in in_s)
            if w not in survivors or len(in_s) < t or not signed:
                continue
            counted, dropped = in_s, nb[w] - survivors
        for x in counted:
            b_count[x] += 1
        for x in dropped:
            sk_count[x] += 1
    if b_count[u] < t:
        return None
    if sk_count[u] >= t:
        return "B"
    if all(sk_count[v] >= t for v in nb[u] - col):
        return "A"
    return None


def _set_partitions(items: Sequence[int]) -> Iterator[dict[int, int]]:
    """Every partition of ``items`` as ``{item: block label}`` (restricted growth strings)."""
    labels = [0] * len(items)

    def grow(i: int, blocks: int) -> Iterator[dict[int, int]]:
        if i == len(items):
            yield dict(zip(items, labels, strict=True))
            return
        for b in range(blocks + 1):
            labels[i] = b
            yield from grow(i + 1, max(blocks, b + 1))

    if items:
        yield from grow(0, 0)
    else:
        yield {}


def _brute_consistency(case: _Case) -> Exposure:
    honest = sorted(case.nb.keys() - case.col)
    found_a: dict[int, frozenset[int]] | None = None
    tried = 0
    for labels in _set_partitions(honest):
        tried += 1
        groups: dict[int, set[int]] = {}
        for w, b in labels.items():
            groups.setdefault(b, set()).add(w)
        sent = {w: frozenset(groups[b]) | case.col for w, b in labels.items()}
        route = _play(case.nb, case.t, case.u, case.col, sent, "consistency")
        if route == "B":
            return Exposure(True, "B", f"partition {tried} of the honest clients works", sent)
        if route == "A" and found_a is None:
            found_a = sent
    if found_a is not None:
        return Exposure(True, "A", "a partition of the honest clients works", found_a)
    return Exposure(False, None, f"none of the {tried} partitions of the honest clients works")


def _undominated(rows: np.ndarray) -> np.ndarray:
    """The distinct rows that no other row matches or beats in every column."""
    rows = np.unique(rows, axis=0)
    ge = np.all(rows[None, :, :] >= rows[:, None, :], axis=2)  # ge[i, j]: row j >= row i
    np.fill_diagonal(ge, False)
    return rows[~np.any(ge, axis=1)]


def _reachable(case: _Case, secrets: Sequence[tuple[str, int]]) -> tuple[bool, int]:
    """Can every secret in ``secrets`` get ``t`` shares? Every answer of every honest client.

    ``secrets`` are ``("b", x)`` or ``("sk", x)``. Each honest client's valid answers
    (a dropped list ``D``, ``|N(w) - D| >= t``) are enumerated over the peers whose
    secrets are listed (dropping others only removes counted peers); answers whose
    share counts another answer matches or beats are skipped, partial assignments
    are merged by the counts they reach (clipped at ``t``), and counts the clients
    still to come cannot complete are dropped. Counts only grow, so all three are exact.
    """
    t = case.t
    index = {s: i for i, s in enumerate(secrets)}
    relevant = {x for _, x in secrets}
    states = np.minimum(np.asarray([[case.c(x) for _, x in secrets]], dtype=np.int16), t)
    clients = [
        (w, sorted(case.nb[w] & relevant))
        for w in sorted(case.nb.keys() - case.col)
        if case.nb[w] & relevant and case.d(w) >= t  # else: nothing that matters, or no answer
    ]
    # later[j][i]: clients after the j-th that hold a share of secret i (one each, at most)
    later = np.zeros((len(clients) + 1, len(secrets)), dtype=np.int16)
    for j in range(len(clients) - 1, -1, -1):
        later[j] = later[j + 1] + [x in clients[j][1] for _, x in secrets]
    for j, (w, peers) in enumerate(clients):
        moves = []
        for r in range(min(len(peers), case.d(w) - t) + 1):
            for dropped in itertools.combinations(peers, r):
                move = [0] * len(secrets)
                for x in peers:
                    i = index.get(("sk", x) if x in dropped else ("b", x))
                    if i is not None:
                        move[i] += 1
                moves.append(move)
        step = _undominated(np.asarray(moves, dtype=np.int16))
        grown = np.minimum(states[:, None, :] + step[None, :, :], t).reshape(-1, len(secrets))
        # keep only counts that the clients still to come could complete
        states = np.unique(grown[np.all(grown + later[j + 1] >= t, axis=1)], axis=0)
        if len(states) == 0 or np.any(np.all(states >= t, axis=1)):
            break
    return bool(np.any(np.all(states >= t, axis=1))), len(states)


def _brute_lists(case: _Case) -> Exposure:
    u = case.u
    ok_b, n_b = _reachable(case, [("b", u), ("sk", u)])
    if ok_b:
        return Exposure(True, "B", f"route B: reached t shares of b_u and s_sk_u ({n_b} states)")
    ok_a, n_a = _reachable(case, [("b", u), *(("sk", v) for v in case.honest_neighbours(u))])
    if ok_a:
        return Exposure(True, "A", f"route A: reached t shares of b_u and every key ({n_a} states)")
    return Exposure(
        False, None, f"no answers reach t shares for route B ({n_b} states) or A ({n_a} states)"
    )


def brute_force_exposable(
    graph: Mapping[int, Sequence[int]],
    t: int,
    victim: int,
    *,
    colluders: Iterable[int] = (),
    rules: Rules = "consistency",
) -> Exposure:
    """Exact answer by exhaustive search, for graphs of at most 9 nodes (the test oracle).

    ``"lists"``: every valid pair of lists for every honest client (dropping only
    peers whose secrets matter: others' shares change nothing), merged by the
    share counts they reach; no witness. ``"consistency"``: every partition of the honest
    clients (the exact reduction in the module docstring), each played by
    :func:`attack_succeeds`; the attack found is the ``witness``.
    """
    nb = _neighbours(graph)
    _check(nb, t, rules)
    if len(nb) > BRUTE_FORCE_MAX_NODES:
        raise SecureAggregationError(
            f"brute force is exponential: at most {BRUTE_FORCE_MAX_NODES} nodes, got "
            f"{len(nb)}; use exposable() for larger graphs"
        )
    case = _Case(nb, t, victim, _colluders(nb, victim, colluders))
    return _brute_lists(case) if rules == "lists" else _brute_consistency(case)
