"""The federation's admitted list, signed by its CA: what every kit carries and the server relays.

``fedcore provision`` (and ``--add-client``, ``--revoke``) writes it beside the
server kit's ``admitted.json`` and copies it into every new client kit::

    admitted.json        {"format": "fedcore-admitted/2", "federation": ID,
                          "version": N, "issued": ISO-8601 time,
                          "clients": {name: {"public-key": OpenSSH line,
                                             "fingerprint": "SHA256:..."}}}
    admitted.json.sig    ECDSA (SHA-384) signature by the federation CA key
                         (ca/ca.key) over the exact bytes of admitted.json

Each change raises ``version`` by one. A client checks the signature against its
kit's ``ca.pem``, so the server that relays a list cannot add, keep or revive a
key: it can only withhold a newer list (the client then keeps the newest it has)::

    >>> kit = Path("fed/clients/client-1")
    >>> signed = SignedAdmitted.load(kit / "admitted.json")            # doctest: +SKIP
    >>> accepted = signed.verify((kit / "ca.pem").read_bytes())        # doctest: +SKIP
    >>> blob = signed.to_bytes()  # what the server relays             # doctest: +SKIP
    >>> SignedAdmitted.from_bytes(blob) == signed                      # doctest: +SKIP
    True

Nothing here is unpickled: the blob is a fixed header, the JSON and the signature.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedcore.core.errors import DeploymentError
from fedcore.storage.keys import fingerprint, fingerprint_digest_text, load_public_key

__all__ = [
    "ADMITTED_FORMAT",
    "SIGNATURE_SUFFIX",
    "SignedAdmitted",
    "federation_of",
    "read_admitted_blob",
    "sign_document",
    "signature_path",
]

#: ``format`` of a signed ``admitted.json`` (``/1`` lists carry no version or signature).
ADMITTED_FORMAT = "fedcore-admitted/2"
#: The signature file sits beside the list: ``admitted.json.sig``.
SIGNATURE_SUFFIX = ".sig"
#: Largest list accepted (about 40,000 clients) and largest signature.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
MAX_SIGNATURE_BYTES = 1024

_MAGIC = b"fcadm/2\x00"
_HEADER = struct.Struct(">8sII")  # magic, json length, signature length
_HASH = hashes.SHA384()
_CA_NAME = re.compile(r"^fedcore federation ([0-9a-f]+) CA$")


def signature_path(path: str | Path) -> Path:
    """``admitted.json`` -> ``admitted.json.sig``."""
    p = Path(path)
    return p.with_name(p.name + SIGNATURE_SUFFIX)


def _list_path(path: str | Path) -> Path:
    p = Path(path)
    return p / "admitted.json" if p.is_dir() else p


def sign_document(document: bytes, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The CA's ECDSA (SHA-384) signature of ``document`` (DER)."""
    return ca_key.sign(document, ec.ECDSA(_HASH))


def federation_of(ca_cert: x509.Certificate) -> str | None:
    """The federation id a ``fedcore provision`` CA names in its subject, or ``None``."""
    for attr in ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        m = _CA_NAME.match(str(attr.value))
        if m:
            return m.group(1)
    return None


