"""``fedcore provision``: a federation CA, the server's TLS certificate, one kit per client.

Layout of a provisioned federation (``--out DIR``)::

    DIR/
      federation.json           public metadata: id, server names/IPs, clients and status
      ca/ca.pem                 the federation CA certificate
      ca/ca.key        (0600)   the CA key: keep it offline; it signs the admitted list
                                (--add-client, --revoke) and the server certificate
      server/                   the server kit: copy it to the server host
        ca.pem server.pem
        server.key     (0600)   TLS key; SANs = --server-name/--server-ip + loopback
        admitted.json           the admitted client identity keys (name -> public key),
                                with a version raised by each change
        admitted.json.sig       the CA's signature of admitted.json (ECDSA, SHA-384)
      clients/<name>/           one kit per client: copy it to that client's host
        ca.pem                  verifies the server and the admitted list
        admitted.json(.sig)     the signed admitted list current when the kit was made
                                (the server relays newer ones; clients check the CA)
        identity.key   (0600)   the node identity (EC P-384, OpenSSH format): signs
                                every Fleet API request and the client's
                                secure-aggregation keys
        identity.pub            its public half (also in admitted.json)
        client.json             name, federation id, key fingerprint

Every private key is created with mode 0600 (``O_EXCL``, or a 0600 temporary file
renamed into place with ``--force``); nothing that exists is overwritten without
``--force``. ``--add-client NAME`` adds (or, with ``--force``, rotates) one client
without touching the others; ``--revoke NAME`` removes it from ``admitted.json``;
both sign the new list with the CA key (:mod:`fedcore.storage.admitted`).
``--renew-server`` issues a new server key and certificate from the CA.
A running ``fedcore server`` re-reads ``admitted.json`` every few seconds and relays
the signed list to clients in every secure round.

All keys come from the operating system's CSPRNG through ``cryptography``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.core.errors import DeploymentError
from fedcore.deploy.files import PRIVATE, PUBLIC, make_dir, write_new
from fedcore.storage.admitted import ADMITTED_FORMAT, sign_document, signature_path
from fedcore.storage.keys import fingerprint_text

__all__ = [
    "FederationPaths",
    "add_client",
    "provision",
    "register",
    "renew_server",
    "revoke",
]

FEDERATION_FORMAT = "fedcore-federation/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
#: Always in the server certificate: the SuperLink's own ServerApp process and
#: SuperExec reach its Runtime API over TLS on loopback.
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
#: Certificates start this much before "now" (clocks of other hosts run behind), and
#: stay valid for exactly the ``days`` asked for from then.
_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class FederationPaths:
    """Where each file of a provisioned federation lives."""

    root: Path

    @property
    def metadata(self) -> Path:
        """``federation.json``."""
        return self.root / "federation.json"

    @property
    def ca_dir(self) -> Path:
        """The CA directory (keep ``ca.key`` offline)."""
        return self.root / "ca"

    @property
    def server_kit(self) -> Path:
        """The server kit directory."""
        return self.root / "server"

    @property
    def admitted(self) -> Path:
        """The admitted identity keys, read by the server."""
        return self.server_kit / "admitted.json"

    def client_kit(self, name: str) -> Path:
        """The kit directory of client ``name``."""
        return self.root / "clients" / name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise DeploymentError(
            f"client name {name!r} is not allowed: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _make_ca(federation_id: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcore"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedcore federation {federation_id} CA"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now - _SKEW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: Sequence[str],
    ips: Sequence[str],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    all_names = list(dict.fromkeys([*names, *LOOPBACK_NAMES]))
    all_ips = list(dict.fromkeys([*(str(ipaddress.ip_address(i)) for i in ips), *LOOPBACK_IPS]))
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in all_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in all_ips]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcore"),
                    x509.NameAttribute(NameOID.COMMON_NAME, (list(names) or ["fedcore-server"])[0]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now - _SKEW + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeploymentError(
            f"{path} not found: is {path.parent} a federation made by `fedcore provision`?"
        ) from None
    except json.JSONDecodeError as exc:
        raise DeploymentError(
            f"{path} is not valid JSON ({exc}); re-provision or restore it"
        ) from exc
    if not isinstance(data, dict):
        raise DeploymentError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _write_json(path: Path, obj: Any, *, force: bool) -> None:
    write_new(path, _json_bytes(obj), mode=PUBLIC, force=force)


def _load_ca_key(paths: FederationPaths, why: str) -> ec.EllipticCurvePrivateKey:
    """The federation CA key (``ca/ca.key``), needed to ``why``."""
    path = paths.ca_dir / "ca.key"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        raise DeploymentError(
            f"{path} not found: {why} needs the federation CA key (bring it back from offline "
            "storage for this command)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeploymentError(f"{path} is not the federation's EC CA key")
    return key


def _write_admitted(
    paths: FederationPaths,
    doc: dict[str, Any],
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    kits: Sequence[str] = (),
    force: bool,
) -> None:
    """Write the signed admitted list to the server kit and to each kit in ``kits``.

    The list is written before its signature: a reader in between sees a list whose
    signature does not verify, which clients ignore (and the next read is whole).
    """
    document = _json_bytes(doc)
    signature = sign_document(document, ca_key)
    for target in (paths.admitted, *(paths.client_kit(n) / "admitted.json" for n in kits)):
        write_new(target, document, mode=PUBLIC, force=force)
        write_new(signature_path(target), signature, mode=PUBLIC, force=force)


def _next_list(admitted: dict[str, Any]) -> dict[str, Any]:
    """``admitted`` as the next version of the list (format, version + 1, issued now)."""
    version = admitted.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise DeploymentError(
            f"admitted.json has version {version!r}; restore it from a backup or re-provision"
        )
    return {
        **admitted,
        "format": ADMITTED_FORMAT,
        "version": version + 1,
        "issued": _now().isoformat(),
    }


def _write_client_kit(
    paths: FederationPaths, name: str, federation_id: str, ca_pem: bytes, *, force: bool
) -> tuple[str, str]:
    """Create client ``name``'s kit; return (OpenSSH public key line, fingerprint)."""
    kit = paths.client_kit(name)
    make_dir(kit, mode=0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
        + f" fedcore:{name}"
    )
    fp = fingerprint_text(key.public_key())
    write_new(kit / "identity.key", private, mode=PRIVATE, force=force)
    write_new(kit / "identity.pub", (public_line + "\n").encode(), mode=PUBLIC, force=force)
    write_new(kit / "ca.pem", ca_pem, mode=PUBLIC, force=force)
    _write_json(
        kit / "client.json",
        {
            "format": "fedcore-client-kit/1",
            "name": name,
            "federation": federation_id,
            "fingerprint": fp,
        },
        force=force,
    )
    return public_line, fp


