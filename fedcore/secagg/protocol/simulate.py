"""A whole secure round in one process, with dropouts injected at any stage (test oracle).

Bell et al., CCS 2020; Bonawitz et al., CCS 2017. This drives
:class:`~fedcore.secagg.protocol.ClientRound` and
:class:`~fedcore.secagg.protocol.ServerRound` exactly as the Flower shell does,
minus the network, so properties of the protocol (exactness, dropout
tolerance, clean failure) can be checked quickly; :func:`reference_mean` is the
plain weighted mean it must match within the bound of
:mod:`fedcore.secagg.protocol.quantize`. Benchmarks use it to time the protocol at
1,000 clients.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcore.core.errors import SecureAggregationError
from fedcore.core.records import Rejection
from fedcore.secagg.protocol.crypto import RandBytes, RoundBinding
from fedcore.secagg.protocol.graph import resolve
from fedcore.secagg.protocol.machine import (
    STAGE_CONFIRM,
    STAGE_KEYS,
    STAGE_MASKED,
    STAGE_SHARES,
    STAGE_UNMASK,
    Advert,
    ClientLimits,
    ClientRound,
    RoundParams,
    ServerRound,
    UnmaskReply,
    rounding_key,
)
from fedcore.secagg.protocol.quantize import Decoded, Quantizer, decode, encode, extra_coordinates
from fedcore.secagg.protocol.rosters import EphemeralIdentity, PinnedRoster

__all__ = ["ClientInput", "SimulatedRound", "reference_mean", "rounding_key", "simulate_round"]

STAGES = (STAGE_KEYS, STAGE_SHARES, STAGE_MASKED, STAGE_CONFIRM, STAGE_UNMASK)


@dataclass(frozen=True)
class ClientInput:
    """One client's update, weight and metrics."""

    delta: np.ndarray
    weight: int
    metrics: tuple[float, ...] = ()


@dataclass
class SimulatedRound:
    """What a simulated round produced."""

    decoded: Decoded
    counted: tuple[int, ...]
    rejected: list[Rejection] = field(default_factory=list)
    server_received: dict[int, np.ndarray] = field(default_factory=dict)
    rejected_shares: list[tuple[int, int]] = field(default_factory=list)


def reference_mean(
    inputs: Mapping[int, ClientInput], clip: float, counted: Collection[int]
) -> np.ndarray:
    """Plain weighted mean of the clipped updates of ``counted`` (float64)."""
    total = sum(inputs[u].weight for u in counted)
    acc = np.zeros_like(np.asarray(next(iter(inputs.values())).delta, dtype=np.float64))
    for u in counted:
        acc += inputs[u].weight * np.clip(
            np.asarray(inputs[u].delta, dtype=np.float64), -clip, clip
        )
    return acc / total


