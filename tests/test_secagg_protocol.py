"""SecAgg+ protocol core: exactness, dropouts at every stage, uniformity, tampering, failure.

The oracle is the plain weighted mean of the clipped updates
(``reference_mean``), and for which rounds must succeed, a direct restatement
of the rule in docs/security.md (``_expected_counted``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedcore.core.errors import SecureAggregationError
from fedcore.secagg.protocol.crypto import RoundBinding
from fedcore.secagg.protocol.graph import is_connected, resolve, round_degree
from fedcore.secagg.protocol.machine import (
    STAGE_CONFIRM,
    STAGE_KEYS,
    STAGE_MASKED,
    STAGE_SHARES,
    STAGE_UNMASK,
    ClientLimits,
    ClientRound,
    RoundParams,
)
from fedcore.secagg.protocol.quantize import Quantizer, encode
from fedcore.secagg.protocol.rosters import EphemeralIdentity, PinnedRoster
from fedcore.secagg.protocol.simulate import (
    STAGES,
    random_inputs,
    reference_mean,
    rounding_key,
    simulate_round,
)

Q64 = Quantizer(clip=4.0, bits=16, ring_bits=64)


def det_randbytes(seed: int):
    """A reproducible CSPRNG-quality byte stream (SHA-256 in counter mode) for tests."""
    counter = [0]

    def randbytes(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(b"%d/%d" % (seed, counter[0])).digest()
            counter[0] += 1
        return out[:n]

    return randbytes


def _core(members, graph, t):
    alive = set(members)
    while True:
        weak = {v for v in alive if len(set(graph[v]) & alive) < t}
        if not weak:
            return alive
        alive -= weak


def _expected_counted(nodes, k, t, drop, graph):
    """The documented rule: which clients are counted, or None if the round must fail.

    ``graph`` is the one the round fixed from its adverts (``None``: it failed before).
    """
    if t < 2 or 2 * t <= k:  # every client refuses a threshold that is not a majority
        return None
    gone: set[int] = set(drop.get(STAGE_KEYS, ()))
    u1 = set(nodes) - gone
    if len(u1) < 3 or round_degree(k, len(u1)) < t:
        return None
    assert graph is not None and set(graph) == u1
    gone |= set(drop.get(STAGE_SHARES, ()))
    u2 = _core(u1 - gone, graph, t)
    if len(u2) < 3:
        return None
    gone |= set(drop.get(STAGE_MASKED, ()))
    u3 = u2 - gone
    dropped = u2 - u3
    nb = {v: set(graph[v]) & u2 for v in u2}
    if len(u3) < 3 or any(len(nb[v] & u3) < t for v in u2) or not is_connected(u3, nb):
        return None
    if set(drop.get(STAGE_CONFIRM, ())) & u3:  # a survivor that does not confirm
        return None
    gone |= set(drop.get(STAGE_UNMASK, ()))
    responders = u3 - gone
    if any(len(nb[v] & responders) < t for v in u3 | dropped):
        return None
    return u3


@st.composite
def rounds(draw):
    n = draw(st.integers(3, 14))
    nodes = sorted(draw(st.sets(st.integers(1, 2**63), min_size=n, max_size=n)))
    k_cfg = draw(st.sampled_from([0, 2, 3, 4, 6, n - 1]))
    k, _ = resolve(n, k_cfg, 0)
    t_cfg = draw(st.integers(0, k))
    dim = draw(st.integers(1, 48))
    drop = {
        stage: draw(st.sets(st.sampled_from(nodes), max_size=max(1, n // 3))) for stage in STAGES
    }
    return nodes, k_cfg, t_cfg, dim, drop


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.property
@given(rounds(), st.integers(0, 2**32 - 1))
def test_secure_mean_equals_plain_weighted_mean_or_fails_cleanly(case, seed):
    """(a) + (b) + (e): exact within the bound whenever the rule allows, else a clean failure."""
    nodes, k_cfg, t_cfg, dim, drop = case
    inputs = random_inputs(nodes, dim, seed=seed % 1000, scale=2.0)
    k, t = resolve(len(nodes), k_cfg, t_cfg)
    record: dict = {}
    try:
        out = simulate_round(
            inputs, quantizer=Q64, neighbours=k_cfg, threshold=t_cfg, drop=drop, record=record
        )
    except SecureAggregationError:
        out = None
    expected = _expected_counted(nodes, k, t, drop, record.get("graph"))
    event("fails" if expected is None else "succeeds")
    if expected is None:
        assert out is None
        return
    assert out is not None
    assert set(out.counted) == expected
    n_total = sum(inputs[u].weight for u in expected)
    assert out.decoded.total_weight == n_total
    ref = reference_mean(inputs, Q64.clip, expected)
    bound = Q64.error_bound(len(expected), n_total)
    assert np.abs(out.decoded.mean - ref).max() < bound
    ref_m = sum(inputs[u].weight * inputs[u].metrics[0] for u in expected) / n_total
    assert abs(out.decoded.metrics[0] - ref_m) < len(expected) * Q64.metric_step / n_total


@pytest.mark.parametrize("stage", STAGES)
def test_dropout_at_each_stage_gives_the_exact_sum_of_the_counted(stage):
    """(b) 10 clients, two of them vanish at ``stage``; the rest is aggregated exactly."""
    nodes = [1000 + i for i in range(10)]
    inputs = random_inputs(nodes, 300, seed=3)
    gone = {1002, 1007}
    if stage == STAGE_CONFIRM:  # a survivor that does not confirm fails the round, unrevealed
        with pytest.raises(SecureAggregationError, match="did not confirm"):
            simulate_round(inputs, quantizer=Q64, drop={stage: gone})
        return
    out = simulate_round(inputs, quantizer=Q64, drop={stage: gone})
    counted = set(nodes) if stage == STAGE_UNMASK else set(nodes) - gone
    assert set(out.counted) == counted
    ref = reference_mean(inputs, Q64.clip, counted)
    assert np.abs(out.decoded.mean - ref).max() < Q64.error_bound(
        len(counted), out.decoded.total_weight
    )


def test_dropouts_at_every_stage_in_one_round_at_k_log_n():
    nodes = list(range(1, 41))  # n = 40 -> k = 14, t = 8
    inputs = random_inputs(nodes, 64, seed=4)
    drop = {STAGE_KEYS: {1, 2}, STAGE_SHARES: {3}, STAGE_MASKED: {4, 5}, STAGE_UNMASK: {6}}
    out = simulate_round(inputs, quantizer=Q64, drop=drop)
    counted = set(nodes) - {1, 2, 3, 4, 5}
    assert set(out.counted) == counted
    ref = reference_mean(inputs, Q64.clip, counted)
    assert np.abs(out.decoded.mean - ref).max() < Q64.error_bound(35, out.decoded.total_weight)


def test_what_the_server_receives_from_a_client_is_uniform_and_not_its_update():
    """(c) chi-square over each byte of one client's masked vector (deterministic stream)."""
    nodes = [10, 11, 12, 13, 14]
    # structured, very non-uniform updates: mostly zeros
    inputs = random_inputs(nodes, 40_000, seed=5, scale=0.0)
    out = simulate_round(inputs, quantizer=Q64, keep_received=True, randbytes=det_randbytes(1))
    y = out.server_received[12]
    enc = encode(
        inputs[12].delta, inputs[12].weight, inputs[12].metrics, Q64, rounding_key(0, 1, 12)
    )
    assert not np.array_equal(y, enc)
    assert np.count_nonzero(y == enc) <= 2  # equal words only by chance (p = 2^-64 each)
    as_bytes = y.view(np.uint8).reshape(-1, 8)
    for b in range(8):  # every byte position of the 64-bit words is uniform
        counts = np.bincount(as_bytes[:, b], minlength=256)
        assert chisquare(counts).pvalue > 1e-4, b
    # the same test does reject the unmasked encoding: it has the power to fail
    raw = enc.view(np.uint8).reshape(-1, 8)
    assert chisquare(np.bincount(raw[:, 7], minlength=256)).pvalue < 1e-12


