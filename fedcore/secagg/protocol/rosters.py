"""Client identities that sign advertised keys, and rosters that verify them.

Bonawitz et al., CCS 2017, Sec. 6 (active adversary): each client signs its
advertised public keys with a long-term identity key, so the relaying server
cannot substitute its own keys and sit in the middle of the pairwise channels.

Two kinds, behind two small interfaces:

- :class:`Identity` (a client's own): ``credential`` (what peers need to verify
  it) and ``sign(message)``.
- :class:`Roster` (a verifier): ``verify(node_id, credential, message, signature)``
  returns the verified public key fingerprint or raises ``SecureAggregationError``.

Simulation (no provisioning): :class:`EphemeralIdentity` is an Ed25519 key
generated from the CSPRNG inside the client process (kept in that client's
``Context.state``, never sent anywhere); its credential is the raw public key,
and :class:`PinnedRoster` accepts the first key it sees for a node and pins it
for the rest of the run (trust on first use).

Deployment (kits from ``fedcore provision``): :class:`KeyIdentity` signs with
the kit's EC P-384 ``identity.key`` (node config ``identity-key``, which
``fedcore client`` sets). The server checks each advert against the key the
SuperLink authenticated that node with (:class:`RegisteredKeyRoster`, from
``grid.get_nodes()``); clients check signatures and pin peers' keys, or, given
the federation's ``admitted.json`` (node config ``admitted-keys``), accept only
admitted keys (:class:`AdmittedRoster`). A certificate scheme is plugged in the
same way: :class:`CertificateIdentity` (``identity-key`` + ``identity-cert``)
and :class:`CaRoster` (``ca-cert``). Implement the two protocols for any other
scheme; docs/security.md states the trust assumptions of each.
"""

from __future__ import annotations

import base64
import hashlib
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

__all__ = [
    "AdmittedRoster",
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


def fingerprint(public_key: VerifyingKey) -> bytes:
    """SHA-256 of the key's OpenSSH wire encoding: a stable id of a public key.

    The same digest ``ssh-keygen -l`` prints (:func:`fingerprint_text`), so an
    operator can check a kit's ``identity.pub`` against ``admitted.json``.
    """
    try:
        line = public_key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    except (ValueError, TypeError) as exc:  # a curve OpenSSH has no name for
        raise SecureAggregationError(
            f"unsupported identity key ({exc}): use Ed25519 or EC P-256, P-384 or P-521"
        ) from None
    return hashlib.sha256(base64.b64decode(line.split()[1])).digest()


def fingerprint_text(public_key: VerifyingKey) -> str:
    """``SHA256:...``: :func:`fingerprint` as ``ssh-keygen -l`` prints it."""
    return "SHA256:" + base64.b64encode(fingerprint(public_key)).decode().rstrip("=")


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

    """

    def __init__(
        self,
        cas: Iterable[x509.Certificate],
        *,
        admitted: Iterable[bytes] | None = None,
        now: object | None = None,
    ) -> None:
        self.cas = list(cas)
        if not self.cas:
            raise SecureAggregationError("a CaRoster needs at least one CA certificate")
        self.admitted = set(admitted) if admitted is not None else None
        self.now = now

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
        return fp
