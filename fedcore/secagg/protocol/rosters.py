"""Client identities that sign advertised keys, and rosters that verify them.

Bonawitz et al., CCS 2017, Sec. 6 (active adversary): each client signs its
advertised public keys with a long-term identity key, so the relaying server
cannot substitute its own keys and sit in the middle of the pairwise channels.

Two kinds, behind two small interfaces:

- :class:`Identity` (a client's own): ``credential`` (what peers need to verify
  it) and ``sign(message)``.
- :class:`Roster` (a verifier): ``verify(node_id, credential, message, signature)``
  returns the verified public key fingerprint or raises ``SecureAggregationError``.

Every roster a client uses binds identities to node ids (:class:`BoundRoster`,
:class:`CaRoster`): once a key has signed for node ``i`` in a run, node ``i`` shows
no other key and the key signs for no other node, so a relaying server can neither
swap a node's key nor present one identity as several neighbours.

Simulation (no provisioning): :class:`EphemeralIdentity` is an Ed25519 key
generated from the CSPRNG inside the client process (kept in that client's
``Context.state``, never sent anywhere); its credential is the raw public key,
and ``BoundRoster(None, pins)`` accepts the first key it sees for a node and pins
it for the rest of the run (trust on first use; :class:`PinnedRoster` is the
older one-direction form).

Deployment (kits from ``fedcore provision``): :class:`KeyIdentity` signs with
the kit's EC P-384 ``identity.key`` (node config ``identity-key``, which
``fedcore client`` sets). The server checks each advert against the key the
SuperLink authenticated that node with (:class:`RegisteredKeyRoster`, from
``grid.get_nodes()``); clients check each peer against the federation's
CA-signed admitted list, ``BoundRoster(accepted, pins)``, so a key the server
made up, or one that was revoked, is refused without trusting the server (where
the list comes from and how a newer one replaces it: :mod:`fedcore.secagg.identities`).
A certificate scheme is plugged in the same way: :class:`CertificateIdentity`
(``identity-key`` + ``identity-cert``) and :class:`CaRoster` (``ca-cert``).
Implement the two protocols for any other scheme; docs/security.md states the
trust assumptions of each.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedcore.core.errors import SecureAggregationError
from fedcore.storage.keys import fingerprint, fingerprint_digest_text, fingerprint_text

__all__ = [
    "AdmittedRoster",
    "BoundRoster",
    "CaRoster",
    "CertificateIdentity",
    "EphemeralIdentity",
    "Identity",
    "KeyIdentity",
    "PinnedRoster",
    "RegisteredKeyRoster",
    "Roster",
    "check_key_file",
    "fingerprint",
    "fingerprint_text",
    "public_key_of",
]

SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
VerifyingKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def _ec_hash(curve: ec.EllipticCurve) -> hashes.HashAlgorithm:
    """SHA-2 matched to the curve: P-256 SHA-256, P-384 SHA-384 (the kits'), P-521 SHA-512."""
    if curve.key_size > 384:
        return hashes.SHA512()
    return hashes.SHA384() if curve.key_size > 256 else hashes.SHA256()


def _sign(key: SigningKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(_ec_hash(key.curve)))


def _spki(key: VerifyingKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_of(credential: bytes) -> VerifyingKey:
    """The public key in a key credential: a raw 32-byte Ed25519 key or a DER SPKI."""
    try:
        if len(credential) == 32:
            return ed25519.Ed25519PublicKey.from_public_bytes(credential)
        key = serialization.load_der_public_key(credential)
    except ValueError:
        raise SecureAggregationError("credential is not a public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise SecureAggregationError(f"unsupported identity key type {type(key).__name__}")
    return key


def _verify(key: object, signature: bytes, message: bytes) -> None:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(_ec_hash(key.curve)))
        else:
            raise SecureAggregationError(
                f"identity key type {type(key).__name__} is not supported (Ed25519 or ECDSA)"
            )
    except InvalidSignature:
        raise SecureAggregationError("advertised keys carry an invalid signature") from None


@runtime_checkable
class Identity(Protocol):
    """A client's own identity: signs its advertised keys."""

    @property
    def credential(self) -> bytes:
        """What a peer's :class:`Roster` needs to verify this identity's signatures."""
        ...

    def sign(self, message: bytes) -> bytes:
        """Signature of ``message``."""
        ...


@runtime_checkable
class Roster(Protocol):
    """Decides whose signatures are accepted."""

    def verify(self, node_id: int, credential: bytes, message: bytes, signature: bytes) -> bytes:
        """Fingerprint of the verified key; ``SecureAggregationError`` if not accepted."""
        ...


class EphemeralIdentity:
    """An Ed25519 identity made from the CSPRNG in the client process (simulation).

    Examples
    --------
    >>> ident = EphemeralIdentity.generate()
    >>> roster = PinnedRoster({})
    >>> fp = roster.verify(7, ident.credential, b"msg", ident.sign(b"msg"))
    >>> len(fp)
    32

    """

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> EphemeralIdentity:
        """Generate a fresh key from OpenSSL's CSPRNG."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> EphemeralIdentity:
        """Restore from :meth:`private_bytes` (a client's own state, never sent)."""
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """Return the 32-byte private key, for the client's own ``Context.state`` only."""
        return self._key.private_bytes_raw()

    @property
    def credential(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._key.public_key().public_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return "EphemeralIdentity(<private>)"


class KeyIdentity:
    """A provisioned key without a certificate (a ``fedcore provision`` client kit).

    The credential is the public key (DER SubjectPublicKeyInfo); ECDSA uses the
    SHA-2 matched to the curve (SHA-384 for the kits' P-384 keys).
    """

    def __init__(self, key: SigningKey) -> None:
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise SecureAggregationError(
                f"identity key is a {type(key).__name__}; Ed25519 or ECDSA expected"
            )
        self._key = key
        self._credential = _spki(key.public_key())

    @property
    def credential(self) -> bytes:
        """The DER SubjectPublicKeyInfo of the public key."""
        return self._credential

    def sign(self, message: bytes) -> bytes:
        """Ed25519 or ECDSA signature."""
        return _sign(self._key, message)

    def __repr__(self) -> str:
        return "KeyIdentity(<private>)"


class PinnedRoster:
    """Trust on first use: a node's first key credential is pinned in ``pins``.

    Parameters
    ----------
    pins : MutableMapping[int, bytes]
        ``{node_id: credential}`` (a raw Ed25519 key or a DER SPKI); the caller
        keeps it across rounds (a client in its ``Context.state``, the server in
        memory).

    """

    def __init__(self, pins: MutableMapping[int, bytes]) -> None:
        self.pins = pins

    def verify(self, node_id: int, credential: bytes, message: bytes, signature: bytes) -> bytes:
        """Verify against the pinned key (pinning ``credential`` the first time)."""
        pinned = self.pins.get(node_id)
        if pinned is not None and pinned != credential:
            raise SecureAggregationError(
                f"node {node_id} advertised a different identity key than the one pinned "
                "when it was first seen in this run"
            )
        key = public_key_of(credential)
        _verify(key, signature, message)
        if pinned is None:
            self.pins[node_id] = credential
        return fingerprint(key)


class _Binding:
    """Node id <-> key fingerprint, one to one, for as long as ``pins`` lives.

    ``pins`` is ``{node_id: fingerprint}``, owned by the caller (a client keeps it
    for the run); the reverse index is built once from it and kept in step.
    """

    def __init__(self, pins: MutableMapping[int, bytes]) -> None:
        self.pins = pins
        self.owners: dict[bytes, int] = {}
        for node, fp in pins.items():
            other = self.owners.setdefault(bytes(fp), int(node))
            if other != int(node):
                raise SecureAggregationError(
                    f"the saved pins bind key {fingerprint_digest_text(fp)} to nodes {other} "
                    f"and {node}; they are corrupt (start a new run)"
                )

    def bind(self, node_id: int, fp: bytes, names: Mapping[bytes, str] | None = None) -> None:
        """Pin ``node_id`` to ``fp`` the first time; refuse any other pairing after that."""
        pinned = self.pins.get(node_id)
        owner = self.owners.get(fp)

        def who(digest: bytes) -> str:
            name = names.get(digest) if names is not None else None
            return fingerprint_digest_text(digest) + (f" ({name})" if name else "")

        if pinned is not None and pinned != fp:
            raise SecureAggregationError(
                f"node {node_id} signed with key {who(fp)}, but node {node_id} showed key "
                f"{who(pinned)} earlier in this run: a node id cannot change its identity "
                "key within a run (a server substituting keys, or a key rotated mid-run: "
                "start a new run)"
            )
        if owner is not None and owner != node_id:
            raise SecureAggregationError(
                f"key {who(fp)} signed for node {node_id}, but it already signed for node "
                f"{owner} in this run: one identity cannot be two nodes (a server inventing "
                "neighbours, or one kit started twice)"
            )
        if pinned is None:
            self.pins[node_id] = fp
            self.owners[fp] = node_id


class BoundRoster:
    """Accepts a signature only from the key bound to the node id, within the admitted list.

    Parameters
    ----------
    accepted : Mapping[bytes, str] or None
        ``{key fingerprint: client name}``: the federation's admitted list (a
        deployment; :meth:`fedcore.storage.admitted.SignedAdmitted.verify` makes
        it). A key outside it is refused. ``None``: any key, pinned on first use
        (simulation).
    pins : MutableMapping[int, bytes]
        ``{node_id: key fingerprint}`` seen so far; the caller keeps it for the
        run. A node id that shows another key, or a key that already signed for
        another node id, is refused.

    Examples
    --------
    >>> a, b = EphemeralIdentity.generate(), EphemeralIdentity.generate()
    >>> roster = BoundRoster(None, {})
    >>> fp = roster.verify(1, a.credential, b"m", a.sign(b"m"))
    >>> try:
    ...     roster.verify(2, a.credential, b"m", a.sign(b"m"))  # one key, two nodes
    ... except SecureAggregationError as exc:
    ...     print("refused")
    refused
    >>> try:
    ...     roster.verify(1, b.credential, b"m", b.sign(b"m"))  # node 1 switching keys
    ... except SecureAggregationError as exc:
    ...     print("refused")
    refused

    """

    def __init__(
        self, accepted: Mapping[bytes, str] | None, pins: MutableMapping[int, bytes]
    ) -> None:
        self.accepted = dict(accepted) if accepted is not None else None
        self._binding = _Binding(pins)

    @property
    def pins(self) -> MutableMapping[int, bytes]:
        """``{node_id: fingerprint}`` bound so far (the mapping passed in)."""
        return self._binding.pins

    def verify(self, node_id: int, credential: bytes, message: bytes, signature: bytes) -> bytes:
        """Check the signature, the admitted list and the node id's binding; the fingerprint."""
        key = public_key_of(credential)
        _verify(key, signature, message)
        fp = fingerprint(key)
        if self.accepted is not None and fp not in self.accepted:
            raise SecureAggregationError(
                f"node {node_id}: key {fingerprint_digest_text(fp)} is not in the federation's "
                "admitted list (revoked or never provisioned)"
            )
        self._binding.bind(int(node_id), fp, self.accepted)
        return fp


class RegisteredKeyRoster:
    """Accepts node ``i`` only with the identity key registered for ``i``.

    The server side of a provisioned deployment: the SuperLink authenticated
    every node with its kit's key (Flower node authentication), so
    ``grid.get_nodes()`` binds node ids to keys without trusting the advert.

    Parameters
    ----------
    keys : Mapping[int, public key]
        ``{node_id: registered identity public key}``.

    """

    def __init__(self, keys: Mapping[int, VerifyingKey]) -> None:
        self.keys = {int(n): _spki(k) for n, k in keys.items()}

    def verify(self, node_id: int, credential: bytes, message: bytes, signature: bytes) -> bytes:
        """The credential must be the node's registered key, and sign ``message``."""
        registered = self.keys.get(node_id)
        if registered is None:
            raise SecureAggregationError(f"node {node_id} has no registered identity key")
        key = public_key_of(credential)
        if _spki(key) != registered:
            raise SecureAggregationError(
                f"node {node_id} signed its keys with a key other than the one it is registered "
                "with (start the client with node config identity-key = its kit's identity.key; "
                "`fedcore client` does this)"
            )
        _verify(key, signature, message)
        return fingerprint(key)


class AdmittedRoster:
    """Accepts any node whose key is one of the federation's admitted keys.

    The client side of a deployment whose kits carry the admitted key list
    (node config ``admitted-keys``): peers are checked against it, not against
    what the server relays.
    """

    def __init__(self, admitted: Iterable[VerifyingKey]) -> None:
        self.admitted = {_spki(k) for k in admitted}

    def verify(self, node_id: int, credential: bytes, message: bytes, signature: bytes) -> bytes:
        """The credential must be an admitted key, and sign ``message``."""
        key = public_key_of(credential)
        if _spki(key) not in self.admitted:
            raise SecureAggregationError(f"node {node_id}: identity key is not an admitted key")
        _verify(key, signature, message)
        return fingerprint(key)


def check_key_file(path: Path) -> None:
    """Refuse a private key file that others can read (``chmod 600`` it)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecureAggregationError(
            f"identity key {path} has mode {mode:o}; it must be readable by its owner only "
            f"(chmod 600 {path})"
        )


class CertificateIdentity:
    """A provisioned identity: private key + X.509 certificate issued by the kit's CA.

    Parameters
    ----------
    key : Ed25519 or EC private key
        The node's provisioned key.
    certificate : x509.Certificate
        Its certificate (the public key must match ``key``).

    """

    def __init__(self, key: SigningKey, certificate: x509.Certificate) -> None:
        if fingerprint(key.public_key()) != fingerprint(certificate.public_key()):  # type: ignore[arg-type]
            raise SecureAggregationError("the identity certificate is not for this private key")
        self._key = key
        self._der = certificate.public_bytes(serialization.Encoding.DER)

    @classmethod
    def from_files(
        cls, key_path: str | os.PathLike[str], cert_path: str | os.PathLike[str]
    ) -> CertificateIdentity:
        """Load a PEM private key (mode 0600, unencrypted) and a PEM certificate."""
        kp, cp = Path(key_path), Path(cert_path)
        check_key_file(kp)
        key = serialization.load_pem_private_key(kp.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise SecureAggregationError(
                f"identity key {kp} is a {type(key).__name__}; Ed25519 or ECDSA expected"
            )
        cert = x509.load_pem_x509_certificate(cp.read_bytes())
        return cls(key, cert)

    @property
    def credential(self) -> bytes:
        """The DER certificate."""
        return self._der

    def sign(self, message: bytes) -> bytes:
        """Ed25519 or ECDSA-SHA256 signature."""
        return _sign(self._key, message)

    def __repr__(self) -> str:
        return "CertificateIdentity(<private>)"


class CaRoster:
    """Accepts identities whose certificate one of ``cas`` signed directly.

    Parameters
    ----------
    cas : Iterable[x509.Certificate]
        Trusted CA certificates (the kit's ``ca.pem``).
    admitted : Iterable[bytes], optional
        If given, also require the key's :func:`fingerprint` to be in this set
        (the server's list of admitted node keys).
    now : datetime, optional
        If given, also require the certificate to be valid at this time (the
        caller reads the clock; this module does not).
    pins : MutableMapping[int, bytes], optional
        If given, bind node ids to key fingerprints as :class:`BoundRoster`
        does (a certified key signs for one node id, a node id keeps one key).

    """

    def __init__(
        self,
        cas: Iterable[x509.Certificate],
        *,
        admitted: Iterable[bytes] | None = None,
        now: object | None = None,
        pins: MutableMapping[int, bytes] | None = None,
    ) -> None:
        self.cas = list(cas)
        if not self.cas:
            raise SecureAggregationError("a CaRoster needs at least one CA certificate")
        self.admitted = set(admitted) if admitted is not None else None
        self.now = now
        self._binding = _Binding(pins) if pins is not None else None

    @classmethod
    def from_file(cls, ca_path: str | os.PathLike[str], **kwargs: object) -> CaRoster:
        """Load every CA certificate in a PEM file."""
        return cls(x509.load_pem_x509_certificates(Path(ca_path).read_bytes()), **kwargs)  # type: ignore[arg-type]

    def verify(self, node_id: int, credential: bytes, message: bytes, signature: bytes) -> bytes:
        """Check the certificate chain (one level), then the signature."""
        try:
            cert = x509.load_der_x509_certificate(credential)
        except ValueError:
            raise SecureAggregationError(
                f"node {node_id}: credential is not a DER certificate"
            ) from None
        for ca in self.cas:
            try:
                cert.verify_directly_issued_by(ca)
                break
            except (ValueError, TypeError, InvalidSignature):
                continue
        else:
            raise SecureAggregationError(
                f"node {node_id}: identity certificate was not issued by a trusted CA"
            )
        if self.now is not None and not (
            cert.not_valid_before_utc <= self.now <= cert.not_valid_after_utc  # type: ignore[operator]
        ):
            raise SecureAggregationError(f"node {node_id}: identity certificate is not valid now")
        key = cert.public_key()
        fp = fingerprint(key)  # type: ignore[arg-type]
        if self.admitted is not None and fp not in self.admitted:
            raise SecureAggregationError(f"node {node_id}: identity key is not an admitted key")
        _verify(key, signature, message)
        if self._binding is not None:
            self._binding.bind(int(node_id), fp)
        return fp
