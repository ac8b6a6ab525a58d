"""A malicious secure-aggregation server, for the adversarial tests.

:class:`Attacker` speaks fedcore's SecAgg+ wire protocol over a real Grid to the
real fedcore ClientApp (``clients.app:app`` on fedcore's embedded engine: real worker
processes, real Flower messages), using fedcore's own server bookkeeping
(:class:`~fedcore.secagg.protocol.machine.ServerRound`) where it plays honestly and
deviating wherever a test tells it to. :meth:`Attacker.learned` then does what a
server would do with whatever shares it collected: it reconstructs every secret it
can (checked against the commitments) and says whether one client's masked vector
can be unmasked on its own.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedcore.core.aggregation import array_view
from fedcore.secagg.protocol import shamir
from fedcore.secagg.protocol.crypto import RoundBinding, commit, x25519_public
from fedcore.secagg.protocol.graph import resolve
from fedcore.secagg.protocol.machine import (
    STAGE_CONFIRM,
    STAGE_KEYS,
    STAGE_MASKED,
    STAGE_SHARES,
    STAGE_UNMASK,
    Advert,
    RoundParams,
    ServerRound,
)
from fedcore.secagg.protocol.quantize import Quantizer, extra_coordinates
from fedcore.secagg.protocol.wire import MASKED, SECAGG, pack_ids, unpack_ids

Q64 = Quantizer(clip=4.0, bits=16, ring_bits=64)


@dataclass
class Learned:
    """What the server could reconstruct from the shares it collected."""

    seeds: dict[int, int] = field(default_factory=dict)  # b_u of these clients
    keys: dict[int, int] = field(default_factory=dict)  # s_sk_v of these clients
    b_shares: dict[int, int] = field(default_factory=dict)  # how many b-shares per client
    sk_shares: dict[int, int] = field(default_factory=dict)

    def exposes(self, victim: int, maskers: Sequence[int]) -> bool:
        """Whether y_victim alone can be unmasked: b_victim and every pairwise mask."""
        if victim not in self.seeds:
            return False
        return victim in self.keys or all(v in self.keys for v in maskers)


class Attacker:
    """A server that runs one secure attempt over ``grid`` and may deviate at any stage."""

    def __init__(
        self,
        grid: Any,
        nodes: Sequence[int],
        arrays: ArrayRecord,
        server_round: int,
        *,
        threshold: int | None = None,
        neighbours: int | None = None,
        config: Mapping[str, Any] | None = None,
        session: bytes | None = None,
    ) -> None:
        self.grid = grid
        self.nodes = sorted(nodes)
        self.arrays = arrays
        self.round = server_round
        k, t = resolve(len(self.nodes), 0, 0)
        self.params = RoundParams(
            binding=RoundBinding(int(grid.run.run_id), server_round, session or os.urandom(16)),
            threshold=threshold or t,
            quantizer=Q64,
            metric_keys=("train_loss",),
            neighbours=neighbours or k,
        )
        dim = sum(int(np.prod(a.shape)) for a in arrays.values()) + extra_coordinates(1)
        self.dim = dim
        self.server = ServerRound(self.params, self.nodes, dim)
        self.config = dict(config or {"local-epochs": 1, "batch-size": 16, "lr": 0.1})
        self.errors: dict[tuple[str, int], str] = {}
        self.y: dict[int, np.ndarray] = {}

    # -- plumbing -----------------------------------------------------------------
    def send(
        self,
        fields: Mapping[int, Mapping[str, Any]],
        stage: str,
        records: Mapping[int, Mapping[str, Any]] | None = None,
        message_type: str = "train.secagg",
    ) -> dict[int, Message]:
        """One stage: ``fields`` per node; valid replies by node (errors kept in ``errors``)."""
        msgs = []
        for node, f in fields.items():
            content = RecordDict(
                {SECAGG: ConfigRecord(dict(f)), **dict((records or {}).get(node, {}))}
            )
            msgs.append(
                Message(
                    content, dst_node_id=node, message_type=message_type, group_id=str(self.round)
                )
            )
        out = {}
        for reply in self.grid.send_and_receive(msgs, timeout=60.0):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.errors[(stage, node)] = reply.error.reason
            else:
                out[node] = reply
        return out

    def model_records(self, node: int, **config: Any) -> dict[str, Any]:
        conf = {"server-round": self.round, **self.config, **config}
        return {"arrays": self.arrays, "config": ConfigRecord(conf)}

    # -- honest stages (each returns what the clients sent) -------------------------
    def keys(self, params: Mapping[int, RoundParams] | None = None) -> dict[int, Advert]:
        fields = {
            u: {**(params or {}).get(u, self.params).to_dict(), "stage": STAGE_KEYS}
            for u in self.nodes
        }
        replies = self.send(fields, STAGE_KEYS)
        return {
            u: Advert.from_bytes(r.content.config_records[SECAGG]["advert"])
            for u, r in replies.items()
        }

    def shares(
        self,
        adverts: Mapping[int, Advert],
        bundles: Mapping[int, Sequence[Advert]] | None = None,
        listing: Sequence[tuple[int, bytes]] | None = None,
    ) -> dict[int, dict[int, bytes]]:
        own_listing, own_bundles = self.server.collect_adverts(adverts)
        listing = own_listing if listing is None else listing
        bundles = own_bundles if bundles is None else bundles
        ident = {"server-round": self.round, "session": self.params.binding.session}
        fields = {
            u: {
                **ident,
                "stage": STAGE_SHARES,
                "listing-ids": pack_ids(v for v, _ in listing),
                "listing-digests": [d for _, d in listing],
                "adverts": [a.to_bytes() for a in bundle],
            }
            for u, bundle in bundles.items()
        }
        replies = self.send(fields, STAGE_SHARES)
        out = {}
        for u, r in replies.items():
            rec = r.content.config_records[SECAGG]
            out[u] = dict(zip(unpack_ids(rec["dst"]), list(rec["boxes"]), strict=True))
        return out

    def masked(
        self,
        boxes: Mapping[int, Mapping[int, bytes]],
        records: Callable[[int], dict[str, Any]] | None = None,
    ) -> dict[int, np.ndarray]:
        relay = self.server.collect_shares(boxes)
        ident = {"server-round": self.round, "session": self.params.binding.session}
        fields, recs = {}, {}
        for u, inbox in relay.items():
            fields[u] = {
                **ident,
                "stage": STAGE_MASKED,
                "src": pack_ids(inbox),
                "boxes": list(inbox.values()),
            }
            recs[u] = (records or self.model_records)(u)
        for u, r in self.send(fields, STAGE_MASKED, recs).items():
            y = array_view(r.content.array_records[MASKED]["y"])
            self.server.add_masked(u, y)
            self.y[u] = np.array(y)
        return self.y

    def confirm(self, sets: Mapping[int, Sequence[int]]) -> dict[int, bytes]:
        ident = {"server-round": self.round, "session": self.params.binding.session}
        fields = {
            u: {**ident, "stage": STAGE_CONFIRM, "survivors": pack_ids(sorted(s))}
            for u, s in sets.items()
        }
        return {
            u: bytes(r.content.config_records[SECAGG]["signature"])
            for u, r in self.send(fields, STAGE_CONFIRM).items()
        }

    def unmask(
        self, confirmations: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, tuple[dict, dict]]:
        ident = {"server-round": self.round, "session": self.params.binding.session}
        fields = {
            u: {
                **ident,
                "stage": STAGE_UNMASK,
                "signers": pack_ids(sigs),
                "signatures": list(sigs.values()),
            }
            for u, sigs in confirmations.items()
        }
        out = {}
        for u, r in self.send(fields, STAGE_UNMASK).items():
            rec = r.content.config_records[SECAGG]
            b = dict(
                zip(
                    unpack_ids(rec["b-ids"]),
                    [int.from_bytes(v, "little") for v in rec["b"]],
                    strict=True,
                )
            )
            sk = dict(
                zip(
                    unpack_ids(rec["sk-ids"]),
                    [int.from_bytes(v, "little") for v in rec["sk"]],
                    strict=True,
                )
            )
            out[u] = (b, sk)
        return out

    # -- what the server got --------------------------------------------------------
    def learned(self, replies: Mapping[int, tuple[dict, dict]]) -> Learned:
        """Reconstruct every secret that ``t`` collected shares determine (committed ones)."""
        binding, t = self.params.binding, self.params.threshold
        b_by: dict[int, list[tuple[int, int]]] = {}
        sk_by: dict[int, list[tuple[int, int]]] = {}
        for holder, (b, sk) in replies.items():
            for owner, share in b.items():
                b_by.setdefault(owner, []).append((holder, share))
            for owner, share in sk.items():
                sk_by.setdefault(owner, []).append((holder, share))
        out = Learned(
            b_shares={u: len(v) for u, v in b_by.items()},
            sk_shares={u: len(v) for u, v in sk_by.items()},
        )
        adverts = self.server.adverts
        for owner, shares in b_by.items():
            for subset in itertools.islice(itertools.combinations(shares, t), 200):
                s = shamir.reconstruct(dict(subset), t)
                if commit(s, binding, owner) == adverts[owner].b_commit:
                    out.seeds[owner] = s
                    break
        for owner, shares in sk_by.items():
            for subset in itertools.islice(itertools.combinations(shares, t), 200):
                s = shamir.reconstruct(dict(subset), t)
                if x25519_public(s) == adverts[owner].s_pk:
                    out.keys[owner] = s
                    break
        return out