@dataclass(frozen=True)
class SignedAdmitted:
    """An admitted list as written (its exact JSON bytes) and the CA's signature of them.

    Nothing in it is trusted before :meth:`verify`; :attr:`version` reads the
    unverified document (compare versions only of lists that verified).
    """

    document: bytes
    signature: bytes

    @classmethod
    def load(cls, path: str | Path) -> SignedAdmitted:
        """Read ``admitted.json`` (or a kit directory holding it) and its ``.sig``."""
        p = _list_path(path)
        sig = signature_path(p)
        try:
            document = p.read_bytes()
        except FileNotFoundError:
            raise DeploymentError(
                f"no admitted list at {p}: pass a kit made by `fedcore provision`"
            ) from None
        try:
            signature = sig.read_bytes()
        except FileNotFoundError:
            raise DeploymentError(
                f"{p} has no signature ({sig.name} missing): it was provisioned by an older "
                "fedcore or copied without it. Copy both files from the server kit, or "
                "re-provision (`fedcore provision --add-client`/`--revoke` sign it again)"
            ) from None
        return cls._checked(document, signature, str(p))

    @classmethod
    def _checked(cls, document: bytes, signature: bytes, where: str) -> SignedAdmitted:
        if len(document) > MAX_DOCUMENT_BYTES:
            raise DeploymentError(
                f"admitted list {where} is {len(document)} bytes; at most "
                f"{MAX_DOCUMENT_BYTES} are accepted"
            )
        if not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
            raise DeploymentError(
                f"admitted list {where}: signature of {len(signature)} bytes (1 to "
                f"{MAX_SIGNATURE_BYTES} expected)"
            )
        return cls(document, signature)

    def to_bytes(self) -> bytes:
        """One self-contained blob: header (magic, lengths), the JSON, the signature."""
        return (
            _HEADER.pack(_MAGIC, len(self.document), len(self.signature))
            + self.document
            + self.signature
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> SignedAdmitted:
        """Parse :meth:`to_bytes` (a relayed list); ``DeploymentError`` if malformed."""
        blob = bytes(blob)
        if len(blob) < _HEADER.size:
            raise DeploymentError(f"admitted-list blob of {len(blob)} bytes is truncated")
        magic, n_doc, n_sig = _HEADER.unpack_from(blob)
        if magic != _MAGIC:
            raise DeploymentError(
                f"not an admitted-list blob (starts {magic!r}, expected {_MAGIC!r})"
            )
        if len(blob) != _HEADER.size + n_doc + n_sig:
            raise DeploymentError(
                f"admitted-list blob is {len(blob)} bytes; its header announces "
                f"{_HEADER.size + n_doc + n_sig}"
            )
        start = _HEADER.size
        return cls._checked(blob[start : start + n_doc], blob[start + n_doc :], "(relayed blob)")

    def _doc(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.document)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeploymentError(f"admitted list is not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise DeploymentError(
                f"admitted list must be a JSON object, found {type(doc).__name__}"
            )
        return doc

    @property
    def version(self) -> int:
        """The list's ``version`` (unverified: call :meth:`verify` first)."""
        version = self._doc().get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DeploymentError(
                f"admitted list has version {version!r}; an integer >= 1 expected "
                "(re-provision: `fedcore provision --add-client`/`--revoke` write one)"
            )
        return version

    def verify(self, ca_cert_pem: bytes, *, federation: str | None = None) -> dict[bytes, str]:
        """``{key fingerprint: client name}`` if the federation CA signed this list.

        Parameters
        ----------
        ca_cert_pem : bytes
            The federation CA certificate (a kit's ``ca.pem``).
        federation : str, optional
            The federation id the list must name; default: the one in the CA's
            subject (``fedcore provision`` CAs name it).

        Raises
        ------
        DeploymentError
            Bad signature (altered, or signed by another CA), another federation's
            list, or a malformed one; the message says which.

        """
        try:
            ca = x509.load_pem_x509_certificate(bytes(ca_cert_pem))
        except ValueError as exc:
            raise DeploymentError(f"the federation CA is not a PEM certificate ({exc})") from None
        ca_key = ca.public_key()
        if not isinstance(ca_key, ec.EllipticCurvePublicKey):
            raise DeploymentError(
                f"the federation CA has a {type(ca_key).__name__}; fedcore CAs are EC keys"
            )
        try:
            ca_key.verify(self.signature, self.document, ec.ECDSA(_HASH))
        except InvalidSignature:
            raise DeploymentError(
                f"the admitted list's signature does not verify against the federation CA "
                f"({ca.subject.rfc4514_string()}): the list was altered, or it belongs to "
                "another federation. Copy admitted.json and admitted.json.sig together from "
                "the server kit, or re-provision"
            ) from None
        doc = self._doc()
        if doc.get("format") != ADMITTED_FORMAT:
            raise DeploymentError(
                f"admitted list has format {doc.get('format')!r}; {ADMITTED_FORMAT!r} expected"
            )
        expected = federation if federation is not None else federation_of(ca)
        if expected is not None and doc.get("federation") != expected:
            raise DeploymentError(
                f"admitted list is for federation {doc.get('federation')!r}, but this kit is "
                f"for federation {expected!r}"
            )
        self.version  # noqa: B018 - raises on a bad version
        clients = doc.get("clients")
        if not isinstance(clients, Mapping):
            raise DeploymentError("admitted list has no 'clients' table")
        accepted: dict[bytes, str] = {}
        for name, entry in clients.items():
            if not isinstance(entry, Mapping) or not isinstance(entry.get("public-key"), str):
                raise DeploymentError(f"admitted list: client {name!r} has no 'public-key'")
            fp = fingerprint(load_public_key(entry["public-key"]))
            stated = entry.get("fingerprint")
            if stated is not None and stated != fingerprint_digest_text(fp):
                raise DeploymentError(
                    f"admitted list: client {name!r} states fingerprint {stated}, but its key's "
                    f"is {fingerprint_digest_text(fp)}"
                )
            if fp in accepted:
                raise DeploymentError(
                    f"admitted list: clients {accepted[fp]!r} and {name!r} share one key "
                    f"({fingerprint_digest_text(fp)})"
                )
            accepted[fp] = str(name)
        return accepted


def read_admitted_blob(path: str | Path) -> bytes | None:
    """The signed list at ``path`` (``admitted.json`` + ``.sig``) as one blob, to relay.

    ``None`` when either file is missing (a federation provisioned before lists
    were signed). The server does not need to trust it: clients verify it.
    """
    p = _list_path(path)
    if not p.is_file() or not signature_path(p).is_file():
        return None
    return SignedAdmitted.load(p).to_bytes()  # files are replaced by rename, never removed