def provision(
    out: str | Path,
    *,
    clients: int | Sequence[str],
    server_names: Sequence[str] = (),
    server_ips: Sequence[str] = (),
    days: int = 825,
    force: bool = False,
) -> FederationPaths:
    """Provision a new federation into ``out``.

    Parameters
    ----------
    out : str or Path
        Directory to create the federation in.
    clients : int or sequence of str
        Number of clients (named ``client-1`` ...) or their names.
    server_names, server_ips : sequence of str
        DNS names and IP addresses clients use to reach the server (certificate
        SANs; ``localhost``, ``127.0.0.1`` and ``::1`` are always added).
    days : int (default: 825)
        Validity of the server certificate (the CA gets ten years).
    force : bool (default: False)
        Replace an existing federation in ``out`` (every old key stops working).

    """
    paths = FederationPaths(Path(out))
    names = (
        [f"client-{i}" for i in range(1, clients + 1)]
        if isinstance(clients, int)
        else list(clients)
    )
    if not names:
        raise DeploymentError("--clients must be >= 1 (or name at least one client)")
    for n in names:
        _check_name(n)
    if len(set(names)) != len(names):
        raise DeploymentError(f"client names must be unique, got {names}")
    for n in server_names:
        if not _DNS.match(n):
            raise DeploymentError(
                f"--server-name {n!r} is not a DNS name (use --server-ip for IPs)"
            )
    for ip in server_ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise DeploymentError(f"--server-ip {ip!r} is not an IPv4/IPv6 address") from None
    if days < 1:
        raise DeploymentError(f"--days must be >= 1, got {days}")
    if paths.metadata.exists() and not force:
        raise DeploymentError(
            f"{paths.root} already holds a federation; pass --force to replace it "
            "(every existing kit stops working) or use --add-client / --revoke"
        )

    federation_id = secrets.token_hex(8)
    ca_key, ca_cert = _make_ca(federation_id, days=3650)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    make_dir(paths.ca_dir, mode=0o700)
    write_new(paths.ca_dir / "ca.key", _pem_key(ca_key), mode=PRIVATE, force=force)
    write_new(paths.ca_dir / "ca.pem", ca_pem, mode=PUBLIC, force=force)

    srv_key, srv_cert = _make_server_cert(ca_key, ca_cert, server_names, server_ips, days)
    make_dir(paths.server_kit, mode=0o700)
    write_new(paths.server_kit / "server.key", _pem_key(srv_key), mode=PRIVATE, force=force)
    write_new(
        paths.server_kit / "server.pem",
        srv_cert.public_bytes(serialization.Encoding.PEM),
        mode=PUBLIC,
        force=force,
    )
    write_new(paths.server_kit / "ca.pem", ca_pem, mode=PUBLIC, force=force)

    now = _now().isoformat()
    admitted: dict[str, Any] = {}
    roster: dict[str, Any] = {}
    for name in names:
        line, fp = _write_client_kit(paths, name, federation_id, ca_pem, force=force)
        admitted[name] = {"public-key": line, "fingerprint": fp}
        roster[name] = {"fingerprint": fp, "status": "admitted", "added": now}
    _write_admitted(
        paths,
        _next_list({"federation": federation_id, "clients": admitted}),
        ca_key,
        kits=names,
        force=force,
    )
    _write_json(
        paths.server_kit / "server.json",
        {
            "format": "fedcore-server-kit/1",
            "federation": federation_id,
            "names": list(server_names),
            "ips": list(server_ips),
        },
        force=force,
    )
    _write_json(
        paths.metadata,
        {
            "format": FEDERATION_FORMAT,
            "id": federation_id,
            "created": now,
            "server": {
                "names": list(server_names),
                "ips": list(server_ips),
                "not-after": srv_cert.not_valid_after_utc.isoformat(),
            },
            "clients": roster,
        },
        force=force,
    )
    return paths