def test_tampered_relayed_share_is_rejected_and_the_round_still_completes():
    """(d) a flipped bit in one box: the receiver refuses that share; t others suffice."""
    nodes = [1, 2, 3, 4, 5, 6]
    inputs = random_inputs(nodes, 50, seed=6)

    def tamper(src, dst, box):
        return box[:-1] + bytes([box[-1] ^ 1]) if (src, dst) == (2, 5) else box

    out = simulate_round(inputs, quantizer=Q64, tamper=tamper)
    assert out.rejected_shares == [(2, 5)]
    ref = reference_mean(inputs, Q64.clip, nodes)
    assert np.abs(out.decoded.mean - ref).max() < Q64.error_bound(6, out.decoded.total_weight)


def _manual_round(nodes, t, k=None, session=b"a" * 16, server_round=1):
    """Clients of one attempt driven by hand through stages 1 and 2 (complete graph by default)."""
    k = len(nodes) - 1 if k is None else k
    params = RoundParams(RoundBinding(1, server_round, session), t, Q64, neighbours=k)
    ids = {u: EphemeralIdentity.generate() for u in nodes}
    cs, ads = {}, {}
    for u in nodes:
        cs[u], ads[u] = ClientRound.start(u, params, ids[u])
    listing = [(u, ads[u].digest()) for u in sorted(nodes)]
    return params, ids, cs, ads, listing


