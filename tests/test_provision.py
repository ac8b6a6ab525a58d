"""`fedcore provision`: key modes, certificate SANs and validity, no overwrite without --force,
add/revoke, and the CA-signed admitted list every kit carries."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedcore.cli import main
from fedcore.core.errors import DeploymentError
from fedcore.deploy.provision import FederationPaths, add_client, provision, renew_server, revoke
from fedcore.secagg.protocol.rosters import fingerprint, fingerprint_text
from fedcore.storage.admitted import SignedAdmitted
from fedcore.storage.keys import (
    load_admitted_keys,
    load_identity_key,
    node_identity_keys,
    public_key_pem,
    sign,
    verify,
)

PRIVATE_FILES = ("ca/ca.key", "server/server.key")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def fed(tmp_path: Path) -> FederationPaths:
    return provision(
        tmp_path / "fed",
        clients=3,
        server_names=["fl.example.org"],
        server_ips=["10.1.2.3", "fd00::7"],
    )


def test_private_keys_are_0600_public_files_0644(fed: FederationPaths) -> None:
    keys = [fed.root / f for f in PRIVATE_FILES] + [
        fed.client_kit(f"client-{i}") / "identity.key" for i in (1, 2, 3)
    ]
    for k in keys:
        assert _mode(k) == 0o600, k
    for pub in (
        "ca/ca.pem",
        "server/server.pem",
        "server/admitted.json",
        "server/admitted.json.sig",
        "clients/client-1/admitted.json",
        "clients/client-1/admitted.json.sig",
        "federation.json",
    ):
        assert _mode(fed.root / pub) == 0o644, pub
    assert _mode(fed.ca_dir) == 0o700 and _mode(fed.client_kit("client-1")) == 0o700


def test_keys_are_born_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)  # a careless umask would make a chmod-after window visible
    try:
        f = provision(tmp_path / "fed", clients=1)
    finally:
        os.umask(old)
    assert _mode(f.server_kit / "server.key") == 0o600
    assert _mode(f.client_kit("client-1") / "identity.key") == 0o600


def test_server_certificate_sans_and_chain(fed: FederationPaths) -> None:
    ca = x509.load_pem_x509_certificate((fed.ca_dir / "ca.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((fed.server_kit / "server.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert ips == {ipaddress.ip_address(a) for a in ("10.1.2.3", "fd00::7", "127.0.0.1", "::1")}
    # every kit carries the same CA
    for i in (1, 2, 3):
        assert (fed.client_kit(f"client-{i}") / "ca.pem").read_bytes() == (
            fed.ca_dir / "ca.pem"
        ).read_bytes()


def test_nothing_is_overwritten_without_force(fed: FederationPaths) -> None:
    before = _all_files(fed.root)
    with pytest.raises(DeploymentError, match="--force"):
        provision(fed.root, clients=3)
    assert _all_files(fed.root) == before
    with pytest.raises(DeploymentError, match="already exists"):
        add_client(fed.root, "client-2")
    assert _all_files(fed.root) == before
    # a stray existing key file is not clobbered either, even in a fresh federation dir
    other = fed.root.parent / "other"
    (other / "server").mkdir(parents=True)
    (other / "server" / "server.key").write_bytes(b"precious")
    with pytest.raises(DeploymentError, match="refusing to overwrite"):
        provision(other, clients=1)
    assert (other / "server" / "server.key").read_bytes() == b"precious"


def test_force_replaces_every_key_and_keeps_modes(fed: FederationPaths) -> None:
    old_key = (fed.server_kit / "server.key").read_bytes()
    old_id = (fed.client_kit("client-1") / "identity.key").read_bytes()
    provision(fed.root, clients=3, force=True)
    assert (fed.server_kit / "server.key").read_bytes() != old_key
    assert (fed.client_kit("client-1") / "identity.key").read_bytes() != old_id
    for k in PRIVATE_FILES:
        assert _mode(fed.root / k) == 0o600


def test_add_client_touches_no_other_kit(fed: FederationPaths) -> None:
    others = {n: _all_files(fed.client_kit(n)) for n in ("client-1", "client-2", "client-3")}
    kit = add_client(fed.root, "dave")
    assert _mode(kit / "identity.key") == 0o600
    assert {n: _all_files(fed.client_kit(n)) for n in others} == others
    admitted = load_admitted_keys(fed.server_kit)
    assert set(admitted) == {"client-1", "client-2", "client-3", "dave"}
    assert fingerprint(admitted["dave"]) == fingerprint(load_identity_key(kit).public_key())
    # the new kit carries the new list (which names it); the server's is the same
    ca = (fed.ca_dir / "ca.pem").read_bytes()
    own = SignedAdmitted.load(kit / "admitted.json")
    assert own == SignedAdmitted.load(fed.admitted) and own.version == 2
    assert set(own.verify(ca).values()) == {"client-1", "client-2", "client-3", "dave"}


def test_kit_fingerprint_is_the_one_ssh_keygen_prints(fed: FederationPaths) -> None:
    kit = fed.client_kit("client-1")
    fp = json.loads((kit / "client.json").read_text())["fingerprint"]
    assert fp == fingerprint_text(load_identity_key(kit).public_key())
    assert fp == json.loads(fed.admitted.read_text())["clients"]["client-1"]["fingerprint"]
    ssh_keygen = shutil.which("ssh-keygen")
    if ssh_keygen is not None:  # docs/deployment.md tells operators to check it this way
        out = subprocess.run(
            [ssh_keygen, "-lf", str(kit / "identity.pub")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert fp in out.split()


def test_rotate_with_force_replaces_the_admitted_key(fed: FederationPaths) -> None:
    old = fingerprint(load_admitted_keys(fed.server_kit)["client-2"])
    add_client(fed.root, "client-2", force=True)
    new_key = load_identity_key(fed.client_kit("client-2"))
    admitted = load_admitted_keys(fed.server_kit)
    assert fingerprint(admitted["client-2"]) == fingerprint(new_key.public_key()) != old


def test_revoke_removes_the_key_and_records_it(fed: FederationPaths) -> None:
    revoke(fed.root, "client-2")
    assert set(load_admitted_keys(fed.server_kit)) == {"client-1", "client-3"}
    meta = json.loads(fed.metadata.read_text())
    assert meta["clients"]["client-2"]["status"] == "revoked"
    with pytest.raises(DeploymentError, match="not admitted"):
        revoke(fed.root, "client-2")
    signed = SignedAdmitted.load(fed.admitted)
    assert signed.version == 2  # a new version, signed again
    assert set(signed.verify((fed.ca_dir / "ca.pem").read_bytes()).values()) == {
        "client-1",
        "client-3",
    }


def test_every_kit_carries_the_signed_list_made_with_it(fed: FederationPaths) -> None:
    ca = (fed.ca_dir / "ca.pem").read_bytes()
    server = SignedAdmitted.load(fed.admitted)
    doc = json.loads(server.document)
    assert doc["version"] == 1 and doc["federation"] == json.loads(fed.metadata.read_text())["id"]
    assert dt.datetime.fromisoformat(doc["issued"]) <= dt.datetime.now(dt.UTC)
    accepted = server.verify(ca)
    for i in (1, 2, 3):
        kit = fed.client_kit(f"client-{i}")
        assert SignedAdmitted.load(kit / "admitted.json") == server  # same bytes, same signature
        assert accepted[fingerprint(load_identity_key(kit).public_key())] == f"client-{i}"


def test_changing_the_list_needs_the_ca_key_and_leaves_it_whole(fed: FederationPaths) -> None:
    (fed.ca_dir / "ca.key").rename(fed.root / "offline.key")
    before = _all_files(fed.root)
    with pytest.raises(DeploymentError, match="ca.key not found: signing the admitted list"):
        revoke(fed.root, "client-2")
    with pytest.raises(DeploymentError, match="ca.key not found: signing the admitted list"):
        add_client(fed.root, "dave")
    assert _all_files(fed.root) == before  # no kit made, no list changed


def test_bad_names_and_addresses_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="not allowed"):
        provision(tmp_path / "a", clients=["../evil"])
    with pytest.raises(DeploymentError, match="not an IPv4/IPv6"):
        provision(tmp_path / "b", clients=1, server_ips=["300.1.1.1"])
    with pytest.raises(DeploymentError, match="not a DNS name"):
        provision(tmp_path / "c", clients=1, server_names=["bad name"])


def test_identity_signs_and_admitted_keys_verify(fed: FederationPaths) -> None:
    admitted = load_admitted_keys(fed.server_kit)
    key = load_identity_key(fed.client_kit("client-1"))
    assert isinstance(key.curve, ec.SECP384R1)
    sig = sign(key, b"advertised keys")
    assert verify(admitted["client-1"], b"advertised keys", sig)
    assert not verify(admitted["client-2"], b"advertised keys", sig)
    assert not verify(admitted["client-1"], b"swapped keys", sig)


def test_kit_keys_load_the_way_flower_supernode_loads_them(fed: FederationPaths) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    key = load_ssh_private_key((fed.client_kit("client-1") / "identity.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(key.public_key())


def test_node_identity_keys_reads_registered_keys_from_the_grid(fed: FederationPaths) -> None:
    from flwr.proto.node_pb2 import NodeInfo

    admitted = load_admitted_keys(fed.server_kit)

    class Grid:
        def get_nodes(self):
            return [
                NodeInfo(node_id=5, public_key=public_key_pem(admitted["client-3"])),
                NodeInfo(node_id=6),
            ]

    keys = node_identity_keys(Grid())
    assert list(keys) == [5] and fingerprint(keys[5]) == fingerprint(admitted["client-3"])


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "fed")
    assert main(["provision", "--out", out, "--clients", "2", "--server-ip", "127.0.0.1"]) == 0
    assert main(["provision", "--out", out, "--clients", "2"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["provision", "--out", out, "--add-client", "eve"]) == 0
    assert main(["provision", "--out", out, "--revoke", "client-1"]) == 0
    assert set(load_admitted_keys(Path(out) / "server")) == {"client-2", "eve"}


def _validity(path: Path) -> dt.timedelta:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def test_days_sets_the_server_certificate_validity(tmp_path: Path) -> None:
    f = provision(tmp_path / "fed", clients=1, days=30)
    assert abs(_validity(f.server_kit / "server.pem") - dt.timedelta(days=30)) <= dt.timedelta(
        minutes=1
    )
    assert abs(_validity(f.ca_dir / "ca.pem") - dt.timedelta(days=3650)) <= dt.timedelta(minutes=1)
    cert = x509.load_pem_x509_certificate((f.server_kit / "server.pem").read_bytes())
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC) < cert.not_valid_after_utc


def test_renew_server_keeps_client_kits_valid(fed: FederationPaths) -> None:
    clients = {n: _all_files(fed.client_kit(n)) for n in ("client-1", "client-2", "client-3")}
    old = (fed.server_kit / "server.key").read_bytes()
    renew_server(fed.root, server_names=["new.example.org"], days=30)
    assert (fed.server_kit / "server.key").read_bytes() != old
    assert _mode(fed.server_kit / "server.key") == 0o600
    cert = x509.load_pem_x509_certificate((fed.server_kit / "server.pem").read_bytes())
    cert.verify_directly_issued_by(
        x509.load_pem_x509_certificate((fed.client_kit("client-1") / "ca.pem").read_bytes())
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "new.example.org" in san.get_values_for_type(x509.DNSName)
    assert {n: _all_files(fed.client_kit(n)) for n in clients} == clients
    # the days asked for, not the 825 default the federation was made with
    assert abs(_validity(fed.server_kit / "server.pem") - dt.timedelta(days=30)) <= dt.timedelta(
        minutes=1
    )