def add_client(out: str | Path, name: str, *, force: bool = False) -> Path:
    """Add client ``name`` (or with ``force`` rotate its identity); return its kit directory."""
    paths = FederationPaths(Path(out))
    _check_name(name)
    meta = _read_json(paths.metadata)
    admitted = _read_json(paths.admitted)
    roster = meta.setdefault("clients", {})
    if (name in roster or paths.client_kit(name).exists()) and not force:
        raise DeploymentError(
            f"client {name!r} already exists in {paths.root}; pass --force to rotate its "
            "identity (its old key stops working) or choose another name"
        )
    ca_key = _load_ca_key(paths, "signing the admitted list")
    ca_pem = (paths.ca_dir / "ca.pem").read_bytes()
    line, fp = _write_client_kit(paths, name, str(meta["id"]), ca_pem, force=force)
    admitted.setdefault("clients", {})[name] = {"public-key": line, "fingerprint": fp}
    roster[name] = {"fingerprint": fp, "status": "admitted", "added": _now().isoformat()}
    _write_admitted(paths, _next_list(admitted), ca_key, kits=[name], force=True)
    _write_json(paths.metadata, meta, force=True)
    return paths.client_kit(name)


def revoke(out: str | Path, name: str) -> None:
    """Remove client ``name`` from the admitted keys (its kit can no longer connect).

    The new list (next version, signed by the CA) reaches clients through the
    server, which relays it in every secure round: their rosters then refuse the key.
    """
    paths = FederationPaths(Path(out))
    meta = _read_json(paths.metadata)
    admitted = _read_json(paths.admitted)
    if name not in admitted.get("clients", {}):
        known = ", ".join(sorted(admitted.get("clients", {}))) or "none"
        raise DeploymentError(
            f"client {name!r} is not admitted in {paths.root} (admitted: {known})"
        )
    ca_key = _load_ca_key(paths, "signing the admitted list")
    del admitted["clients"][name]
    entry = meta.setdefault("clients", {}).setdefault(name, {})
    entry.update(status="revoked", revoked=_now().isoformat())
    _write_admitted(paths, _next_list(admitted), ca_key, force=True)
    _write_json(paths.metadata, meta, force=True)