def simulate_round(
    inputs: Mapping[int, ClientInput],
    *,
    quantizer: Quantizer,
    neighbours: int = 0,
    threshold: int = 0,
    drop: Mapping[str, Collection[int]] | None = None,
    seed: int = 0,
    server_round: int = 1,
    randbytes: RandBytes = os.urandom,
    tamper: Callable[[int, int, bytes], bytes] | None = None,
    bad_signature: Collection[int] = (),
    keep_received: bool = False,
    record: dict[str, object] | None = None,
) -> SimulatedRound:
    """Run one secure round over ``inputs`` (``{node_id: ClientInput}``).

    Parameters
    ----------
    inputs : Mapping[int, ClientInput]
        Each client's update, weight and metrics, keyed by node id.
    quantizer : Quantizer
        Encoding parameters.
    neighbours, threshold : int (default: 0 = auto)
        ``k`` and ``t`` as in the ``[secagg]`` config.
    seed, server_round : int
        Seed of the graph and of stochastic rounding; the round number.
    randbytes : callable (default: ``os.urandom``)
        Source of the clients' secrets (a test may pass a seeded CSPRNG).
    drop : Mapping[str, Collection[int]], optional
        ``{stage: nodes}``: each node goes silent from that stage on (it does not
        reply to it), e.g. ``{"secagg-masked": {3}}`` drops node 3 after it sent
        its shares.
    tamper : callable, optional
        ``(src, dst, box) -> box`` applied to every relayed share box.
    bad_signature : Collection[int]
        Nodes whose advert signature is corrupted in transit.
    keep_received : bool
        Keep each masked vector the server received (for statistical tests).
    record : dict, optional
        Filled as the round goes: ``"graph"`` (fixed after stage 1, from the adverts).

    Raises
    ------
    SecureAggregationError
        When the round cannot complete (too few survivors at some stage).

    """
    drop = drop or {}
    silent: set[int] = set()
    nodes = sorted(inputs)
    k, t = resolve(len(nodes), neighbours, threshold)
    num_metrics = len(next(iter(inputs.values())).metrics)
    dim = next(iter(inputs.values())).delta.size + extra_coordinates(num_metrics)
    params = RoundParams(
        binding=RoundBinding(
            1, server_round, hashlib.sha256(b"session%d" % server_round).digest()[:16]
        ),
        threshold=t,
        quantizer=quantizer,
        metric_keys=tuple(f"m{i}" for i in range(num_metrics)),
        rounding_seed=seed,
        neighbours=k,
    )
    limits = ClientLimits(max_weight=max(x.weight for x in inputs.values()))
    identities = {u: EphemeralIdentity.generate() for u in nodes}
    server = ServerRound(params, nodes, dim, roster=PinnedRoster({}))
    content = hashlib.sha256(b"the model and config of this round").digest()

    def active(stage: str) -> list[int]:
        silent.update(drop.get(stage, ()))
        return [u for u in nodes if u not in silent]

    clients: dict[int, ClientRound] = {}
    adverts: dict[int, Advert] = {}
    own: dict[int, Advert] = {}
    for u in active(STAGE_KEYS):
        clients[u], adv = ClientRound.start(u, params, identities[u], randbytes, limits=limits)
        own[u] = adv
        if u in bad_signature:
            adv = Advert(
                adv.node_id,
                adv.c_pk,
                adv.s_pk,
                adv.b_commit,
                adv.max_weight,
                adv.credential,
                bytes([adv.signature[0] ^ 1]) + adv.signature[1:],
            )
        adverts[u] = adv
    listing, bundles = server.collect_adverts(adverts)
    if record is not None:
        record["graph"] = dict(server.graph)

    rosters = {u: PinnedRoster({}) for u in nodes}
    boxes: dict[int, dict[int, bytes]] = {}
    for u in active(STAGE_SHARES):
        if u in bundles:
            try:
                boxes[u] = clients[u].share(listing, bundles[u], own[u], rosters[u], randbytes)
            except SecureAggregationError:
                continue
    relay = server.collect_shares(boxes)

    received: dict[int, np.ndarray] = {}
    rejected_shares: list[tuple[int, int]] = []
    for u in active(STAGE_MASKED):
        if u not in relay:
            continue
        sealed = relay[u]
        if tamper is not None:
            sealed = {v: tamper(v, u, box) for v, box in sealed.items()}
        rejected_shares += [(v, u) for v in clients[u].receive_shares(sealed)]
        x = inputs[u]
        enc = encode(x.delta, x.weight, x.metrics, quantizer, params.rounding_key(u))
        y = clients[u].mask(enc, content)
        server.add_masked(u, y)
        if keep_received:
            received[u] = y
    survivors = server.survivor_set()

    signatures = {
        u: clients[u].confirm(survivors, identities[u])
        for u in active(STAGE_CONFIRM)
        if u in server.u3
    }
    requests = server.collect_confirmations(signatures, {u: content for u in survivors})

    replies: dict[int, UnmaskReply] = {}
    for u in active(STAGE_UNMASK):
        if u in requests:
            replies[u] = clients[u].unmask(requests[u], rosters[u])
    counted = tuple(sorted(server.u3))
    total = server.finish(replies)
    decoded = decode(total, quantizer, num_metrics, len(counted))
    return SimulatedRound(decoded, counted, list(server.rejected), received, rejected_shares)


def random_inputs(
    nodes: Sequence[int], dim: int, *, seed: int, scale: float = 1.0, metrics: int = 1
) -> dict[int, ClientInput]:
    """Reproducible random updates and weights for tests and benchmarks."""
    g = np.random.default_rng(seed)
    return {
        u: ClientInput(
            delta=(g.standard_normal(dim) * scale).astype(np.float32),
            weight=int(g.integers(1, 500)),
            metrics=tuple(float(v) for v in g.uniform(0, 3, metrics)),
        )
        for u in nodes
    }
