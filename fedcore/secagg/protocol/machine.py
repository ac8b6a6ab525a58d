"""The SecAgg+ protocol as two pure state machines: :class:`ClientRound`, :class:`ServerRound`.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020 (SecAgg+), generalizing Bonawitz et al., "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017.

One round, four exchanges (the server relays everything; clients never talk
directly)::

    1 keys     server -> u : neighbours N(u), threshold t, encoding parameters
               u -> server : signed advert (c_pk, s_pk, commit(b_u))
    2 shares   server -> u : verified adverts of u's neighbours that advertised (U1)
               u -> server : Shamir t-of-k shares of (b_u, s_sk_u), one AEAD box per neighbour
    3 masked   server -> u : boxes addressed to u from neighbours in U2, the model
               u -> server : y_u = x_u + PRG(b_u) + sum_{v in N(u) cap U2} +-PRG(s_uv)   (mod 2^R)
    4 unmask   server -> u : which of u's neighbours were counted (U3) and which dropped (D)
               u -> server : b-shares of counted neighbours, s_sk-shares of dropped ones

The server sums the y_u of U3, reconstructs b_u (u in U3) and s_sk_v (v in D)
from >= t shares each, and removes PRG(b_u) and the masks shared with dropped
clients: what is left is the sum of the x_u over U3 and nothing else.

Dropouts at any exchange are handled by the server's bookkeeping:

- after 1 and 2 it prunes the set to its *t-core* (everyone keeps >= t
  neighbours); nothing secret has been revealed yet, so this is free;
- after 3, before asking for any share, it checks that every counted client and
  every dropped one has >= t counted neighbours and that the counted clients
  are connected in the graph; if not, the round fails and no share is asked;
- during 4, missing replies only matter if some secret ends up with fewer than
  t shares: the round then fails. What was revealed by then is a subset of what
  a successful round reveals (see docs/security.md).

An honest client reveals at most one kind of share per peer and per round
(stage 4 is answered once, and only if the server's lists partition the
client's mask peers with >= t counted), and never answers stage 4 before
sending its own masked vector.

Pure: no sockets, no clock, no global RNG; secrets come from the ``randbytes``
callable (``os.urandom`` by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
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
    new_field_secret,
    new_x25519_secret,
    pair_key,
    x25519_private,
    x25519_public,
)
from fedcore.secagg.protocol.graph import is_connected
from fedcore.secagg.protocol.quantize import Quantizer
from fedcore.secagg.protocol.rosters import Identity, Roster

__all__ = ["Advert", "ClientRound", "RoundParams", "ServerRound", "UnmaskReply", "rounding_key"]

_SHARE_LABEL = b"share-channel"
_MASK_LABEL = b"pairwise-mask"
_SELF_LABEL = b"self-mask"

STAGE_KEYS = "secagg-keys"
STAGE_SHARES = "secagg-shares"
STAGE_MASKED = "secagg-masked"
STAGE_UNMASK = "secagg-unmask"


@dataclass(frozen=True)
class RoundParams:
    """Public parameters of one secure round (sent to every client in stage 1)."""

    binding: RoundBinding
    threshold: int
    quantizer: Quantizer
    metric_keys: tuple[str, ...] = ()
    rounding_seed: int = 0

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
            "threshold": self.threshold,
            "clip": q.clip,
            "bits": q.bits,
            "ring-bits": q.ring_bits,
            "metric-clip": q.metric_clip,
            "metric-keys": ",".join(self.metric_keys),
            "rounding-seed": self.rounding_seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> RoundParams:
        """Inverse of :meth:`to_dict` (``SecureAggregationError`` if malformed)."""
        try:
            keys = str(d["metric-keys"])
            return cls(
                binding=RoundBinding(
                    int(d["run-id"]),
                    int(d["server-round"]),
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


@dataclass(frozen=True)
class Advert:
    """A client's signed stage-1 message: its two X25519 public keys and commitment."""

    node_id: int
    c_pk: bytes
    s_pk: bytes
    b_commit: bytes
    credential: bytes
    signature: bytes

    @staticmethod
    def signed_message(
        binding: RoundBinding, node_id: int, c_pk: bytes, s_pk: bytes, b_commit: bytes
    ) -> bytes:
        """Return what the identity key signs: domain, binding, node id, keys, commitment."""
        return (
            b"fedcore/secagg/advert\x00"
            + binding.encode()
            + struct.pack(">Q", node_id)
            + c_pk
            + s_pk
            + b_commit
        )

    def to_bytes(self) -> bytes:
        """Length-prefixed encoding (no pickle)."""
        return _pack(
            struct.pack(">Q", self.node_id),
            self.c_pk,
            self.s_pk,
            self.b_commit,
            self.credential,
            self.signature,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Advert:
        """Inverse of :meth:`to_bytes`; checks key and commitment lengths."""
        nid, c_pk, s_pk, com, cred, sig = _unpack(bytes(data), 6)
        if len(nid) != 8 or len(c_pk) != 32 or len(s_pk) != 32 or len(com) != 32:
            raise SecureAggregationError("malformed advert (field lengths)")
        return cls(struct.unpack(">Q", nid)[0], c_pk, s_pk, com, cred, sig)

    def verify(self, binding: RoundBinding, roster: Roster) -> bytes:
        """Check the signature with ``roster``; returns the key fingerprint."""
        msg = self.signed_message(binding, self.node_id, self.c_pk, self.s_pk, self.b_commit)
        return roster.verify(self.node_id, self.credential, msg, self.signature)


@dataclass(frozen=True)
class UnmaskReply:
    """Stage-4 reply: ``{peer: share}`` of self-mask seeds and of mask keys."""

    b_shares: dict[int, int]
    sk_shares: dict[int, int]


def _share_bytes(value: int) -> bytes:
    return value.to_bytes(32, "little")


def _self_key(b: int, binding: RoundBinding, node_id: int) -> bytes:
    from fedcore.secagg.protocol.crypto import derive_key

    return derive_key(_share_bytes(b), _SELF_LABEL, binding, node_id)


@dataclass
class ClientRound:
    """A client's state for one round; persisted between stages with :meth:`to_json`."""

    node_id: int
    params: RoundParams
    neighbours: tuple[int, ...]
    c_sk: int
    s_sk: int
    b: int
    stage: str = STAGE_KEYS
    peers: dict[int, Advert] = field(default_factory=dict)
    held: dict[int, tuple[int, int]] = field(default_factory=dict)
    maskers: tuple[int, ...] = ()

    # -- stage 1 ----------------------------------------------------------------
    @classmethod
    def start(
        cls,
        node_id: int,
        params: RoundParams,
        neighbours: Sequence[int],
        identity: Identity,
        randbytes: RandBytes = os.urandom,
    ) -> tuple[ClientRound, Advert]:
        """Fresh keys and self-mask seed; the signed advert to send."""
        nb = tuple(sorted(set(int(v) for v in neighbours)))
        if node_id in nb:
            raise SecureAggregationError("a client cannot be its own neighbour")
        if not 1 <= params.threshold <= len(nb):
            raise SecureAggregationError(
                f"threshold {params.threshold} is not in [1, {len(nb)}] (the neighbour count)"
            )
        me = cls(
            node_id=node_id,
            params=params,
            neighbours=nb,
            c_sk=new_x25519_secret(randbytes),
            s_sk=new_x25519_secret(randbytes),
            b=new_field_secret(randbytes),
        )
        c_pk, s_pk = x25519_public(me.c_sk), x25519_public(me.s_sk)
        b_commit = commit(me.b, params.binding, node_id)
        sig = identity.sign(Advert.signed_message(params.binding, node_id, c_pk, s_pk, b_commit))
        return me, Advert(node_id, c_pk, s_pk, b_commit, identity.credential, sig)

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecureAggregationError(
                f"round {self.params.binding.server_round}: request for the stage after "
                f"'{stage}' but this client is at '{self.stage}' (out of order or repeated)"
            )

    # -- stage 2 ----------------------------------------------------------------
    def share(
        self, adverts: Iterable[Advert], roster: Roster, randbytes: RandBytes = os.urandom
    ) -> dict[int, bytes]:
        """Verify neighbours' adverts; return ``{neighbour: sealed shares}``.

        Raises
        ------
        SecureAggregationError
            If an advert is not from a neighbour, repeats one, carries a bad
            signature, or fewer than ``t`` neighbours remain.

        """
        self._expect(STAGE_KEYS)
        binding = self.params.binding
        peers: dict[int, Advert] = {}
        for adv in adverts:
            if adv.node_id == self.node_id:
                continue
            if adv.node_id not in self.neighbours or adv.node_id in peers:
                raise SecureAggregationError(
                    f"advert of node {adv.node_id} is not from a distinct neighbour "
                    f"of {self.node_id}"
                )
            adv.verify(binding, roster)  # raises on a bad signature
            peers[adv.node_id] = adv
        if len(peers) < self.params.threshold:
            raise SecureAggregationError(
                f"only {len(peers)} neighbour(s) advertised keys; "
                f"threshold is {self.params.threshold}"
            )
        shares = shamir.split([self.b, self.s_sk], self.params.threshold, sorted(peers), randbytes)
        out: dict[int, bytes] = {}
        c_sk = x25519_private(self.c_sk)
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

    def mask(self, encoded: np.ndarray) -> np.ndarray:
        """``y_u``: the encoded vector plus the self mask and the pairwise masks (a new array)."""
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
        self.stage = STAGE_MASKED
        return y

    # -- stage 4 ----------------------------------------------------------------
    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> UnmaskReply:
        """Shares for the server: b-shares of ``survivors``, key shares of ``dropped``.

        Answered once per round, only after this client's masked vector was
        produced, and only if the two lists partition its mask peers with at
        least ``t`` survivors; otherwise ``SecureAggregationError``.
        """
        self._expect(STAGE_MASKED)
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise SecureAggregationError("a node is listed both as counted and as dropped")
        if alive | gone != set(self.maskers):
            raise SecureAggregationError(
                "the counted and dropped lists do not partition this client's mask peers"
            )
        if len(alive) < self.params.threshold:
            raise SecureAggregationError(
                f"only {len(alive)} of this client's neighbours were counted; threshold is "
                f"{self.params.threshold}: refusing to reveal shares"
            )
        self.stage = "done"
        return UnmaskReply(
            b_shares={v: self.held[v][0] for v in sorted(alive) if v in self.held},
            sk_shares={v: self.held[v][1] for v in sorted(gone) if v in self.held},
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
                "neighbours": list(self.neighbours),
                "c_sk": self.c_sk,
                "s_sk": self.s_sk,
                "b": self.b,
                "stage": self.stage,
                "peers": [a.to_bytes().hex() for a in self.peers.values()],
                "held": {str(k): list(v) for k, v in self.held.items()},
                "maskers": list(self.maskers),
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
            neighbours=tuple(d["neighbours"]),
            c_sk=int(d["c_sk"]),
            s_sk=int(d["s_sk"]),
            b=int(d["b"]),
            stage=str(d["stage"]),
            peers={a.node_id: a for a in peers},
            held={int(k): (int(v[0]), int(v[1])) for k, v in d["held"].items()},
            maskers=tuple(int(v) for v in d["maskers"]),
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
    """The server's bookkeeping for one round: who is in, what to relay, how to unmask.

    Parameters
    ----------
    params : RoundParams
        The round's public parameters.
    graph : Mapping[int, Sequence[int]]
        Neighbours of every sampled node.
    dim : int
        Length of every (masked) vector, extra coordinates included.
    roster : Roster, optional
        Verifies advert signatures (``None``: the server does not verify; clients still do).
    threads : int (default: 1)
        Threads regenerating masks when unmasking.

    """

    def __init__(
        self,
        params: RoundParams,
        graph: Mapping[int, Sequence[int]],
        dim: int,
        roster: Roster | None = None,
        *,
        threads: int = 1,
    ) -> None:
        self.params = params
        self.graph = {int(k): tuple(int(v) for v in vs) for k, vs in graph.items()}
        self.t = params.threshold
        self.dim = dim
        self.roster = roster
        self.threads = threads
        self.adverts: dict[int, Advert] = {}
        self.u1: set[int] = set()
        self.u2: set[int] = set()
        self.u3: set[int] = set()
        self.maskers: dict[int, tuple[int, ...]] = {}
        self.rejected: list[Rejection] = []
        self._acc: np.ndarray | None = None
        self._requests: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}

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
    def collect_adverts(self, adverts: Mapping[int, Advert]) -> dict[int, list[Advert]]:
        """Verify adverts, prune, and return the bundle of neighbours' adverts for each node."""
        valid: set[int] = set()
        for node, adv in adverts.items():
            if node not in self.graph:
                self._reject(node, STAGE_KEYS, "not sampled for this round")
                continue
            if adv.node_id != node:
                self._reject(node, STAGE_KEYS, f"advert names node {adv.node_id}, sent by {node}")
                continue
            if self.roster is not None:
                try:
                    adv.verify(self.params.binding, self.roster)
                except SecureAggregationError as exc:
                    self._reject(node, STAGE_KEYS, str(exc))
                    continue
            self.adverts[node] = adv
            valid.add(node)
        self.u1 = self._pruned(valid, STAGE_KEYS)
        return {
            u: [self.adverts[v] for v in self.graph[u] if v in self.u1] for u in sorted(self.u1)
        }

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
            expected = {v for v in self.graph[node] if v in self.u1}
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

    # -- stage 3 -> 4 -------------------------------------------------------------
    def unmask_requests(self) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
        """Return ``{u in U3: (counted peers, dropped peers)}``; refuse if infeasible.

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
        self._requests = {
            u: (
                tuple(v for v in self.maskers[u] if v in u3),
                tuple(v for v in self.maskers[u] if v in dropped),
            )
            for u in sorted(u3)
        }
        return dict(self._requests)

    # -- stage 4 ------------------------------------------------------------------
    def _recover(self, shares: list[tuple[int, int]], check: object, what: str) -> int:
        if len(shares) < self.t:
            raise SecureAggregationError(
                f"{what}: {len(shares)} share(s) arrived, t = {self.t} needed; the round fails"
            )
        for start in range(len(shares) - self.t + 1):
            secret = shamir.reconstruct(dict(shares[start : start + self.t]), self.t)
            if check(secret):  # type: ignore[operator]
                return secret
        raise SecureAggregationError(f"{what}: the shares do not reconstruct the committed secret")

    def finish(self, replies: Mapping[int, UnmaskReply]) -> np.ndarray:
        """Return the unmasked ring sum of the counted clients' vectors.

        Raises
        ------
        SecureAggregationError
            If a needed secret has fewer than ``t`` valid shares.

        """
        if self._acc is None or not self._requests:
            raise SecureAggregationError("unmask_requests must succeed before finish")
        binding = self.params.binding
        b_shares: dict[int, list[tuple[int, int]]] = {u: [] for u in self.u3}
        sk_shares: dict[int, list[tuple[int, int]]] = {v: [] for v in self.dropped}
        for r, reply in sorted(replies.items()):
            if r not in self._requests:
                continue
            alive, gone = self._requests[r]
            for u in alive:
                if u in reply.b_shares:
                    b_shares[u].append((r, int(reply.b_shares[u])))
            for v in gone:
                if v in reply.sk_shares:
                    sk_shares[v].append((r, int(reply.sk_shares[v])))
        seeds = {
            u: self._recover(
                b_shares[u],
                lambda s, u=u: commit(s, binding, u) == self.adverts[u].b_commit,
                f"self-mask seed of client {u}",
            )
            for u in sorted(self.u3)
        }
        keys = {
            v: self._recover(
                sk_shares[v],
                lambda s, v=v: x25519_public(s) == self.adverts[v].s_pk,
                f"mask key of dropped client {v}",
            )
            for v in sorted(self.dropped)
        }
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