def renew_server(
    out: str | Path,
    *,
    server_names: Sequence[str] | None = None,
    server_ips: Sequence[str] | None = None,
    days: int = 825,
) -> Path:
    """Issue a new server key and certificate (new SANs, or the previous ones); the server kit.

    Needs the CA key (``ca/ca.key``). Client kits stay valid: they trust the CA,
    not a particular server certificate. Restart ``fedcore server`` to use it.
    """
    paths = FederationPaths(Path(out))
    meta = _read_json(paths.metadata)
    names = list(server_names if server_names is not None else meta["server"]["names"])
    ips = list(server_ips if server_ips is not None else meta["server"]["ips"])
    ca_key = _load_ca_key(paths, "renewing the server certificate")
    ca_cert = x509.load_pem_x509_certificate((paths.ca_dir / "ca.pem").read_bytes())
    key, cert = _make_server_cert(ca_key, ca_cert, names, ips, days)
    write_new(paths.server_kit / "server.key", _pem_key(key), mode=PRIVATE, force=True)
    write_new(
        paths.server_kit / "server.pem",
        cert.public_bytes(serialization.Encoding.PEM),
        mode=PUBLIC,
        force=True,
    )
    meta["server"].update(
        names=names, ips=ips, **{"not-after": cert.not_valid_after_utc.isoformat()}
    )
    _write_json(paths.metadata, meta, force=True)
    return paths.server_kit


# ------------------------------------------------------------------ CLI
def cmd_provision(args: argparse.Namespace) -> int:
    """``fedcore provision``."""
    out = Path(args.out)
    if sum(map(bool, (args.add_client, args.revoke, args.renew_server))) > 1:
        raise DeploymentError("use one of --add-client, --revoke, --renew-server")
    if args.renew_server:
        kit = renew_server(
            out, server_names=args.server_name, server_ips=args.server_ip, days=args.days
        )
        print(f"new server key and certificate in {kit}; restart `fedcore server` with it")
        return 0
    if args.add_client:
        for name in args.add_client:
            kit = add_client(out, name, force=args.force)
            print(f"client {name}: kit {kit} (copy it to the client host; identity.key is secret)")
        print(f"admitted keys updated and signed: {FederationPaths(out).admitted}")
        return 0
    if args.revoke:
        for name in args.revoke:
            revoke(out, name)
            print(f"client {name}: revoked")
        print(
            f"admitted keys updated and signed: {FederationPaths(out).admitted} (+ .sig; a "
            "running server picks both up within seconds and relays them to its clients)"
        )
        return 0
    paths = provision(
        out,
        clients=args.client_names or args.clients,
        server_names=args.server_name or (),
        server_ips=args.server_ip or (),
        days=args.days,
        force=args.force,
    )
    meta = _read_json(paths.metadata)
    reach = ", ".join([*(args.server_name or []), *(args.server_ip or [])]) or "localhost only"
    print(f"federation {meta['id']} in {paths.root}")
    print(f"  server kit:  {paths.server_kit}  (TLS for {reach})")
    for name in meta["clients"]:
        print(f"  client kit:  {paths.client_kit(name)}")
    print(f"  CA key:      {paths.ca_dir / 'ca.key'}  (keep offline)")
    return 0


#: ``fedcore provision --help``'s examples.
EPILOG = """\
examples:
  fedcore provision --out fed --clients 3 --server-name fl.example.org
  fedcore provision --out fed --client-names hospital-a hospital-b --server-ip 10.0.0.5
  fedcore provision --out fed --add-client hospital-c
  fedcore provision --out fed --revoke client-2
"""


def register(subparsers: Any) -> None:
    """Add the ``provision`` sub-command."""
    p = subparsers.add_parser(
        "provision",
        help="create a federation: CA, server TLS certificate, one kit per client",
        description="Create (or change) a federation's keys and certificates. "
        "Private keys are files of mode 0600; nothing is overwritten without --force.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="federation directory")
    p.add_argument("--clients", type=int, default=2, help="number of clients (client-1 ...)")
    p.add_argument(
        "--client-names", nargs="+", metavar="NAME", help="client names instead of --clients"
    )
    p.add_argument(
        "--server-name",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="DNS name(s) clients use for the server (certificate SANs)",
    )
    p.add_argument(
        "--server-ip",
        nargs="+",
        action="extend",
        metavar="IP",
        help="IP address(es) clients use for the server (certificate SANs)",
    )
    p.add_argument("--days", type=int, default=825, help="server certificate validity in days")
    p.add_argument(
        "--add-client",
        nargs="+",
        metavar="NAME",
        help="add client(s) to an existing federation (with --force: rotate its key)",
    )
    p.add_argument(
        "--revoke", nargs="+", metavar="NAME", help="remove client(s) from the admitted keys"
    )
    p.add_argument(
        "--renew-server",
        action="store_true",
        help="new server key + certificate (same SANs unless --server-name/--server-ip given)",
    )
    p.add_argument(
        "--force", action="store_true", help="replace existing files (old keys stop working)"
    )
    p.set_defaults(func=cmd_provision)
