"""Secure aggregation (SecAgg+): the server learns only the weighted sum of the updates.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020; Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017.

Pure protocol core (no sockets, clock or global RNG):
:mod:`fedcore.secagg.protocol`: ``crypto`` (X25519, HKDF-SHA256, ChaCha20-Poly1305,
AES-CTR masks), ``shamir``, ``quantize`` (fixed-point encoding and its error bound),
``graph`` (random k-regular neighbour graph), ``rosters`` (signing identities and
rosters), ``machine`` (client and server state machines), ``wire`` (message
conventions) and ``simulate`` (a whole round in-process: the test oracle).

Flower shell: :mod:`fedcore.secagg.exchange` (the server's secure exchanges, driven
over the Grid) and :mod:`fedcore.secagg.handler` (the ClientApp handler for
``train.secagg`` and ``evaluate.secagg`` messages). Threat model and error bound: docs/security.md.
"""

from __future__ import annotations

from fedcore.secagg.protocol.graph import auto_neighbours, auto_threshold, harary_graph
from fedcore.secagg.protocol.machine import (
    Advert,
    ClientRound,
    RoundParams,
    ServerRound,
    UnmaskReply,
)
from fedcore.secagg.protocol.quantize import Decoded, Quantizer, decode, encode
from fedcore.secagg.protocol.rosters import (
    CaRoster,
    CertificateIdentity,
    EphemeralIdentity,
    Identity,
    PinnedRoster,
    Roster,
)
from fedcore.secagg.protocol.simulate import ClientInput, reference_mean, simulate_round

__all__ = [
    "Advert",
    "CaRoster",
    "CertificateIdentity",
    "ClientInput",
    "ClientRound",
    "Decoded",
    "EphemeralIdentity",
    "Identity",
    "PinnedRoster",
    "Quantizer",
    "Roster",
    "RoundParams",
    "ServerRound",
    "UnmaskReply",
    "auto_neighbours",
    "auto_threshold",
    "decode",
    "encode",
    "harary_graph",
    "reference_mean",
    "simulate_round",
]