def _share_all(cs, ads, listing):
    rosters = {u: PinnedRoster({}) for u in cs}
    boxes = {
        u: cs[u].share(listing, [ads[v] for v in cs if v != u], ads[u], rosters[u]) for u in cs
    }
    return boxes, rosters


def test_replayed_or_rerouted_share_box_is_rejected():
    """(d) a box from another round, or relayed as if from another sender, does not open."""
    nodes = [1, 2, 3, 4]
    _, _, cs, ads, listing = _manual_round(nodes, 3)
    boxes, _ = _share_all(cs, ads, listing)
    # rerouted: 1's box for 4 relayed as if it came from 2
    to4 = {v: boxes[v][4] for v in (1, 2, 3)}
    to4[2] = boxes[1][4]
    assert cs[4].receive_shares(to4) == [2]
    # replayed from an earlier round with the same keys: the round binding differs
    later = RoundParams(RoundBinding(1, 2, b"a" * 16), 3, Q64, neighbours=3)
    c3 = ClientRound.from_json(cs[3].to_json())
    c3.params = later
    assert sorted(c3.receive_shares({v: boxes[v][3] for v in (1, 2, 4)})) == [1, 2, 4]


def test_bad_signature_removes_that_client_from_the_round():
    """(d) an advert whose signature fails: that client is out, the others are aggregated."""
    nodes = [1, 2, 3, 4, 5, 6, 7]
    inputs = random_inputs(nodes, 30, seed=7)
    out = simulate_round(inputs, quantizer=Q64, bad_signature={4})
    assert 4 not in out.counted and set(out.counted) == set(nodes) - {4}
    assert [(r.node_id, r.stage) for r in out.rejected] == [(4, STAGE_KEYS)]
    assert "signature" in out.rejected[0].reason
    ref = reference_mean(inputs, Q64.clip, out.counted)
    assert np.abs(out.decoded.mean - ref).max() < Q64.error_bound(6, out.decoded.total_weight)


def test_client_refuses_a_swapped_key_and_unsigned_neighbours():
    nodes = [1, 2, 3]
    params, ids, cs, ads, listing = _manual_round(nodes, 2)
    # the server replaces 2's mask key by its own but keeps 2's signature ...
    mallory, mad = ClientRound.start(2, params, EphemeralIdentity.generate())
    swapped = type(ads[2])(
        2,
        ads[2].c_pk,
        mad.s_pk,
        ads[2].b_commit,
        ads[2].max_weight,
        ads[2].credential,
        ads[2].signature,
    )
    with pytest.raises(SecureAggregationError, match="not the one listed"):
        cs[1].share(listing, [swapped, ads[3]], ads[1], PinnedRoster({}))
    # ... and lists the swapped advert (with 3 clients the graph is complete either way)
    relisted = [(u, swapped.digest() if u == 2 else d) for u, d in listing]
    with pytest.raises(SecureAggregationError, match="signature"):
        cs[1].share(relisted, [swapped, ads[3]], ads[1], PinnedRoster({}))
    # ... or re-signs it with another identity after 1 pinned 2's identity
    pins: dict[int, bytes] = {}
    PinnedRoster(pins).verify(2, ads[2].credential, b"", ids[2].sign(b""))
    relisted = [(u, mad.digest() if u == 2 else d) for u, d in listing]
    with pytest.raises(SecureAggregationError, match="pinned"):
        cs[1].share(relisted, [mad, ads[3]], ads[1], PinnedRoster(pins))
    # ... or leaves this client's own advert out of the listing
    with pytest.raises(SecureAggregationError, match="own advert"):
        cs[1].share(listing[1:], [ads[2], ads[3]], ads[1], PinnedRoster({}))


def test_too_few_survivors_fails_before_any_share_is_revealed():
    """(e) 6 of 10 vanish after sharing: the server refuses to ask for shares."""
    nodes = list(range(100, 110))
    inputs = random_inputs(nodes, 20, seed=8)
    with pytest.raises(SecureAggregationError, match="no share was requested"):
        simulate_round(inputs, quantizer=Q64, drop={STAGE_MASKED: set(nodes[:6])})
    with pytest.raises(SecureAggregationError, match="at least"):
        simulate_round(inputs, quantizer=Q64, drop={STAGE_KEYS: set(nodes[:8])})


