"""Provisioned node identities: load a kit's key or the admitted keys; sign and verify.

Each client kit holds an EC P-384 identity key. Flower's node authentication
uses it to sign every Fleet API request, and secure aggregation uses it to sign
the keys a client advertises, so the server cannot swap them::

    >>> key = load_identity_key("fed/clients/client-1")            # doctest: +SKIP
    >>> sig = sign(key, advertised_keys_bytes)                      # doctest: +SKIP
    >>> keys = load_admitted_keys("fed/server")                     # doctest: +SKIP
    >>> verify(keys["client-1"], advertised_keys_bytes, sig)        # doctest: +SKIP
    True

Inside the apps under deployment:

- a ClientApp started by ``fedcore client`` finds its key through
  :func:`context_identity_key` (node config ``identity-key``, a path), and the
  federation's signed admitted list through node config ``admitted-list`` (checked
  against node config ``federation-ca``, see :mod:`fedcore.storage.admitted`);
- the ServerApp gets each connected node's registered identity key from
  :func:`node_identity_keys` (``grid.get_nodes()``: the keys the SuperLink
  authenticated the node with), without any file, and the path of the server kit's
  signed admitted list as its node config ``admitted-list`` (``fedcore server``).

A key's :func:`fingerprint` (SHA-256 of its OpenSSH wire form, what ``ssh-keygen -l``
prints) names it everywhere: in ``admitted.json``, in rosters, in error messages.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcore.core.errors import DeploymentError, SecureAggregationError

__all__ = [
    "ADMITTED_KEYS",
    "ADMITTED_LIST",
    "CA_CERT",
    "FEDERATION_CA",
    "IDENTITY_CERT",
    "IDENTITY_KEY",
    "TRUST_ON_FIRST_USE",
    "context_identity_key",
    "fingerprint",
    "fingerprint_digest_text",
    "fingerprint_text",
    "load_admitted_keys",
    "load_identity_key",
    "load_public_key",
    "node_identity_keys",
    "sign",
    "verify",
]

# Node-config keys of a provisioned node (deployment); each value is a file path.
#: The kit's identity key (``fedcore client`` passes it).
IDENTITY_KEY = "identity-key"
#: A certificate for the identity key (the certificate scheme of secure aggregation).
IDENTITY_CERT = "identity-cert"
#: The CA that issued the peers' identity certificates.
CA_CERT = "ca-cert"
#: An unsigned copy of the federation's ``admitted.json`` (superseded by ``admitted-list``).
ADMITTED_KEYS = "admitted-keys"
#: The federation's signed admitted list (``admitted.json``, ``admitted.json.sig`` beside it):
#: on a client, its kit's copy (``fedcore client`` passes it); on the server (the
#: ServerApp's node config), the server kit's, which the server relays to clients.
ADMITTED_LIST = "admitted-list"
#: The federation CA certificate that signs the admitted list (a kit's ``ca.pem``).
FEDERATION_CA = "federation-ca"
#: ``true``: a provisioned node without an admitted list pins peers on first use
#: (``fedcore client --trust-on-first-use``); otherwise it refuses to aggregate.
TRUST_ON_FIRST_USE = "trust-on-first-use"
_HASH = hashes.SHA384()


def fingerprint(public_key: Any) -> bytes:
    """SHA-256 of the key's OpenSSH wire encoding: a stable id of a public key.

    The same digest ``ssh-keygen -l`` prints (:func:`fingerprint_text`), so an
    operator can check a kit's ``identity.pub`` against ``admitted.json``.
    """
    try:
        line = public_key.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    except (ValueError, TypeError, AttributeError) as exc:  # a curve OpenSSH has no name for
        raise SecureAggregationError(
            f"unsupported identity key ({exc}): use Ed25519 or EC P-256, P-384 or P-521"
        ) from None
    return hashlib.sha256(base64.b64decode(line.split()[1])).digest()


def fingerprint_text(public_key: Any) -> str:
    """``SHA256:...``: :func:`fingerprint` as ``ssh-keygen -l`` prints it."""
    return fingerprint_digest_text(fingerprint(public_key))


def fingerprint_digest_text(digest: bytes) -> str:
    """``SHA256:...`` for a :func:`fingerprint` digest."""
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_identity_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """The identity private key of a client kit (the kit directory or the key file)."""
    p = Path(path)
    if p.is_dir():
        p = p / "identity.key"
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DeploymentError(
            f"no identity key at {p}: pass a client kit made by `fedcore provision`"
        ) from None
    try:
        key: Any = (
            serialization.load_ssh_private_key(data, None)
            if data.startswith(b"-----BEGIN OPENSSH")
            else serialization.load_pem_private_key(data, None)
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DeploymentError(f"{p} is not an unencrypted EC private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeploymentError(f"{p} holds a {type(key).__name__}, expected an EC (P-384) key")
    return key


def load_public_key(data: str | bytes) -> ec.EllipticCurvePublicKey:
    """An EC public key from an OpenSSH line or PEM."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        key: Any = (
            serialization.load_pem_public_key(raw)
            if raw.startswith(b"-----BEGIN")
            else serialization.load_ssh_public_key(raw)
        )
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DeploymentError(f"not an EC public key in OpenSSH or PEM form ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeploymentError(f"expected an EC public key, found {type(key).__name__}")
    return key


def load_admitted_keys(path: str | Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """Client name -> identity public key, from a server kit (or its ``admitted.json``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "admitted.json"
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise DeploymentError(
            f"no admitted keys at {p}: pass a server kit made by `fedcore provision`"
        ) from None
    except json.JSONDecodeError as exc:
        raise DeploymentError(f"{p} is not valid JSON ({exc})") from exc
    clients = doc.get("clients") if isinstance(doc, dict) else None
    if not isinstance(clients, Mapping):
        raise DeploymentError(f"{p} has no 'clients' table; re-provision the federation")
    return {str(name): load_public_key(str(entry["public-key"])) for name, entry in clients.items()}


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """The PEM form Flower's node authentication registers and sends."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA (SHA-384) signature of ``data``, DER-encoded."""
    return private_key.sign(data, ec.ECDSA(_HASH))


def verify(public_key: ec.EllipticCurvePublicKey, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of ``data``."""
    try:
        public_key.verify(signature, data, ec.ECDSA(_HASH))
    except InvalidSignature:
        return False
    return True


def context_identity_key(context: Any) -> ec.EllipticCurvePrivateKey | None:
    """In a ClientApp: this node's identity key, or ``None`` when not deployed with a kit."""
    path = context.node_config.get(IDENTITY_KEY)
    return load_identity_key(str(path)) if path else None


def node_identity_keys(grid: Any) -> dict[int, ec.EllipticCurvePublicKey]:
    """In a ServerApp: node id -> the identity key the SuperLink authenticated it with.

    Empty for grids without registered keys (simulation engines).
    """
    keys: dict[int, ec.EllipticCurvePublicKey] = {}
    for info in grid.get_nodes():
        raw = getattr(info, "public_key", b"")
        if raw:
            keys[int(info.node_id)] = load_public_key(bytes(raw))
    return keys
