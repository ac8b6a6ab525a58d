"""Secure aggregation (SecAgg+): the server learns only the weighted sum of the updates.

Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020; Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017.

Pure protocol core (no sockets, clock or global RNG):
:mod:`~fedcore.secagg.crypto` (X25519, HKDF-SHA256, ChaCha20-Poly1305,
AES-CTR masks), :mod:`~fedcore.secagg.shamir`, :mod:`~fedcore.secagg.quantize`
(fixed-point encoding and its error bound), :mod:`~fedcore.secagg.graph`
(random k-regular neighbour graph), :mod:`~fedcore.secagg.identity` (signing
identities and rosters), :mod:`~fedcore.secagg.protocol` (client and server
state machines), :mod:`~fedcore.secagg.simulate` (a whole round in-process:
the test oracle).

Flower shell: :mod:`fedcore.secagg.server` (``SecureTrainStage`` and
``SecureEvaluateStage``, driving the exchange over the Grid) and
:mod:`fedcore.secagg.client` (the ClientApp handler for ``train.secagg`` and
``evaluate.secagg`` messages). Threat model and error bound: docs/security.md.
"""

from __future__ import annotations

from .graph import auto_neighbours, auto_threshold, harary_graph
from .identity import (
    CaRoster,
    CertificateIdentity,
    EphemeralIdentity,
    Identity,
    PinnedRoster,
    Roster,
)
from .protocol import Advert, ClientRound, RoundParams, ServerRound, UnmaskReply
from .quantize import Decoded, Quantizer, decode, encode
from .simulate import ClientInput, reference_mean, simulate_round

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