def test_too_few_unmask_replies_fails_cleanly():
    nodes = list(range(100, 110))  # k = 9, t = 5
    inputs = random_inputs(nodes, 20, seed=9)
    with pytest.raises(SecureAggregationError, match="t = 5 needed"):
        simulate_round(inputs, quantizer=Q64, drop={STAGE_UNMASK: set(nodes[:6])})


def test_client_reveals_at_most_one_kind_of_share_per_peer():
    """Stage 4/5 rules: one signed survivor set, answered once and strictly by it."""
    nodes = [1, 2, 3, 4, 5]
    params, ids, cs, ads, listing = _manual_round(nodes, 3)
    boxes, rosters = _share_all(cs, ads, listing)
    content = b"c" * 32
    for u in nodes:
        cs[u].receive_shares({v: boxes[v][u] for v in nodes if v != u})
    c = cs[1]
    with pytest.raises(SecureAggregationError, match="out of order"):
        c.confirm([1, 2, 3, 4], ids[1])  # before its masked vector
    for u in nodes:
        cs[u].mask(np.zeros(5, dtype=np.uint64), content)
    with pytest.raises(SecureAggregationError, match="does not contain this client"):
        c.confirm([2, 3, 4, 5], ids[1])
    with pytest.raises(SecureAggregationError, match="refusing to confirm"):
        c.confirm([1, 2, 3], ids[1])  # fewer than t counted neighbours
    survivors = [1, 2, 3, 4]
    sigs = {u: cs[u].confirm(survivors, ids[u]) for u in survivors}
    with pytest.raises(SecureAggregationError, match="out of order"):
        c.confirm([1, 2, 3, 5], ids[1])  # a second survivor view is never signed
    # a neighbour's confirmation missing, or over another set: nothing is revealed
    with pytest.raises(SecureAggregationError, match="missing"):
        c.unmask({v: sigs[v] for v in (2, 3)}, rosters[1])
    other = ClientRound.from_json(cs[4].to_json())
    other.survivors = (1, 2, 3, 4, 5)
    forged = ids[4].sign(other.statement())
    with pytest.raises(SecureAggregationError, match="did not confirm the same"):
        c.unmask({**sigs, 4: forged}, rosters[1])
    reply = c.unmask(sigs, rosters[1])
    assert set(reply.b_shares) == {2, 3, 4} and set(reply.sk_shares) == {5}
    with pytest.raises(SecureAggregationError, match="out of order"):
        c.unmask(sigs, rosters[1])  # a second request could ask for other shares


def test_client_refuses_to_reveal_for_a_neighbour_given_another_model():
    """A server that sends one client a different model or config (to isolate it in the
    sum) gets no b-share of that client: its neighbours see a different statement."""
    nodes = [1, 2, 3, 4, 5]
    _, ids, cs, ads, listing = _manual_round(nodes, 3)
    boxes, rosters = _share_all(cs, ads, listing)
    for u in nodes:
        cs[u].receive_shares({v: boxes[v][u] for v in nodes if v != u})
        cs[u].mask(np.zeros(5, dtype=np.uint64), b"victim" * 6 if u == 5 else b"other" * 6)
    sigs = {u: cs[u].confirm(nodes, ids[u]) for u in nodes}
    for u in (1, 2, 3, 4):
        with pytest.raises(SecureAggregationError, match="neighbour 5 did not confirm"):
            cs[u].unmask({v: sigs[v] for v in nodes if v != u}, rosters[u])


def test_clients_refuse_a_threshold_that_is_not_a_majority_or_below_their_minimum():
    ident = EphemeralIdentity.generate()
    for t, k, match in [(2, 4, "strict majority"), (1, 2, "min-threshold"), (3, 2, "majority")]:
        params = RoundParams(RoundBinding(1, 1, b"s" * 16), t, Q64, neighbours=k)
        with pytest.raises(SecureAggregationError, match=match):
            ClientRound.start(9, params, ident)
    params = RoundParams(RoundBinding(1, 1, b"s" * 16), 4, Q64, neighbours=6)
    with pytest.raises(SecureAggregationError, match="min-neighbours = 8"):
        ClientRound.start(9, params, ident, limits=ClientLimits(min_neighbours=8))
    ClientRound.start(9, params, ident)  # 4 of 6 is a majority: accepted


def test_client_state_round_trips_through_json_without_losing_secrets():
    params = RoundParams(RoundBinding(7, 2, b"z" * 16), 2, Q64, ("train_loss",), neighbours=3)
    c, _ = ClientRound.start(9, params, EphemeralIdentity.generate())
    back = ClientRound.from_json(c.to_json())
    assert back == c
