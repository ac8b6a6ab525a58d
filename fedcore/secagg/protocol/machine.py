"""The SecAgg+ protocol as two pure state machines: :class:`ClientRound`, :class:`ServerRound`.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020 (SecAgg+), generalizing Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017, with the
latter's consistency check (its Sec. 4, "active adversary") adapted to the graph.

One round (one *attempt*: a retried round gets a fresh session nonce and fresh
keys), five exchanges; the server relays everything, clients never talk directly::

    1 keys     server -> u : parameters (t, k, encoding, session)
               u -> server : signed advert (c_pk, s_pk, commit(b_u), weight cap, and a
                             digest of the parameters it was given)
    2 shares   server -> u : the listing of every accepted advert (node, digest) and
                             the full adverts of u's neighbours; the graph is a
                             function of the listing (fixed only now), recomputed by u
               u -> server : Shamir t-of-k shares of (b_u, s_sk_u), one AEAD box per neighbour
    3 masked   server -> u : boxes addressed to u from neighbours in U2, the model
               u -> server : y_u = x_u + PRG(b_u) + sum_{v in N(u) cap U2} +-PRG(s_uv)   (mod 2^R)
    4 confirm  server -> u : the survivor set S = U3 (one set, the same for everyone)
               u -> server : sig_u(binding, H(S), D_u)  with D_u the digest of the model
                             and config u trained on
    5 unmask   server -> u : the confirmations of u's neighbours in S
               u -> server : b-shares of neighbours in S, s_sk-shares of those not in S

The server sums the y_u of U3, reconstructs b_u (u in U3) and s_sk_v (v in D)
from >= t shares each, and removes PRG(b_u) and the masks shared with dropped
clients: what is left is the sum of the x_u over U3 and nothing else.

What an honest client enforces, whatever the server sends (each rule defeats an
attack in ``tests/test_secagg_adversarial.py``):

- ``2t > k``, ``t >= min_threshold``, ``k >= min_neighbours`` (its own config), and
  the same for the degree it actually shares with; the parameters are signed into
  its advert, so neighbours given other parameters fail signature checks;
- its neighbours are the ones the listing's graph gives it, each advert signed by a
  key its roster accepts, no key twice in a round;
- one attempt per session: a repeated or out-of-order stage is refused;
- it reveals shares only if *every* neighbour the set S counts signed the identical
  statement (same S, same model and config digest), at least ``t`` of them, and only
  by that S: b-shares for neighbours in S, key shares for the others. Honest clients
  sign one statement per attempt, so no two honest neighbours can be given different
  survivor views, and a client trained on a different model or config than its
  neighbours (a server isolating it) makes them refuse to reveal its b-share.

With ``2t > k`` a server colluding with fewer than ``2t - k`` of a client's
neighbours cannot unmask that client's individual vector (``fedcore.secagg.protocol
.exposure`` checks it on the real graphs).

Dropouts: after stage 2 the server prunes the set to its *t-core* (everyone keeps
>= t neighbours); after 3, before asking for anything, it checks that every counted
client and every dropped one has >= t counted neighbours and that the counted
clients are connected; a client that does not confirm fails the round (its
neighbours cannot reveal without its signature), still before any share is
revealed; during 5, missing replies only matter if some secret ends up with fewer
than t valid shares. A bad share does not fail the round: the commitments identify
the right reconstruction and the shares that disagree with it.

Pure: no sockets, no clock, no global RNG; secrets come from the ``randbytes``
callable (``os.urandom`` by default).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcore.core.errors import SecureAggregationError
from fedcore.core.records import Rejection
from fedcore.secagg.protocol import shamir
from fedcore.secagg.protocol.crypto import (
    RandBytes,
    RoundBinding,
    add_keystreams,
    aead_open,
    aead_seal,
    agree,
    commit,
    derive_key,
    new_field_secret,
    new_x25519_secret,
    pair_key,
    x25519_private,
    x25519_public,
)
from fedcore.secagg.protocol.graph import (
    graph_seed,
    harary_graph,
    is_connected,
    neighbours_of,
    round_degree,
)
from fedcore.secagg.protocol.quantize import Quantizer
from fedcore.secagg.protocol.rosters import Identity, Roster

__all__ = [
    "Advert",
    "ClientLimits",
    "ClientRound",
    "RoundParams",
    "ServerRound",
    "UnmaskReply",
    "consistency_message",
    "rounding_key",
    "set_digest",
]

_SHARE_LABEL = b"share-channel"
_MASK_LABEL = b"pairwise-mask"
_SELF_LABEL = b"self-mask"

STAGE_KEYS = "secagg-keys"
STAGE_SHARES = "secagg-shares"
STAGE_MASKED = "secagg-masked"
STAGE_CONFIRM = "secagg-confirm"
STAGE_UNMASK = "secagg-unmask"
_DONE = "done"

#: Most share subsets tried per secret when some shares are bad (C(12, 7) = 792).
MAX_RECOVERY_SUBSETS = 5000


@dataclass(frozen=True)
class RoundParams:
    """Public parameters of one secure attempt (sent to every client in stage 1)."""

    binding: RoundBinding
    threshold: int
    quantizer: Quantizer
    metric_keys: tuple[str, ...] = ()
    rounding_seed: int = 0
    neighbours: int = 0
    attempt: int = 0

    def rounding_key(self, node_id: int) -> bytes:
        """Key of ``node_id``'s stochastic-rounding stream this round (public, reproducible)."""
        return rounding_key(self.rounding_seed, self.binding.server_round, node_id)

    def to_dict(self) -> dict[str, int | float | str | bytes]:
        """Flat scalar form (a Flower ``ConfigRecord`` holds it)."""
        q = self.quantizer
        return {
            "run-id": self.binding.run_id,
            "server-round": self.binding.server_round,
            "session": self.binding.session,
            "attempt": self.attempt,
            "threshold": self.threshold,
            "neighbours": self.neighbours,
            "clip": q.clip,
            "bits": q.bits,
            "ring-bits": q.ring_bits,
            "metric-clip": q.metric_clip,
            "metric-keys": ",".join(self.metric_keys),
            "rounding-seed": self.rounding_seed,
        }

    def digest(self) -> bytes:
        """SHA-256 of the canonical parameters: signed into every advert."""
        d = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in self.to_dict().items()}
        text = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(b"fedcore/secagg/params\x00" + text.encode()).digest()

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> RoundParams:
        """Inverse of :meth:`to_dict` (``SecureAggregationError`` if malformed)."""
        try:
            keys = str(d["metric-keys"])
            return cls(
                binding=RoundBinding(
                    int(d["run-id"]),  # type: ignore[call-overload]
                    int(d["server-round"]),  # type: ignore[call-overload]
                    bytes(d["session"]),  # type: ignore[arg-type, call-overload]
                ),
                threshold=int(d["threshold"]),  # type: ignore[call-overload]
                quantizer=Quantizer(
                    clip=float(d["clip"]),  # type: ignore[arg-type]
                    bits=int(d["bits"]),  # type: ignore[call-overload]
                    ring_bits=int(d["ring-bits"]),  # type: ignore[call-overload]
                    metric_clip=float(d["metric-clip"]),  # type: ignore[arg-type]
                ),
                metric_keys=tuple(keys.split(",")) if keys else (),
                rounding_seed=int(d.get("rounding-seed", 0)),  # type: ignore[call-overload]
                neighbours=int(d["neighbours"]),  # type: ignore[call-overload]
                attempt=int(d.get("attempt", 0)),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecureAggregationError(
                f"malformed secure-aggregation parameters: {exc!r}"
            ) from None


def rounding_key(seed: int, server_round: int, node_id: int) -> bytes:
    """Return the 256-bit stochastic-rounding key of a node in a round.

    Not a secret: rounding only needs to be unbiased, and seeding it from the
    run seed keeps a secure run reproducible (same seed, same model).
    """
    h = hashlib.sha256(b"fedcore/secagg/rounding\x00")
    h.update(struct.pack(">QQQ", seed & (2**64 - 1), server_round, node_id & (2**64 - 1)))
    return h.digest()


def _pack(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _unpack(data: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(data):
            raise SecureAggregationError("truncated record")
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise SecureAggregationError("truncated record")
        out.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise SecureAggregationError("trailing bytes in record")
    return out


def set_digest(nodes: Iterable[int]) -> bytes:
    """SHA-256 of a node set (sorted, distinct): what a confirmation names."""
    ids = sorted(set(int(v) for v in nodes))
    return hashlib.sha256(b"fedcore/secagg/set\x00" + struct.pack(f">{len(ids)}Q", *ids)).digest()


def consistency_message(binding: RoundBinding, survivors: bytes, content: bytes) -> bytes:
    """What a client signs in stage 4: the attempt, the survivor set, its model and config."""
    return (
        b"fedcore/secagg/consistency\x00"
        + binding.encode()
        + struct.pack(">H", len(survivors))
        + survivors
        + struct.pack(">H", len(content))
        + content
    )


@dataclass(frozen=True)
class Advert:
    """A client's signed stage-1 message: its two X25519 public keys, commitment and cap."""

    node_id: int
    c_pk: bytes
    s_pk: bytes
    b_commit: bytes
    max_weight: int
    credential: bytes
    signature: bytes

    @staticmethod
    def signed_message(
        binding: RoundBinding,
        params: bytes,
        node_id: int,
        c_pk: bytes,
        s_pk: bytes,
        b_commit: bytes,
        max_weight: int,
    ) -> bytes:
        """What the identity key signs: domain, binding, parameters, node, keys, commitment, cap."""
        return (
            b"fedcore/secagg/advert/2\x00"
            + binding.encode()
            + params
            + struct.pack(">Q", node_id)
            + c_pk
            + s_pk
            + b_commit
            + struct.pack(">Q", max_weight)
        )

    def to_bytes(self) -> bytes:
        """Length-prefixed encoding (no pickle)."""
        return _pack(
            struct.pack(">Q", self.node_id),
            self.c_pk,
            self.s_pk,
            self.b_commit,
            struct.pack(">Q", self.max_weight),
            self.credential,
            self.signature,
        )

    def digest(self) -> bytes:
        """SHA-256 of :meth:`to_bytes` (the listing names adverts by it)."""
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Advert:
        """Inverse of :meth:`to_bytes`; checks key and commitment lengths."""
        nid, c_pk, s_pk, com, cap, cred, sig = _unpack(bytes(data), 7)
        if len(nid) != 8 or len(c_pk) != 32 or len(s_pk) != 32 or len(com) != 32 or len(cap) != 8:
            raise SecureAggregationError("malformed advert (field lengths)")
        (max_weight,) = struct.unpack(">Q", cap)
        if max_weight < 1:
            raise SecureAggregationError("malformed advert (weight cap < 1)")
        return cls(struct.unpack(">Q", nid)[0], c_pk, s_pk, com, max_weight, cred, sig)

    def verify(self, params: RoundParams, roster: Roster) -> bytes:
        """Check the signature with ``roster`` against ``params``; returns the key fingerprint."""
        msg = self.signed_message(
            params.binding,
            params.digest(),
            self.node_id,
            self.c_pk,
            self.s_pk,
            self.b_commit,
            self.max_weight,
        )
        return roster.verify(self.node_id, self.credential, msg, self.signature)


@dataclass(frozen=True)
class UnmaskReply:
    """Stage-5 reply: ``{peer: share}`` of self-mask seeds and of mask keys."""

    b_shares: dict[int, int]
    sk_shares: dict[int, int]


@dataclass(frozen=True)
class ClientLimits:
    """What a client's own config enforces on every round (never the server's).

    Parameters
    ----------
    min_neighbours, min_threshold : int (default: 2)
        Refuse a round with fewer neighbours ``k`` or a lower threshold ``t``.
    max_weight : int (default: 1,000,000)
        This client's weight cap, signed into its advert; it refuses to send more.

    """

    min_neighbours: int = 2
    min_threshold: int = 2
    max_weight: int = 1_000_000

    def check(self, t: int, k: int, what: str) -> None:
        """Refuse ``(t, k)`` unless ``2t > k``, ``t <= k`` and the local minimums hold."""
        if k < self.min_neighbours:
            raise SecureAggregationError(
                f"{what}: {k} neighbour(s), below this client's minimum "
                f"secagg.min-neighbours = {self.min_neighbours}: refusing the round"
            )
        if t < self.min_threshold:
            raise SecureAggregationError(
                f"{what}: threshold {t} is below this client's minimum "
                f"secagg.min-threshold = {self.min_threshold}: refusing the round"
            )
        if not 2 * t > k or t > k:
            raise SecureAggregationError(
                f"{what}: threshold {t} with {k} neighbour(s) is not a strict majority "
                f"(need k/2 < t <= k): a server could split the neighbours in two and "
                "unmask this client; refusing the round"
            )


def _share_bytes(value: int) -> bytes:
    return value.to_bytes(32, "little")


def _self_key(b: int, binding: RoundBinding, node_id: int) -> bytes:
    return derive_key(_share_bytes(b), _SELF_LABEL, binding, node_id)


def _listing_nodes(listing: Sequence[tuple[int, bytes]]) -> list[int]:
    nodes = [int(v) for v, _ in listing]
    if nodes != sorted(set(nodes)):
        raise SecureAggregationError("the advert listing is not sorted by distinct node id")
    if any(len(d) != 32 for _, d in listing):
        raise SecureAggregationError("the advert listing has a malformed digest")
    return nodes


@dataclass
class ClientRound:
    """A client's state for one attempt; persisted between stages with :meth:`to_json`."""

    node_id: int
    params: RoundParams
    c_sk: int
    s_sk: int
    b: int
    limits: ClientLimits = field(default_factory=ClientLimits)
    stage: str = STAGE_KEYS
    neighbours: tuple[int, ...] = ()
    members: tuple[int, ...] = ()
    peers: dict[int, Advert] = field(default_factory=dict)
    held: dict[int, tuple[int, int]] = field(default_factory=dict)
    maskers: tuple[int, ...] = ()
    content: bytes = b""
    survivors: tuple[int, ...] = ()

    # -- stage 1 ----------------------------------------------------------------
    @classmethod
    def start(
        cls,
        node_id: int,
        params: RoundParams,
        identity: Identity,
        randbytes: RandBytes = os.urandom,
        *,
        limits: ClientLimits | None = None,
    ) -> tuple[ClientRound, Advert]:
        """Check the parameters against this client's limits; fresh keys; the signed advert."""
        limits = limits or ClientLimits()
        limits.check(params.threshold, params.neighbours, "the server's parameters")
        me = cls(
            node_id=node_id,
            params=params,
            c_sk=new_x25519_secret(randbytes),
            s_sk=new_x25519_secret(randbytes),
            b=new_field_secret(randbytes),
            limits=limits,
        )
        c_pk, s_pk = x25519_public(me.c_sk), x25519_public(me.s_sk)
        b_commit = commit(me.b, params.binding, node_id)
        msg = Advert.signed_message(
            params.binding, params.digest(), node_id, c_pk, s_pk, b_commit, limits.max_weight
        )
        sig = identity.sign(msg)
        advert = Advert(node_id, c_pk, s_pk, b_commit, limits.max_weight, identity.credential, sig)
        return me, advert

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecureAggregationError(
                f"round {self.params.binding.server_round}: request for the stage after "
                f"'{stage}' but this client is at '{self.stage}' (out of order or repeated)"
            )

    # -- stage 2 ----------------------------------------------------------------
    def share(
        self,
        listing: Sequence[tuple[int, bytes]],
        adverts: Iterable[Advert],
        own: Advert,
        roster: Roster,
        randbytes: RandBytes = os.urandom,
    ) -> dict[int, bytes]:
        """Recompute this client's neighbours from ``listing``; verify their adverts; shares.

        ``listing`` is every advert the server accepted, as ``(node, digest)``
        sorted by node; ``own`` is this client's advert (its digest must be listed).

        Raises
        ------
        SecureAggregationError
            If this client's advert is not listed, an advert is missing, not from a
            neighbour, not listed, repeated, badly signed, carries a key seen twice,
            or the degree breaks this client's limits.

        """
        self._expect(STAGE_KEYS)
        params = self.params
        nodes = _listing_nodes(listing)
        digests = dict(listing)
        if digests.get(self.node_id) != own.digest():
            raise SecureAggregationError(
                "the advert listing does not carry this client's own advert: refusing to share"
            )
        k = round_degree(params.neighbours, len(nodes))
        self.limits.check(params.threshold, k, f"the graph over {len(nodes)} clients")
        seed = graph_seed(params.binding.encode(), listing)
        mine = neighbours_of(
            nodes, k, self.node_id, seed=seed, server_round=params.binding.server_round
        )
        peers: dict[int, Advert] = {}
        seen: set[bytes] = set()
        for adv in adverts:
            v = adv.node_id
            if v not in mine or v in peers:
                raise SecureAggregationError(
                    f"advert of node {v} is not from a distinct neighbour of {self.node_id} "
                    "in the listing's graph"
                )
            if adv.digest() != digests.get(v):
                raise SecureAggregationError(f"advert of node {v} is not the one listed")
            fp = adv.verify(params, roster)  # raises on a bad signature or unknown key
            if fp in seen or adv.credential == own.credential:
                raise SecureAggregationError(
                    f"node {v}'s identity key is used by another client of this round: "
                    "refusing (one key per client)"
                )
            seen.add(fp)
            peers[v] = adv
        if set(peers) != set(mine):
            missing = sorted(set(mine) - set(peers))
            raise SecureAggregationError(
                f"the adverts of neighbours {missing[:5]} are missing: refusing to share"
            )
        shares = shamir.split([self.b, self.s_sk], params.threshold, sorted(peers), randbytes)
        out: dict[int, bytes] = {}
        c_sk = x25519_private(self.c_sk)
        binding = params.binding
        for v, adv in peers.items():
            key = pair_key(agree(c_sk, adv.c_pk), _SHARE_LABEL, binding, self.node_id, v)
            b_share, sk_share = shares[v]
            out[v] = aead_seal(
                key,
                _share_bytes(b_share) + _share_bytes(sk_share),
                binding,
                self.node_id,
                v,
                randbytes,
            )
        self.neighbours = mine
        self.members = tuple(nodes)
        self.peers = peers
        self.stage = STAGE_SHARES
        return out

    # -- stage 3 ----------------------------------------------------------------
    def receive_shares(self, sealed: Mapping[int, bytes]) -> list[int]:
        """Open the boxes addressed to this client; returns senders whose box was rejected.

        The senders define this client's mask peers (the server delivers exactly
        the boxes of neighbours still in the round). A box that fails
        authentication is dropped (its share is not held) but its sender stays a
        mask peer: the pairwise mask comes from the signed ``s_pk``.
        """
        self._expect(STAGE_SHARES)
        binding = self.params.binding
        rejected: list[int] = []
        held: dict[int, tuple[int, int]] = {}
        c_sk = x25519_private(self.c_sk)
        for v, box in sealed.items():
            if v not in self.peers:
                raise SecureAggregationError(
                    f"a share box from node {v}, which is not a verified neighbour, was relayed"
                )
            key = pair_key(agree(c_sk, self.peers[v].c_pk), _SHARE_LABEL, binding, v, self.node_id)
            try:
                plain = aead_open(key, box, binding, v, self.node_id)
            except SecureAggregationError:
                rejected.append(v)
                continue
            if len(plain) != 64:
                rejected.append(v)
                continue
            held[v] = (int.from_bytes(plain[:32], "little"), int.from_bytes(plain[32:], "little"))
        maskers = tuple(sorted(sealed))
        if len(maskers) < self.params.threshold:
            raise SecureAggregationError(
                f"only {len(maskers)} neighbour(s) are still in the round; threshold is "
                f"{self.params.threshold}"
            )
        self.held = held
        self.maskers = maskers
        return rejected

    def check_weight(self, weight: int) -> None:
        """Refuse a weight above this client's own cap (``secagg.max-weight``)."""
        if weight > self.limits.max_weight:
            raise SecureAggregationError(
                f"this client's weight {weight} is above its cap secagg.max-weight = "
                f"{self.limits.max_weight} (signed into its advert); raise the cap in the "
                "client's config"
            )

    def mask(self, encoded: np.ndarray, content: bytes) -> np.ndarray:
        """``y_u``: the encoded vector plus the self mask and the pairwise masks (a new array).

        ``content`` is the digest of the model and config this client trained on
        (it signs it in stage 4).
        """
        if not self.maskers:
            raise SecureAggregationError("receive_shares must run before mask")
        self._expect(STAGE_SHARES)
        binding = self.params.binding
        y = np.array(encoded, dtype=self.params.quantizer.dtype, copy=True)
        streams = [(_self_key(self.b, binding, self.node_id), +1)]
        s_sk = x25519_private(self.s_sk)
        for v in self.maskers:
            shared = agree(s_sk, self.peers[v].s_pk)
            key = pair_key(shared, _MASK_LABEL, binding, self.node_id, v)
            streams.append((key, +1 if self.node_id < v else -1))
        add_keystreams(y, streams)
        self.content = bytes(content)
        self.stage = STAGE_MASKED
        return y

    # -- stage 4 ----------------------------------------------------------------
    def statement(self) -> bytes:
        """The consistency statement this client signs (and checks its neighbours signed)."""
        return consistency_message(self.params.binding, set_digest(self.survivors), self.content)

    def confirm(self, survivors: Sequence[int], identity: Identity) -> bytes:
        """Sign the survivor set, once; refuse a set without this client or too few peers."""
        self._expect(STAGE_MASKED)
        s = tuple(int(v) for v in survivors)
        if list(s) != sorted(set(s)):
            raise SecureAggregationError("the survivor set is not sorted and distinct")
        if self.node_id not in s:
            raise SecureAggregationError(
                "the survivor set does not contain this client, which sent its masked "
                "vector: refusing to confirm"
            )
        if not set(s) <= set(self.members):
            raise SecureAggregationError("the survivor set names clients outside the round")
        counted = [v for v in self.maskers if v in set(s)]
        if len(counted) < self.params.threshold:
            raise SecureAggregationError(
                f"only {len(counted)} of this client's neighbours are in the survivor set; "
                f"threshold is {self.params.threshold}: refusing to confirm"
            )
        self.survivors = s
        self.stage = STAGE_CONFIRM
        return identity.sign(self.statement())

    # -- stage 5 ----------------------------------------------------------------
    def unmask(self, confirmations: Mapping[int, bytes], roster: Roster) -> UnmaskReply:
        """Shares for the server, strictly by the confirmed survivor set.

        Every neighbour in the set must have signed the identical statement (same
        set, same model and config); otherwise nothing is revealed. Then b-shares of
        the counted neighbours and key shares of the others. Answered once.
        """
        self._expect(STAGE_CONFIRM)
        alive = set(self.survivors)
        counted = [v for v in self.maskers if v in alive]
        gone = [v for v in self.maskers if v not in alive]
        statement = self.statement()
        for v in counted:
            sig = confirmations.get(v)
            if sig is None:
                raise SecureAggregationError(
                    f"neighbour {v} is in the survivor set but its confirmation is missing: "
                    "refusing to reveal shares"
                )
            try:  # v's key is the one its advert (verified in stage 2) carries
                roster.verify(v, self.peers[v].credential, statement, bytes(sig))
            except SecureAggregationError as exc:
                raise SecureAggregationError(
                    f"neighbour {v} did not confirm the same survivor set, model and config "
                    f"({exc}): refusing to reveal shares"
                ) from None
        self.stage = _DONE
        return UnmaskReply(
            b_shares={v: self.held[v][0] for v in counted if v in self.held},
            sk_shares={v: self.held[v][1] for v in gone if v in self.held},
        )

    # -- persistence --------------------------------------------------------------
    def to_json(self) -> str:
        """JSON form for the client's own ``Context.state`` (holds secrets; never sent)."""
        return json.dumps(
            {
                "node_id": self.node_id,
                "params": {
                    k: (v.hex() if isinstance(v, bytes) else v)
                    for k, v in self.params.to_dict().items()
                },
                "limits": [
                    self.limits.min_neighbours,
                    self.limits.min_threshold,
                    self.limits.max_weight,
                ],
                "c_sk": self.c_sk,
                "s_sk": self.s_sk,
                "b": self.b,
                "stage": self.stage,
                "neighbours": list(self.neighbours),
                "members": list(self.members),
                "peers": [a.to_bytes().hex() for a in self.peers.values()],
                "held": {str(k): list(v) for k, v in self.held.items()},
                "maskers": list(self.maskers),
                "content": self.content.hex(),
                "survivors": list(self.survivors),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ClientRound:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        params = dict(d["params"])
        params["session"] = bytes.fromhex(params["session"])
        peers = [Advert.from_bytes(bytes.fromhex(h)) for h in d["peers"]]
        return cls(
            node_id=int(d["node_id"]),
            params=RoundParams.from_dict(params),
            c_sk=int(d["c_sk"]),
            s_sk=int(d["s_sk"]),
            b=int(d["b"]),
            limits=ClientLimits(*(int(v) for v in d["limits"])),
            stage=str(d["stage"]),
            neighbours=tuple(int(v) for v in d["neighbours"]),
            members=tuple(int(v) for v in d["members"]),
            peers={a.node_id: a for a in peers},
            held={int(k): (int(v[0]), int(v[1])) for k, v in d["held"].items()},
            maskers=tuple(int(v) for v in d["maskers"]),
            content=bytes.fromhex(d["content"]),
            survivors=tuple(int(v) for v in d["survivors"]),
        )


def _t_core(members: set[int], graph: Mapping[int, Sequence[int]], t: int) -> set[int]:
    """Largest subset in which every member keeps >= t neighbours (iterated peeling)."""
    alive = set(members)
    changed = True
    while changed:
        changed = False
        for v in sorted(alive):
            if sum(1 for w in graph[v] if w in alive) < t:
                alive.discard(v)
                changed = True
    return alive


class ServerRound:
    """The server's bookkeeping for one attempt: who is in, what to relay, how to unmask.

    Parameters
    ----------
    params : RoundParams
        The attempt's public parameters.
    nodes : Sequence[int]
        The sampled nodes (the graph is built in stage 2 over those that advertised).
    dim : int
        Length of every (masked) vector, extra coordinates included.
    roster : Roster, optional
        Verifies advert and confirmation signatures (``None``: the server does not
        verify; clients still do).
    threads : int (default: 1)
        Threads regenerating masks when unmasking.

    """

    def __init__(
        self,
        params: RoundParams,
        nodes: Sequence[int],
        dim: int,
        roster: Roster | None = None,
        *,
        threads: int = 1,
    ) -> None:
        self.params = params
        self.nodes = tuple(sorted(set(int(v) for v in nodes)))
        self.t = params.threshold
        self.dim = dim
        self.roster = roster
        self.threads = threads
        self.graph: dict[int, tuple[int, ...]] = {}
        self.listing: list[tuple[int, bytes]] = []
        self.adverts: dict[int, Advert] = {}
        self.u1: set[int] = set()
        self.u2: set[int] = set()
        self.u3: set[int] = set()
        self.survivors: tuple[int, ...] = ()
        self.maskers: dict[int, tuple[int, ...]] = {}
        self.rejected: list[Rejection] = []
        self._acc: np.ndarray | None = None
        self._requests: dict[int, dict[int, bytes]] = {}

    def _reject(self, node: int, stage: str, reason: str) -> None:
        self.rejected.append(Rejection(node, stage, reason))

    def _pruned(self, members: set[int], stage: str) -> set[int]:
        core = _t_core(members, self.graph, self.t)
        for v in sorted(members - core):
            self._reject(
                v, stage, f"fewer than t = {self.t} of its neighbours are still in the round"
            )
        if len(core) < 3:
            raise SecureAggregationError(
                f"only {len(core)} client(s) remain after {stage} with >= t = {self.t} neighbours "
                "each; at least 3 are needed. The round fails; no secret was revealed."
            )
        return core

    # -- stage 1 -> 2 -------------------------------------------------------------
    def collect_adverts(
        self, adverts: Mapping[int, Advert]
    ) -> tuple[list[tuple[int, bytes]], dict[int, list[Advert]]]:
        """Verify adverts, fix the graph from them; the listing and each node's bundle."""
        seen: dict[bytes, int] = {}
        for node, adv in sorted(adverts.items()):
            if node not in self.nodes:
                self._reject(node, STAGE_KEYS, "not sampled for this round")
                continue
            if adv.node_id != node:
                self._reject(node, STAGE_KEYS, f"advert names node {adv.node_id}, sent by {node}")
                continue
            if self.roster is not None:
                try:
                    fp = adv.verify(self.params, self.roster)
                except SecureAggregationError as exc:
                    self._reject(node, STAGE_KEYS, str(exc))
                    continue
                if fp in seen:
                    self._reject(node, STAGE_KEYS, f"identity key already used by node {seen[fp]}")
                    continue
                seen[fp] = node
            self.adverts[node] = adv
        members = sorted(self.adverts)
        k = round_degree(self.params.neighbours, len(members))
        if len(members) < 3 or k < self.t:
            raise SecureAggregationError(
                f"only {len(members)} client(s) advertised keys; threshold t = {self.t} needs "
                f"at least {max(3, self.t + 1)}. The round fails; no secret was revealed."
            )
        self.u1 = set(members)
        self.listing = [(v, self.adverts[v].digest()) for v in members]
        seed = graph_seed(self.params.binding.encode(), self.listing)
        self.graph = harary_graph(
            members, k, seed=seed, server_round=self.params.binding.server_round
        )
        bundles = {u: [self.adverts[v] for v in self.graph[u]] for u in members}
        return list(self.listing), bundles

    # -- stage 2 -> 3 -------------------------------------------------------------
    def collect_shares(
        self, boxes: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Check each client boxed a share for each of its neighbours; return what to relay."""
        valid: set[int] = set()
        for node, out in boxes.items():
            if node not in self.u1:
                self._reject(node, STAGE_SHARES, "not in the round at this stage")
                continue
            expected = set(self.graph[node])
            if set(out) != expected:
                self._reject(
                    node,
                    STAGE_SHARES,
                    f"sent shares to {sorted(out)}, expected its neighbours {sorted(expected)}",
                )
                continue
            valid.add(node)
        self.u2 = self._pruned(valid, STAGE_SHARES)
        relay: dict[int, dict[int, bytes]] = {}
        for u in sorted(self.u2):
            peers = tuple(v for v in self.graph[u] if v in self.u2)
            self.maskers[u] = peers
            relay[u] = {v: bytes(boxes[v][u]) for v in peers}
        return relay

    # -- stage 3 ------------------------------------------------------------------
    def add_masked(self, node: int, y: np.ndarray) -> None:
        """Fold one masked vector into the running sum (validated first)."""
        if node not in self.u2 or node in self.u3:
            raise SecureAggregationError(f"node {node} may not send a masked vector now")
        dtype = self.params.quantizer.dtype
        if y.dtype != dtype or y.shape != (self.dim,):
            raise SecureAggregationError(
                f"masked vector is {y.dtype}{list(y.shape)}, expected {dtype}[{self.dim}]"
            )
        if self._acc is None:
            self._acc = np.array(y, dtype=dtype, copy=True)
        else:
            np.add(self._acc, y, out=self._acc)
        self.u3.add(node)

    @property
    def dropped(self) -> set[int]:
        """Clients that shared their secrets but whose masked vector was not counted."""
        return self.u2 - self.u3

    def max_total_weight(self) -> int:
        """Sum of the counted clients' signed weight caps (the total may not exceed it)."""
        return sum(self.adverts[u].max_weight for u in self.u3)

    # -- stage 3 -> 4 -------------------------------------------------------------
    def survivor_set(self) -> tuple[int, ...]:
        """Return the one survivor set ``S = U3`` every client confirms; refuse if infeasible.

        A refusal happens before any share is asked for, so nothing is revealed.
        """
        u3, dropped = self.u3, self.dropped
        problems: list[str] = []
        if len(u3) < 3:
            problems.append(f"only {len(u3)} masked vector(s) arrived; at least 3 are needed")
        for u in sorted(u3):
            alive = sum(1 for v in self.maskers[u] if v in u3)
            if alive < self.t:
                problems.append(
                    f"counted client {u} has {alive} counted neighbour(s) < t = {self.t}"
                )
        for v in sorted(dropped):
            alive = sum(1 for w in self.maskers[v] if w in u3)
            if alive < self.t:
                problems.append(
                    f"dropped client {v} has {alive} counted neighbour(s) < t = {self.t}: "
                    "its masks cannot be removed"
                )
        if u3 and not is_connected(u3, {u: self.maskers[u] for u in u3}):
            problems.append(
                "the counted clients are not connected in the graph (partial sums would leak)"
            )
        if problems:
            raise SecureAggregationError(
                "cannot unmask this round; no share was requested, so nothing secret was revealed: "
                + "; ".join(problems[:5])
                + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
            )
        self.survivors = tuple(sorted(u3))
        return self.survivors

    # -- stage 4 -> 5 -------------------------------------------------------------
    def collect_confirmations(
        self, signatures: Mapping[int, bytes], contents: Mapping[int, bytes] | None = None
    ) -> dict[int, dict[int, bytes]]:
        """Check every survivor confirmed; return each one's neighbours' confirmations.

        With a roster and ``contents`` (the digest of what the server sent each
        client), each signature is verified too. A survivor that did not confirm
        fails the round before any share is asked (its neighbours would refuse).
        """
        if not self.survivors:
            raise SecureAggregationError("survivor_set must succeed before confirmations")
        s_digest = set_digest(self.survivors)
        missing: list[int] = []
        for u in self.survivors:
            sig = signatures.get(u)
            if sig is None:
                missing.append(u)
                continue
            if self.roster is not None and contents is not None and u in contents:
                msg = consistency_message(self.params.binding, s_digest, contents[u])
                try:
                    self.roster.verify(u, self.adverts[u].credential, msg, bytes(sig))
                except SecureAggregationError as exc:
                    self._reject(u, STAGE_CONFIRM, f"bad confirmation: {exc}")
                    missing.append(u)
        if missing:
            raise SecureAggregationError(
                f"client(s) {missing[:5]} in the survivor set did not confirm it; their "
                "neighbours cannot reveal shares. The round fails; no secret was revealed."
            )
        alive = set(self.survivors)
        self._requests = {
            u: {v: bytes(signatures[v]) for v in self.maskers[u] if v in alive}
            for u in self.survivors
        }
        return {u: dict(sigs) for u, sigs in self._requests.items()}

    # -- stage 5 ------------------------------------------------------------------
    def _recover(
        self, shares: list[tuple[int, int]], check: Callable[[int], bool], what: str
    ) -> tuple[int, list[int]]:
        """The committed secret from ``shares``, and the holders whose share disagrees.

        Tries subsets of ``t`` shares until one reconstructs a secret that passes
        ``check`` (at most :data:`MAX_RECOVERY_SUBSETS`); then evaluates the
        polynomial that subset defines at every other holder, so each bad share is
        identified, not only skipped.
        """
        if len(shares) < self.t:
            raise SecureAggregationError(
                f"{what}: {len(shares)} share(s) arrived, t = {self.t} needed; the round fails"
            )
        for tried, subset in enumerate(itertools.combinations(shares, self.t)):
            if tried >= MAX_RECOVERY_SUBSETS:
                break
            secret = shamir.reconstruct(dict(subset), self.t)
            if check(secret):
                pts = dict(subset)
                bad = [h for h, y in shares if h not in pts and shamir.evaluate(pts, h) != y]
                return secret, bad
        raise SecureAggregationError(
            f"{what}: no {self.t} of the {len(shares)} shares reconstruct the committed secret"
        )

    def finish(self, replies: Mapping[int, UnmaskReply]) -> np.ndarray:
        """Return the unmasked ring sum of the counted clients' vectors.

        Raises
        ------
        SecureAggregationError
            If a needed secret has fewer than ``t`` valid shares.

        """
        if self._acc is None or not self._requests:
            raise SecureAggregationError("collect_confirmations must succeed before finish")
        binding = self.params.binding
        alive = set(self.survivors)
        b_shares: dict[int, list[tuple[int, int]]] = {u: [] for u in self.u3}
        sk_shares: dict[int, list[tuple[int, int]]] = {v: [] for v in self.dropped}
        for r, reply in sorted(replies.items()):
            if r not in self._requests:
                continue
            for u in self.maskers[r]:
                if u in alive and u in reply.b_shares:
                    b_shares[u].append((r, int(reply.b_shares[u])))
                elif u not in alive and u in reply.sk_shares:
                    sk_shares[u].append((r, int(reply.sk_shares[u])))
        seeds: dict[int, int] = {}
        for u in sorted(self.u3):
            seeds[u], bad = self._recover(
                b_shares[u],
                lambda s, u=u: commit(s, binding, u) == self.adverts[u].b_commit,
                f"self-mask seed of client {u}",
            )
            for h in bad:
                self._reject(h, STAGE_UNMASK, f"sent a bad share of client {u}'s self-mask seed")
        keys: dict[int, int] = {}
        for v in sorted(self.dropped):
            keys[v], bad = self._recover(
                sk_shares[v],
                lambda s, v=v: x25519_public(s) == self.adverts[v].s_pk,
                f"mask key of dropped client {v}",
            )
            for h in bad:
                self._reject(h, STAGE_UNMASK, f"sent a bad share of client {v}'s mask key")
        total = self._acc
        streams = [(_self_key(b, binding, u), -1) for u, b in seeds.items()]
        for v, sk in keys.items():
            own = x25519_private(sk)
            for u in self.maskers[v]:
                if u not in self.u3:
                    continue
                shared = agree(own, self.adverts[u].s_pk)
                # u added +PRG if u < v, -PRG otherwise: take it back out.
                streams.append((pair_key(shared, _MASK_LABEL, binding, u, v), -1 if u < v else +1))
        add_keystreams(total, streams, threads=self.threads)
        self._acc = None
        return total
